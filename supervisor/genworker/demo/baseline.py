"""The old design, as a small deterministic discrete-event model.

The system genworker replaces gave a whole task to one worker thread, which
kept up to 5 API calls of that task in flight until every image was done; 8
such workers took tasks from one FIFO queue. This model replays an arrival
list through that design with the simulated API's latency, so `genworker
demo` can show what the same morning would have looked like.

Per-task service is computed when a worker takes the task (FIFO: the task
waits for the first worker to free up), and inside a task the 5 calls behave
as a concurrency limiter: a slot starts the next image as soon as its call
returns. A failed call is redone at once by the same slot (the old client
retried in place, without backoff), so failures only ever favour the model.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass

OLD_WORKERS = 8
OLD_CALLS_PER_WORKER = 5


@dataclass(frozen=True)
class Latency:
    """API call latency: uniform in mean_s +- jitter_s, failures at fail_rate, seeded."""

    mean_s: float
    jitter_s: float = 0.0
    fail_rate: float = 0.0
    seed: int = 1


@dataclass(frozen=True)
class TaskRun:
    """When one task was taken by a worker and when its last image came back (seconds)."""

    arrival_s: float
    started_s: float
    finished_s: float
    images: int
    retries: int

    @property
    def wait_s(self) -> float:
        return self.started_s - self.arrival_s

    @property
    def completion_s(self) -> float:
        return self.finished_s - self.arrival_s


@dataclass(frozen=True)
class Replay:
    tasks: tuple[TaskRun, ...]
    busy_slot_s: float  # sum of the latencies of every call made
    slots: int

    @property
    def makespan_s(self) -> float:
        """First arrival to the last image."""
        if not self.tasks:
            return 0.0
        return max(t.finished_s for t in self.tasks) - min(t.arrival_s for t in self.tasks)


def replay_old_design(
    arrivals: Sequence[tuple[float, int]],
    latency: Latency,
    *,
    workers: int = OLD_WORKERS,
    calls_per_worker: int = OLD_CALLS_PER_WORKER,
) -> Replay:
    """Replay (arrival_s, images) tasks, in the given order, through the old design.

    Tasks are served in arrival order (ties keep the given order); the result
    keeps the order of `arrivals`.
    """
    if workers < 1 or calls_per_worker < 1:
        raise ValueError("workers and calls_per_worker must be at least 1")
    rng = random.Random(latency.seed)
    free_at = [(0.0, w) for w in range(workers)]  # (time the worker frees up, worker id)
    heapq.heapify(free_at)
    order = sorted(range(len(arrivals)), key=lambda i: (arrivals[i][0], i))
    runs: dict[int, TaskRun] = {}
    busy = 0.0
    for i in order:
        arrival_s, images = arrivals[i]
        worker_free_s, worker = heapq.heappop(free_at)
        started = max(arrival_s, worker_free_s)
        finished, task_busy, retries = _serve_task(started, images, calls_per_worker, latency, rng)
        busy += task_busy
        runs[i] = TaskRun(arrival_s, started, finished, images, retries)
        heapq.heappush(free_at, (finished, worker))
    return Replay(tuple(runs[i] for i in range(len(arrivals))), busy, workers * calls_per_worker)


def _serve_task(
    start_s: float, images: int, slots: int, latency: Latency, rng: random.Random
) -> tuple[float, float, int]:
    """One worker's task: `slots` calls in flight; returns (finish, busy slot-seconds, retries)."""
    slot_free = [start_s] * min(slots, max(images, 1))
    busy, retries, finished = 0.0, 0, start_s
    for _ in range(images):
        t = heapq.heappop(slot_free)
        while True:
            call = _draw(latency, rng)
            t += call
            busy += call
            if rng.random() >= latency.fail_rate:
                break
            retries += 1
        finished = max(finished, t)
        heapq.heappush(slot_free, t)
    return finished, busy, retries


def _draw(latency: Latency, rng: random.Random) -> float:
    return max(0.0, latency.mean_s + rng.uniform(-latency.jitter_s, latency.jitter_s))
