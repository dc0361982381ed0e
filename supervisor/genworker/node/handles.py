"""The supervisor's view of its workers: one handle per worker process, and the
restart policy of each position (backoff, crash-loop hold-back)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import time
from dataclasses import dataclass, field

from genworker import channels as ch
from genworker.model import Job

# When a worker's calls are this quick, the round trip to the supervisor after each one is a
# real share of the call: it then gets a second job queued behind each slot. Slow calls get
# none, so an urgent job never waits behind one already handed to a worker.
FAST_CALL_S = 0.25
FAST_CALLS_SEEN = 20


BOOT_TIMEOUT_S = 60.0  # a worker not ready by then is killed; a HUP waits this long for each


class State(enum.StrEnum):
    SPAWNING = "spawning"  # asked the zygote for it, not ready yet
    READY = "ready"  # takes jobs
    STOPPING = "stopping"  # asked to finish what it holds and leave; takes no jobs
    DEAD = "dead"


@dataclass(eq=False)
class WorkerHandle:
    position: int  # the logical worker number (restart policy and titles)
    slot: int  # its shared-memory slot
    generation: int
    sock: socket.socket
    block: ch.SharedBlock
    max_limit: int
    state: State = State.SPAWNING
    pid: int | None = None
    chan: ch.Channel | None = None
    jobs: dict[int, Job] = field(default_factory=dict)
    spawned_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    stop_reason: str | None = None  # why we asked it to stop (shutdown, reload, recycle ...)
    kill_reason: str | None = None  # why we killed it (heartbeat timeout ...): counts as a death
    recycle_after: int = 0  # jobs before recycling (0: never)
    lost_reason: str | None = None  # it died of something not its own (its zygote died)
    exited: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    channel_closed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.view = self.block.slot(self.slot)  # its shared counters (it writes, we read)

    def free_slots(self) -> int:
        if self.state is not State.READY or self.chan is None or self.chan.closed:
            return 0
        if self.exited.done():  # dead, its watcher is reading the last of its channel
            return 0
        if self.holds_suspect():
            return 0  # a job that was in flight when a worker died runs alone
        view = self.view
        limit = min(int(view[ch.LIMIT]) or self.max_limit, self.max_limit)
        calls = view[ch.LATENCY_COUNT]
        if calls >= FAST_CALLS_SEEN and view[ch.LATENCY_SUM] < FAST_CALL_S * calls:
            limit *= 2
        return max(0, limit - len(self.jobs))

    def holds_suspect(self) -> bool:
        return any(j.deaths for j in self.jobs.values())

    def send_jobs(self, jobs: list[Job]) -> bool:
        if self.chan is None or self.chan.closed:
            return False
        try:
            self.chan.send((ch.JOBS, jobs))
        except ConnectionError:
            return False
        for j in jobs:
            self.jobs[j.job_id] = j
        return True

    def ask_stop(self, reason: str) -> None:
        if self.state in (State.STOPPING, State.DEAD):
            return
        self.state = State.STOPPING
        self.stop_reason = reason
        self._send_stop()

    def attach(self, chan: ch.Channel) -> None:
        """Its channel is open: a stop asked for while it was opening is sent now."""
        self.chan = chan
        if self.state is State.STOPPING:
            self._send_stop()

    def _send_stop(self) -> None:
        if self.chan is not None and not self.chan.closed:
            with contextlib.suppress(ConnectionError):  # it died: the watcher will see to it
                self.chan.send((ch.STOP, self.stop_reason))

    def counter(self, index: int) -> float:
        return self.view[index]

    def jobs_finished(self) -> int:
        s = self.view
        return int(s[ch.DONE_OK] + s[ch.FAILED] + s[ch.RETRIED] + s[ch.SNOOZED])


@dataclass
class Position:
    """Restart policy of one logical worker.

    The first restart is immediate-ish (0.1 s), then doubles up to `cap_s`. A worker
    that finished a job, or stayed up for `stable_s`, before dying made progress, so
    its death resets the count: a crash loop is dying again and again without doing
    any work. (Without the stable period, an idle node whose workers die once an hour
    would end up held back.) After `hold_after` deaths in a row without progress the
    position is held back (degraded) and retried only every `cap_s`.
    """

    index: int
    failures: int = 0
    next_start: float = 0.0
    restarts: int = 0
    base_s: float = 0.1
    cap_s: float = 30.0
    hold_after: int = 5
    stable_s: float = 60.0

    def record_death(
        self, progressed: bool, now: float | None = None, *, lived_s: float = 0.0
    ) -> float:
        now = time.monotonic() if now is None else now
        progressed = progressed or lived_s >= self.stable_s
        self.failures = 1 if progressed else self.failures + 1
        delay = min(self.cap_s, self.base_s * 2 ** (self.failures - 1))
        if self.held_back:
            delay = self.cap_s
        self.next_start = now + delay
        self.restarts += 1
        return delay

    def record_clean_exit(self) -> None:
        self.next_start = 0.0

    def record_progress(self) -> None:
        self.failures = 0

    @property
    def held_back(self) -> bool:
        return self.failures >= self.hold_after
