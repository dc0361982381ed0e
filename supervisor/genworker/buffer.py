"""Buffers of claimed jobs, handed out most urgent first: the supervisor's, and a worker's
queue behind its busy slots.

Claims arrive in batches; a Free job claimed after a batch of Pro jobs must still go to the
next free slot before them, as it would have in the database. So a buffer is a heap on the
claim's order key (urgency, then task, then job: the runnable index's order), not a FIFO of
claims. It offers the few deque methods its users call.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

from genworker.model import Job


class UrgencyBuffer:
    """Claimed jobs waiting for a slot; `popleft` gives the most urgent one."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Job]] = []  # job_id is unique: Jobs never compare

    def append(self, job: Job) -> None:
        heapq.heappush(self._heap, (job.urgency, job.task_id, job.job_id, job))

    def extend(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self.append(job)

    def extendleft(self, jobs: Iterable[Job]) -> None:
        """Put jobs back (a refused hand-over, a twin's result): a job's place is its key."""
        self.extend(jobs)

    def popleft(self) -> Job:
        return heapq.heappop(self._heap)[3]

    def clear(self) -> None:
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self) -> Iterator[Job]:
        """Every buffered job, in no particular order (to give them all back)."""
        return (entry[3] for entry in self._heap)
