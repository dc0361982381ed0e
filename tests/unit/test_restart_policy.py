"""The restart policy of one worker position: backoff, crash-loop hold-back, and what
counts as progress; a stop asked of a worker whose channel is still opening."""

from __future__ import annotations

import asyncio
import socket

from genworker import channels as ch
from genworker.node.handles import Position, State, WorkerHandle


def test_restarts_back_off_doubling_then_the_position_is_held_back() -> None:
    pos = Position(0)
    delays = [pos.record_death(False, now=100.0) for _ in range(6)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 30.0, 30.0]
    assert pos.held_back
    assert pos.next_start == 130.0


def test_a_death_after_a_finished_job_starts_the_count_again() -> None:
    pos = Position(0)
    for _ in range(4):
        pos.record_death(False, now=0.0)
    assert pos.record_death(True, now=0.0) == 0.1
    assert not pos.held_back


def test_a_worker_that_stayed_up_for_the_stable_period_made_progress() -> None:
    """An idle node whose workers die once an hour must not end up held back."""
    pos = Position(0)
    for _ in range(10):
        assert pos.record_death(False, now=0.0, lived_s=3600.0) == 0.1
    assert not pos.held_back
    pos.record_death(False, now=0.0, lived_s=1.0)
    assert pos.failures == 2


def test_progress_while_running_resets_the_count() -> None:
    pos = Position(0)
    for _ in range(5):
        pos.record_death(False, now=0.0)
    assert pos.held_back
    pos.record_progress()
    assert not pos.held_back
    assert pos.record_death(False, now=0.0) == 0.1


def test_a_stop_asked_for_while_the_channel_opens_is_sent_once_it_is_open() -> None:
    """TERM or TTOU between a worker's fork and its channel opening: the worker must still
    be told to stop, or the node waits its whole graceful timeout for it."""

    async def scenario() -> list[object]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        block = ch.SharedBlock(1)
        h = WorkerHandle(0, 0, 1, ours, block, 5)
        h.ask_stop("shutdown")  # no channel yet: nothing can be sent
        assert h.state is State.STOPPING
        got: list[object] = []
        worker_end = await ch.open_channel(theirs, got.append, lambda e: None)
        h.attach(await ch.open_channel(ours, lambda m: None, lambda e: None))
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        worker_end.close()
        assert h.chan is not None
        h.chan.close()
        return got

    assert asyncio.run(scenario()) == [(ch.STOP, "shutdown")]
