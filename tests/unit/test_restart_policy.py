"""The restart policy of one worker position: backoff, crash-loop hold-back, and what
counts as progress."""

from __future__ import annotations

from supervisor.workers import Position


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
