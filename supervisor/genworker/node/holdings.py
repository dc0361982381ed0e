"""Which jobs this node holds, and where each one is.

A claimed job is in exactly one place until its outcome is written or it is given back:
the buffer (or the suspects, if it was running when a worker died), a worker, the cache
gate (waiting for a twin that runs), or the writer (its outcome not written yet). The
lease renewal renews exactly these; a worker's death gives back exactly its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from genworker.buffer import UrgencyBuffer
from genworker.model import Job, Outcome
from genworker.node.dedupe import CacheGate

Done = tuple[Outcome, int]  # an outcome to write, and the attempt its job was on


class Holder(Protocol):
    """A worker as the feeder sees it."""

    slot: int
    jobs: dict[int, Job]

    def free_slots(self) -> int: ...
    def send_jobs(self, jobs: list[Job]) -> bool: ...
    def holds_suspect(self) -> bool: ...


class Holdings:
    def __init__(self, holders: Callable[[], Iterable[Holder]]) -> None:
        self.holders = holders
        # Claimed jobs waiting for a slot, most urgent first (the claim's order key): a Free
        # job claimed after buffered Pro jobs goes out before them, as in the database.
        self.buffer = UrgencyBuffer()
        # Jobs that were in flight when a worker died: each runs alone on a worker, so a
        # poison job among them cannot take its neighbours down with it a second time.
        self.suspects: deque[Job] = deque()
        self.gate: CacheGate | None = None  # with --cache: twins wait here for their leader
        self.pending: list[Done] = []  # outcomes waiting for the writer
        self.writing: list[Done] = []  # the batch being written now

    def attach_gate(self, gate: CacheGate) -> None:
        self.gate = gate

    def claimed(self, jobs: Iterable[Job]) -> None:
        """New from the queue: a job that already killed a worker waits as a suspect."""
        for job in jobs:
            (self.suspects if job.deaths else self.buffer).append(job)

    def ids(self) -> list[int]:
        """Every job this node holds: buffered, with a worker, waiting for a running twin,
        or with its outcome not yet written. Only these leases are renewed: a job the
        node lost track of (a claim whose answer never came back, a release that failed)
        expires and goes back to the queue instead of being kept forever."""
        ids = [j.job_id for j in self.buffer]
        ids += [j.job_id for j in self.suspects]
        for h in self.holders():
            ids += h.jobs
        if self.gate is not None:
            ids += self.gate.waiting_ids()
        ids += [o.job_id for o, _ in self.pending]
        ids += [o.job_id for o, _ in self.writing]
        return ids

    def with_workers(self) -> int:
        return sum(len(h.jobs) for h in self.holders())

    def waiting(self) -> int:
        """Claimed and not started: buffered, suspects, and twins waiting for a leader."""
        followers = self.gate.waiting() if self.gate is not None else 0
        return len(self.buffer) + len(self.suspects) + followers

    def take_unstarted(self) -> list[Job]:
        """Everything claimed and not started, taken out (to give back at shutdown)."""
        jobs = [*self.buffer, *self.suspects]
        self.buffer.clear()
        self.suspects.clear()
        if self.gate is not None:
            jobs += self.gate.take_all()
        return jobs

    def leave_worker(self, h: Holder) -> list[Job]:
        """A dead worker's jobs: it holds them no more."""
        jobs = list(h.jobs.values())
        h.jobs.clear()
        return jobs
