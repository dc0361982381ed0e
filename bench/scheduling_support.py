"""Scheduling benchmark helpers: seeded workloads, a replayer that submits each task at its
arrival time to a real node, the figures (slot utilisation while work waits, completion
percentiles), two deterministic models to compare with (shortest-remaining-first and the
old one-task-per-worker design), and the charts.

Times read back from the database are PostgreSQL's clock; job start and end come from the
workers (`bench.sched_handler`). Everything runs on one machine, so they agree.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from genworker.demo.baseline import Latency, replay_old_design
from genworker.queue.client import Client

from .harness import node, sim_api, wait_until

SIZES = {"free": 2, "start": 30, "pro": 70}
WARM_UP = "warm-up"  # the tenant of the jobs that warm a node up; left out of every figure
WARM_UP_JOBS = 200
PRIORITY = {"free": 0, "start": 1, "pro": 2}
WORKERS, SLOTS_PER_WORKER = 8, 5
SLOTS = WORKERS * SLOTS_PER_WORKER


@dataclass(frozen=True)
class Arrival:
    at_s: float  # seconds after the replay starts
    plan: str
    n: int
    tenant: str


@dataclass(frozen=True)
class TaskDone:
    id: int
    plan: str
    tenant: str
    n: int
    created: float  # epoch seconds
    finished: float

    @property
    def completion_s(self) -> float:
        return self.finished - self.created


@dataclass(frozen=True)
class JobDone:
    task_id: int
    created: float  # submitted (epoch seconds)
    claimed: float  # (first) claimed by a node
    t0: float  # its API call started, in a worker
    t1: float  # and ended
    finished: float  # its outcome written


@dataclass(frozen=True)
class Run:
    tasks: list[TaskDone]
    jobs: list[JobDone]
    wall_s: float  # first submit to last task finished, as the replayer saw it


# ------------------------------------------------------------------ workloads


def poisson(rng: random.Random, every_s: float, until_s: float) -> Iterator[float]:
    """Arrival times of a Poisson stream with mean gap every_s, up to until_s."""
    t = rng.expovariate(1 / every_s)
    while t < until_s:
        yield round(t, 4)
        t += rng.expovariate(1 / every_s)


def morning(seed: int = 1, scale: float = 1.0) -> list[Arrival]:
    """Ten Pro tasks at once (ten customers), Free and Start tasks arriving steadily for 2 s
    (a Free task every 25 ms, a Start task every 250 ms on average): about 2.7 s of work for
    40 slots at L = 100 ms. `scale` stretches its clock (for another L)."""
    rng = random.Random(seed)
    out = [Arrival(0.0, "pro", 70, f"pro-{i}") for i in range(10)]
    for plan, every_s in (("free", 0.025), ("start", 0.25)):
        out += [
            Arrival(round(t * scale, 4), plan, SIZES[plan], f"{plan}-{i}")
            for i, t in enumerate(poisson(rng, every_s, 2.0))
        ]
    return sorted(out, key=lambda a: a.at_s)


def flood(rate_per_s: float, until_s: float, pro_at_s: float, seed: int = 2) -> list[Arrival]:
    """Free tasks arriving at rate_per_s for until_s, one Pro task at pro_at_s."""
    rng = random.Random(seed)
    out = [
        Arrival(t, "free", 2, f"free-{i}")
        for i, t in enumerate(poisson(rng, 1 / rate_per_s, until_s))
    ]
    out.append(Arrival(pro_at_s, "pro", 70, "pro-waiting"))
    return sorted(out, key=lambda a: a.at_s)


# ------------------------------------------------------------------ a real node


@contextlib.contextmanager
def scheduling_node(
    dsn: str, tmp: Path, monkeypatch: pytest.MonkeyPatch, latency_ms: float, *args: str
) -> Iterator[Any]:
    """The simulated API and one node (8 workers x 5 slots) whose image jobs are timed."""
    jitter = str(latency_ms / 5)
    with sim_api("--latency-ms", str(latency_ms), "--jitter-ms", jitter) as url:
        monkeypatch.setenv("GENWORKER_API_URL", url)
        monkeypatch.setenv("GENWORKER_OUTPUT_DIR", str(tmp / "out"))
        flags = ["--workers", str(WORKERS), "--concurrency", str(SLOTS_PER_WORKER)]
        flags += ["--handler", "image=bench.sched_handler:timed_image", *args]
        with node(dsn, *flags, log_dir=tmp) as n:
            wait_until(lambda: n.ready_workers() == WORKERS, 90, f"{WORKERS} workers ready")
            warm_up(dsn)
            yield n


def warm_up(dsn: str) -> None:
    """Run a few image jobs first, as on a node that has been up a while: each worker's
    first call opens its connection to the API (and builds the timed handler), and quick
    calls give a worker a second job behind each slot after 20 calls (workers.py)."""
    with Client(dsn) as client, psycopg.connect(dsn, autocommit=True) as conn:
        n = -(-WARM_UP_JOBS // 70)
        client.submit_many([{"plan": "pro", "tenant": WARM_UP, "params": {"prompt": "p"}}] * n)
        unfinished = "SELECT count(*) FROM genworker.tasks WHERE finished_at IS NULL"
        wait_until(lambda: conn.execute(unfinished).fetchone()[0] == 0, 120, "warmed up")  # type: ignore[index]


def replay(dsn: str, arrivals: Sequence[Arrival], timeout_s: float = 300) -> Run:
    """Submit each task at its arrival time (tasks due together in one transaction), wait
    until all are finished, and read back every task and job."""
    with Client(dsn) as client, psycopg.connect(dsn, autocommit=True) as conn:
        start = time.monotonic()
        due = list(arrivals)
        while due:
            now = time.monotonic() - start
            batch = [a for a in due if a.at_s <= now]
            if batch:
                due = due[len(batch) :]
                client.submit_many(
                    [
                        {"plan": a.plan, "n": a.n, "tenant": a.tenant, "params": {"prompt": "p"}}
                        for a in batch
                    ]
                )
            else:
                time.sleep(min(0.002, due[0].at_s - now))
        finished = (
            "SELECT count(*) FROM genworker.tasks WHERE finished_at IS NOT NULL AND tenant <> %s"
        )
        wait_until(
            lambda: conn.execute(finished, (WARM_UP,)).fetchone()[0] == len(arrivals),  # type: ignore[index]
            timeout_s,
            "every task finished",
            every_s=0.05,
        )
        wall = time.monotonic() - start
        return Run(_tasks(conn), _jobs(conn), wall)


def _tasks(conn: psycopg.Connection) -> list[TaskDone]:
    rows = conn.execute(
        "SELECT id, plan, tenant, n_jobs, extract(epoch FROM created_at)::float8,"
        "       extract(epoch FROM finished_at)::float8"
        "  FROM genworker.tasks WHERE status = 'succeeded' AND tenant <> %s ORDER BY id",
        (WARM_UP,),
    ).fetchall()
    return [TaskDone(*r) for r in rows]


def _jobs(conn: psycopg.Connection) -> list[JobDone]:
    rows = conn.execute(
        "SELECT task_id, extract(epoch FROM created_at)::float8,"
        "       extract(epoch FROM started_at)::float8,"
        "       (result ->> 't0')::float8, (result ->> 't1')::float8,"
        "       extract(epoch FROM finished_at)::float8"
        "  FROM genworker.jobs WHERE status = 'succeeded' AND tenant <> %s",
        (WARM_UP,),
    ).fetchall()
    return [JobDone(*r) for r in rows]


# ------------------------------------------------------------------ figures


def quantile(xs: Sequence[float], q: float) -> float:
    """The q-quantile (inclusive method); the value itself for one sample."""
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(sorted(xs), n=100, method="inclusive")[round(q * 100) - 1]


def utilisation(jobs: Sequence[JobDone], slots: int) -> dict[str, float]:
    """Busy slot-seconds over available ones: while some submitted job waits for a slot (the
    aim), and from the first submit to the last call's end (overall)."""
    events: list[tuple[float, int, int]] = []
    for j in jobs:
        events += [(j.created, 1, 0), (j.t0, -1, 1), (j.t1, 0, -1)]
    events.sort()
    waiting = busy = 0
    last = events[0][0]
    busy_waiting = span_waiting = busy_all = 0.0
    for t, d_waiting, d_busy in events:
        dt = t - last
        busy_all += busy * dt
        if waiting > 0:
            span_waiting += dt
            busy_waiting += busy * dt
        waiting, busy, last = waiting + d_waiting, busy + d_busy, t
    span_all = events[-1][0] - events[0][0]
    return {
        "while_waiting": round(busy_waiting / (slots * span_waiting), 4),
        "waiting_s": round(span_waiting, 3),
        "overall": round(busy_all / (slots * span_all), 4),
    }


def phases(run: Run, plan: str) -> dict[str, float]:
    """Median seconds a job of the plan spent in each step: waiting to be claimed, claimed
    but waiting for a worker's slot (node buffer, worker queue), in its call, and until its
    outcome was written."""
    plans = {t.id: t.plan for t in run.tasks}
    jobs = [j for j in run.jobs if plans[j.task_id] == plan]
    steps = {
        "to_claim": [j.claimed - j.created for j in jobs],
        "to_call": [j.t0 - j.claimed for j in jobs],
        "call": [j.t1 - j.t0 for j in jobs],
        "to_written": [j.finished - j.t1 for j in jobs],
    }
    return {k: round(statistics.median(v), 4) for k, v in steps.items()}


# ------------------------------------------------------------------ models


def serve_model(
    arrivals: Sequence[Arrival],
    slots: int,
    latency_s: float,
    key: Callable[[int, int], tuple[float, ...]],
) -> list[float]:
    """Completion time of each task when `slots` servers take one job at a time, each
    lasting latency_s, always from the task with the smallest key(task, jobs left)."""
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i].at_s)
    left = [a.n for a in arrivals]
    finish = [0.0] * len(arrivals)
    free = [0.0] * slots
    pending: list[tuple[tuple[float, ...], int]] = []
    k, jobs = 0, sum(left)
    while jobs:
        t = heapq.heappop(free)
        if not pending:
            t = max(t, arrivals[order[k]].at_s)
        while k < len(order) and arrivals[order[k]].at_s <= t:
            heapq.heappush(pending, (key(order[k], left[order[k]]), order[k]))
            k += 1
        _, i = heapq.heappop(pending)
        left[i] -= 1
        jobs -= 1
        finish[i] = max(finish[i], t + latency_s)
        if left[i]:
            heapq.heappush(pending, (key(i, left[i]), i))
        heapq.heappush(free, t + latency_s)
    return [finish[i] - a.at_s for i, a in enumerate(arrivals)]


def srpt_model(arrivals: Sequence[Arrival], slots: int, latency_s: float) -> list[float]:
    """Shortest remaining work first (fewest jobs left, then arrival), any plan: the
    reference for mean completion time."""
    return serve_model(arrivals, slots, latency_s, lambda i, left: (left, arrivals[i].at_s, i))


def old_design_model(arrivals: Sequence[Arrival], latency_s: float, jitter_s: float) -> list[float]:
    """The old design (8 workers, one whole task each, 5 calls in flight, FIFO), from the
    demo's deterministic model with the same latency."""
    replay = replay_old_design(
        [(a.at_s, a.n) for a in arrivals], Latency(latency_s, jitter_s, seed=1)
    )
    return [t.completion_s for t in replay.tasks]


def mean_of(plan: str, arrivals: Sequence[Arrival], completions: Sequence[float]) -> float:
    return statistics.fmean(c for a, c in zip(arrivals, completions, strict=True) if a.plan == plan)


def work_time_alone(n: int, slots: int, latency_s: float) -> float:
    """A task's completion on an otherwise idle cluster: rounds of `slots` calls."""
    return math.ceil(n / slots) * latency_s
