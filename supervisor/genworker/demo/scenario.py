"""The old system's busiest morning, as a seeded list of arrivals.

Ten users buy Pro at the same moment (the report's "10 users arrive
together"), while Free and Start users keep arriving at random moments over
a window: the small tasks that the old design queued behind the big ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Arrival:
    at_s: float  # seconds after the replay starts
    plan: str
    tenant: str


@dataclass(frozen=True)
class Morning:
    pro: int = 10
    free: int = 20
    start: int = 6
    window_s: float = 30.0
    seed: int = 1

    def arrivals(self) -> list[Arrival]:
        """Every task of the morning in arrival order (stable for a given seed)."""
        rng = random.Random(self.seed)
        out = [Arrival(0.0, "pro", f"pro-user-{i + 1}") for i in range(self.pro)]
        trickle = [("free", self.free), ("start", self.start)]
        for plan, i in ((plan, i) for plan, n in trickle for i in range(n)):
            # uniform over the window: a Poisson stream seen after the fact
            at = round(rng.uniform(0.0, self.window_s), 3) if self.window_s > 0 else 0.0
            out.append(Arrival(at, plan, f"{plan}-user-{i + 1}"))
        out.sort(key=lambda a: a.at_s)  # stable: at equal times, Pro first
        return out

    @property
    def tasks(self) -> int:
        return self.pro + self.free + self.start
