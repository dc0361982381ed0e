"""Dispatch: buffered jobs go to the workers with free slots, most urgent first, and
each suspect (a job that was running when a worker died) to a worker of its own.

A rejected API key pauses claims and dispatch (`ClaimPause`); after the pause, one job
at a time probes the key until one succeeds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from genworker.config import Settings
from genworker.model import Job
from genworker.node.holdings import Done, Holder, Holdings


class ClaimPause:
    """Claims and dispatch paused (a rejected API key); after it, one job at a time
    (the probe) until one succeeds."""

    def __init__(self, on_end: Callable[[], None]) -> None:
        self.until = 0.0  # monotonic
        self.probe = False
        self.on_end = on_end
        self._timer: asyncio.TimerHandle | None = None

    def active(self) -> bool:
        return time.monotonic() < self.until

    def start(self, seconds: float) -> None:
        """Pause for `seconds`, then probe; 0 ends a pause now (a reload may have fixed the
        key)."""
        self.until = time.monotonic() + seconds
        self.probe = True
        if self._timer is not None:
            self._timer.cancel()
        # dispatch runs on events only: with the buffer full and the workers idle, none
        # would come when the pause ends, so one is scheduled
        self._timer = asyncio.get_running_loop().call_later(max(0.0, seconds), self._ended)

    def passed(self) -> None:
        """A job succeeded: the key works, the probe is over."""
        self.probe = False

    def _ended(self) -> None:
        self._timer = None
        # the timer is the pause's end (a later pause replaces it); the loop's clock may
        # lag time.monotonic() by a millisecond, so do not ask the clock again
        self.until = min(self.until, time.monotonic())
        self.on_end()


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        holdings: Holdings,
        pause: ClaimPause,
        *,
        share: Callable[[], int | None],
        on_served: Callable[[list[Done]], None],
        running_low: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.holdings = holdings
        self.pause = pause
        self.share = share  # this node's share of --api-max-inflight (None: no cap)
        self.on_served = on_served  # outcomes the cache gave: to the writer
        self.running_low = running_low  # the buffer runs low: claim
        self.reserved: Holder | None = None  # drained of other work to take a suspect

    def apply_settings(self, settings: Settings) -> None:
        self.settings = settings

    def dispatch(self) -> None:
        """Hand buffered jobs to the workers with free slots, most free first."""
        if self.pause.active():
            return
        buffer = self.holdings.buffer
        if self.holdings.suspects:
            self._dispatch_suspects()
        if not self.holdings.suspects:
            self.reserved = None  # nothing to drain a worker for any more
        if not buffer:
            return
        holders = list(self.holdings.holders())
        frees = [(h.free_slots(), h) for h in holders if h is not self.reserved]
        frees.sort(key=lambda fh: fh[0], reverse=True)
        held = sum(len(h.jobs) for h in holders)  # the reserved worker's jobs count too
        room = len(buffer)
        share = self.share()
        if share is not None:
            room = min(room, share - held)
        if self.pause.probe:  # after a pause: one job at a time until one succeeds
            room = min(room, 1 - held)
        for free, h in frees:
            take = min(free, room)
            if take <= 0:
                break
            batch = self._take(take)
            if not batch:
                break
            if not h.send_jobs(batch):
                buffer.extendleft(reversed(batch))
                continue
            room -= take
        if len(buffer) < self.settings.claim_batch:
            self.running_low()

    def _dispatch_suspects(self) -> None:
        """Give each suspect a worker of its own: an idle one, or one we stop feeding until
        it is idle (so suspects cannot starve behind a busy node)."""
        suspects = self.holdings.suspects
        holders = list(self.holdings.holders())
        if self.reserved is not None and self.reserved not in holders:
            self.reserved = None  # it died or left
        for h in sorted(holders, key=lambda x: len(x.jobs)):
            if not suspects:
                break
            if not h.jobs and h.free_slots() > 0:
                job = suspects.popleft()
                if h.send_jobs([job]):
                    if h is self.reserved:
                        self.reserved = None
                else:
                    suspects.appendleft(job)
        if suspects and self.reserved is None:
            candidates = [h for h in holders if not h.holds_suspect()]
            if candidates:
                self.reserved = min(candidates, key=lambda x: len(x.jobs))

    def _take(self, n: int) -> list[Job]:
        """Up to n buffered jobs to run; with the cache, twins of running jobs wait instead."""
        buffer, gate = self.holdings.buffer, self.holdings.gate
        if gate is None:
            return [buffer.popleft() for _ in range(min(n, len(buffer)))]
        out: list[Job] = []
        served: list[Done] = []
        while buffer and len(out) < n:
            job = buffer.popleft()
            verdict = gate.admit(job)
            if verdict is True:
                out.append(job)
            elif verdict is not False:
                served.append((verdict, job.attempt))
        self.on_served(served)
        return out
