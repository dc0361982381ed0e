"""A provider outage is a node condition, not a job failure.

A call that never reached the provider (connection refused, DNS, TLS, connect timeout)
says nothing about its job: the worker marks its outcome `UNREACHABLE` and the node
snoozes the job instead of spending an attempt. A run of such failures across the
node's workers, with no success in between, is an outage: claims pause, the buffer is
given back, and after each pause one job probes the provider, the pauses growing from
PROBE_FIRST_S to PROBE_MAX_S, until a call gets through.
"""

from __future__ import annotations

import time

from genworker.model import PROVIDER_UNREACHABLE as UNREACHABLE

ALARM = "provider_down"
__all__ = ["ALARM", "UNREACHABLE", "ProviderWatch"]

FAILURES = 5  # consecutive unreachable calls, node-wide, that make an outage
PROBE_FIRST_S = 2.0
PROBE_MAX_S = 15.0


class ProviderWatch:
    """Counts unreachable calls in a row and says when an outage starts and ends."""

    def __init__(self, failures: int = FAILURES) -> None:
        self.failures = failures
        self.streak = 0
        self.down_since: float | None = None  # monotonic
        self.probes = 0  # failed probes in this outage: the next pause doubles
        self.kinds: set[str] = set()  # job kinds whose calls were unreachable

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def unreachable(self, kind: str) -> bool:
        """One more call that did not get through; True when this one starts an outage."""
        self.kinds.add(kind)
        self.streak += 1
        if self.down or self.streak < self.failures:
            return False
        self.down_since = time.monotonic()
        self.probes = 0
        return True

    def succeeded(self, kind: str) -> bool:
        """A job succeeded; True when it ends an outage. Only kinds that have reached for
        the provider count (a noop job proves nothing about it)."""
        if kind not in self.kinds:
            return False
        self.streak = 0
        if not self.down:
            return False
        self.down_since = None
        return True

    def next_pause_s(self) -> float:
        """How long to pause before the next probe (doubling, capped)."""
        pause = min(PROBE_FIRST_S * 2**self.probes, PROBE_MAX_S)
        self.probes += 1
        return pause
