"""How many jobs to claim: enough to fill the free slots and a buffer sized to the work.

The buffer covers `--prefetch` x the slots, or BUFFER_S of the recent completion rate
when that is more: fast jobs need deep buffers (and big claims), slow API calls need a
shallow one, so a newly arrived urgent job never queues behind more than a moment of
work. A claim is worth its round trip once a quarter of the target is gone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

from genworker.config import Settings
from genworker.node.dispatch import ClaimPause
from genworker.node.holdings import Holder, Holdings

BUFFER_S = 0.05  # the buffer holds at least this much work at the recent completion rate
MAX_BUFFER = 2000


class Rate:
    """Events per second over the last ~second, cheap enough to call per batch."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self.start = time.monotonic()
        self.count = 0
        self.last = 0.0

    def add(self, n: int) -> None:
        now = time.monotonic()
        if now - self.start >= self.window_s:
            self.last = self.count / (now - self.start)
            self.start, self.count = now, 0
        self.count += n

    def per_s(self) -> float:
        elapsed = time.monotonic() - self.start
        if elapsed >= 2 * self.window_s:
            return 0.0
        return max(self.last, self.count / max(elapsed, 1e-3) if elapsed > 0.1 else 0.0)


class ClaimSizer:
    def __init__(
        self,
        settings: Settings,
        holders: Callable[[], Iterable[Holder]],
        holdings: Holdings,
        pause: ClaimPause,
    ) -> None:
        self.settings = settings
        self.holders = holders
        self.holdings = holdings
        self.pause = pause
        self.rate = Rate()  # outcomes per second, recently
        self.live_nodes = 1  # nodes sharing --api-max-inflight (from the heartbeat)

    def apply_settings(self, settings: Settings) -> None:
        self.settings = settings

    def note_live_nodes(self, n: int) -> None:
        self.live_nodes = n

    def inflight_share(self) -> int | None:
        """This node's share of the cluster's --api-max-inflight; None without one."""
        cap = self.settings.api_max_inflight
        return max(1, cap // max(1, self.live_nodes)) if cap else None

    def capacity(self) -> tuple[int, int]:
        """(free slots now, how many jobs the buffer should hold besides)."""
        free = total = held = 0
        for h in self.holders():
            f = h.free_slots()
            free += f
            held += len(h.jobs)
            total += f + len(h.jobs)
        share = self.inflight_share()
        if share is not None:
            free = max(0, min(free, share - held))
        spare = max(
            math.ceil(total * self.settings.prefetch), math.ceil(self.rate.per_s() * BUFFER_S)
        )
        return free, min(spare, MAX_BUFFER)

    def claim_size(self, queue_empty: bool) -> int:
        """How many to claim now (0: not worth a round trip, or nothing to ask for)."""
        if queue_empty or self.pause.active():
            return 0
        free, spare = self.capacity()
        held = len(self.holdings.buffer) + len(self.holdings.suspects)
        if self.pause.probe:  # after a pause: one job at a time until one succeeds
            return max(0, 1 - held - self.holdings.with_workers())
        want = free + spare - held
        # no dribbling: a claim is worth a round trip once a quarter of the target is gone
        if want < max(1, min(self.settings.claim_batch, free + spare) // 4):
            return 0
        return min(want, self.settings.claim_batch)
