"""What the supervisor counts of its jobs (read by /metrics, the title and the last line)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class FeederStats:
    claimed: int = 0
    succeeded: int = 0
    retried: int = 0
    dead: int = 0
    cancelled: int = 0
    released: int = 0
    renewed: int = 0
    reaped: int = 0
    claims: int = 0
    writes: int = 0
    first_claim_at: float | None = None
    by_status: dict[str, int] = field(default_factory=dict)

    def count_written(self, statuses: Iterable[str]) -> None:
        """One write's applied outcomes, by the status each job now has."""
        self.writes += 1
        for st in statuses:
            self.by_status[st] = self.by_status.get(st, 0) + 1
            if st == "succeeded":
                self.succeeded += 1
            elif st == "dead":
                self.dead += 1
            elif st == "scheduled":
                self.retried += 1
            elif st == "cancelled":
                self.cancelled += 1
