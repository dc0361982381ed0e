"""What a node reads for /metrics and the alarms, and how often.

Three sources, three costs:
- shared memory and the supervisor's own bookkeeping: free, read at every scrape;
- the DB pool's statistics (psycopg_pool `get_stats`): free, sampled every second;
- the database (queue depth, oldest runnable job, finished tasks): read by one
  background loop every FIGURES_S, never by a scrape, so a scrape storm cannot load
  the database and a scrape never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from psycopg_pool import AsyncConnectionPool

from genworker import channels as ch
from genworker.ops.metrics import GenworkerMetrics, bucket_index
from genworker.queue import sql
from genworker.queue.db import DB_ERRORS

log = logging.getLogger("genworker.ops")

FIGURES_S = 5.0  # the database figures are this fresh at best
FIGURES_TIMEOUT_S = 2.0  # a figure query waits at most this long for a connection
FINISHED_OVERLAP_S = 10.0  # re-read this far back: a task's finished_at is its transaction's start
FINISHED_BATCH = 1000
FINISHED_PAGES = 10

# API outcomes that say the provider is struggling (the error-rate alarm); a 400 is the
# prompt's fault and a 401 has its own alarm, so plain 4xx count as calls, not errors.
API_OVERLOAD = ("api_429", "api_5xx", "api_timeout", "api_conn")
API_CALLS = ("api_2xx", "api_4xx", *API_OVERLOAD)
CRASHES = ("exit", "signal", "heartbeat_timeout")


READY = "ready"  # a worker that takes jobs (node.handles.State.READY, a StrEnum, equals it)


class Worker(Protocol):
    """A live worker as the readings see it (node.handles.WorkerHandle)."""

    @property
    def position(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def jobs(self) -> Mapping[int, object]: ...

    def counter(self, index: int) -> float: ...


class JobCounts(Protocol):
    """The supervisor's job counters (node.stats.FeederStats)."""

    @property
    def claimed(self) -> int: ...
    @property
    def succeeded(self) -> int: ...
    @property
    def retried(self) -> int: ...
    @property
    def dead(self) -> int: ...
    @property
    def released(self) -> int: ...
    @property
    def renewed(self) -> int: ...
    @property
    def reaped(self) -> int: ...


class Feeding(Protocol):
    """The node's database side as the readings see it (node.feeder.Feeder)."""

    @property
    def pool(self) -> AsyncConnectionPool: ...
    @property
    def db_ok(self) -> bool: ...
    @property
    def db_problem(self) -> str: ...
    @property
    def stats(self) -> JobCounts: ...
    @property
    def live_nodes(self) -> int: ...

    def jobs_held(self) -> Mapping[str, int]: ...


class Node(Protocol):
    """The parts of the supervisor (node.arbiter.Arbiter) the readings use."""

    @property
    def retired(self) -> Sequence[float]: ...
    @property
    def restarts_by_reason(self) -> Mapping[str, int]: ...
    @property
    def stops_by_reason(self) -> Mapping[str, int]: ...
    @property
    def target(self) -> int: ...

    def live_handles(self) -> Sequence[Worker]: ...
    def totals(self) -> dict[str, float]: ...


# ----------------------------------------------------------- database figures


@dataclass
class DbFigures:
    """The database's view of the queue, refreshed by `loop`; `at` is when (monotonic)."""

    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (plan, state) -> n
    tasks: dict[str, int] = field(default_factory=dict)  # state -> n
    oldest_runnable_s: float = 0.0
    at: float | None = None
    since: datetime | None = None  # finished-task watermark
    seen: dict[int, datetime] = field(default_factory=dict)  # finished tasks near the watermark
    # (plan, status, seconds) of finished tasks, unread
    finished: list[tuple[str, str, float]] = field(default_factory=list)

    @property
    def queued_tasks(self) -> int:
        return self.tasks.get("queued", 0)

    async def refresh(self, pool: AsyncConnectionPool) -> None:
        async with pool.connection(timeout=FIGURES_TIMEOUT_S) as conn:
            jobs = await (await conn.execute(sql.query("queue_depth"))).fetchall()
            tasks = await (await conn.execute(ops_query("task_depth"))).fetchall()
            row = await (await conn.execute(ops_query("oldest_runnable"))).fetchone()
            if self.since is None:
                now_row = await (await conn.execute(ops_query("db_now"))).fetchone()
                assert now_row is not None
                self.since = now_row[0]
            for _ in range(FINISHED_PAGES):  # the rest, if any, at the next refresh
                params = {
                    "since": self.since - timedelta(seconds=FINISHED_OVERLAP_S),
                    "seen": list(self.seen),
                    "limit": FINISHED_BATCH,
                }
                cur = await conn.execute(ops_query("finished_tasks"), params)
                finished = await cur.fetchall()
                self._take_finished(finished)
                if len(finished) < FINISHED_BATCH:
                    break
        self.jobs = {(plan, state): int(n) for plan, state, n in jobs}
        self.tasks = {state: int(n) for state, n in tasks}
        self.oldest_runnable_s = max(0.0, float(row[0])) if row and row[0] is not None else 0.0
        self.at = time.monotonic()

    def _take_finished(self, rows: Iterable[tuple[int, str, float, datetime, str]]) -> None:
        assert self.since is not None
        for task_id, plan, took_s, finished_at, status in rows:
            if task_id in self.seen or finished_at <= self.since - timedelta(
                seconds=FINISHED_OVERLAP_S
            ):
                continue
            self.seen[task_id] = finished_at
            self.finished.append((plan, status, float(took_s)))
            self.since = max(self.since, finished_at)
        horizon = self.since - timedelta(seconds=FINISHED_OVERLAP_S)
        self.seen = {i: t for i, t in self.seen.items() if t > horizon}

    async def loop(self, pool: AsyncConnectionPool, stop: asyncio.Event) -> None:
        """Refresh every FIGURES_S until `stop`; a database away keeps the last figures."""
        while not stop.is_set():
            try:
                await self.refresh(pool)
            except DB_ERRORS as e:
                log.debug("queue figures not refreshed: %s", type(e).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FIGURES_S)


def ops_query(name: str) -> str:
    """A block of queue/sql/ops.sql (the one SQL loader finds it by name)."""
    return sql.query(name)


# ------------------------------------------------------------ pool statistics


@dataclass
class PoolWaits:
    """The DB pool's waits, from psycopg_pool's cumulative counters sampled every second.

    `longest_s` is what the db_wait alarm watches: the mean wait of the requests that
    queued since the last sample, or, while requests keep waiting, how long they have
    (the pool keeps no per-request times)."""

    counts: list[int]
    total_s: float = 0.0
    last: dict[str, int] = field(default_factory=dict)
    waiting_since: float | None = None
    size: int = 0
    idle: int = 0

    @classmethod
    def for_buckets(cls, n_bounds: int) -> PoolWaits:
        return cls(counts=[0] * (n_bounds + 1))

    def sample(self, stats: Mapping[str, int], now: float, bounds: tuple[float, ...]) -> float:
        """Take one reading of `pool.get_stats()`; returns the wait to feed the alarm."""

        def delta(key: str) -> int:
            value = int(stats.get(key, 0))
            d = max(0, value - self.last.get(key, 0))
            self.last[key] = value
            return d

        requests, queued = delta("requests_num"), delta("requests_queued")
        wait_s = delta("requests_wait_ms") / 1000
        self.size, self.idle = int(stats.get("pool_size", 0)), int(stats.get("pool_available", 0))
        self.counts[0] += max(0, requests - queued)  # served at once
        mean = wait_s / queued if queued else 0.0
        if queued:
            self.counts[bucket_index(bounds, mean)] += queued
        self.total_s += wait_s
        if stats.get("requests_waiting", 0):
            self.waiting_since = self.waiting_since if self.waiting_since is not None else now
        else:
            self.waiting_since = None
        still = 0.0 if self.waiting_since is None else now - self.waiting_since
        return max(mean, still)


# -------------------------------------------------------------------- collect


def counter_sum(node: Node, index: int) -> float:
    """One shared-memory counter over every worker this node ran, live and gone."""
    return node.retired[index] + sum(h.counter(index) for h in node.live_handles())


def latency_counts(node: Node) -> tuple[list[int], float]:
    """The workers' cumulative latency buckets as per-bucket counts (+Inf last), and the sum."""
    cumulative = [
        int(counter_sum(node, ch.LATENCY_BUCKET0 + i)) for i in range(len(ch.LATENCY_BUCKETS_S))
    ]
    total = int(counter_sum(node, ch.LATENCY_COUNT))
    counts = [cumulative[0]] + [b - a for a, b in itertools.pairwise(cumulative)]
    counts.append(max(0, total - (cumulative[-1] if cumulative else 0)))
    return [max(0, c) for c in counts], counter_sum(node, ch.LATENCY_SUM)


def collect_node(m: GenworkerMetrics, node: Node, feeder: Feeding) -> None:
    """Set every metric this node knows without asking the database."""
    st = feeder.stats
    m.jobs_claimed.set_total(st.claimed)
    m.jobs_succeeded.set_total(st.succeeded)
    m.jobs_retried.set_total(st.retried)
    m.jobs_dead.set_total(st.dead)
    m.jobs_released.set_total(st.released)
    m.leases_renewed.set_total(st.renewed)
    m.leases_expired.set_total(st.reaped)
    m.jobs_in_flight.replace({(where,): n for where, n in feeder.jobs_held().items()})
    t = {k: int(v) for k, v in node.totals().items()}
    m.api_responses.labels("2xx").set_total(t["api_2xx"])
    m.api_responses.labels("4xx").set_total(t["api_4xx"] + t["api_429"])
    m.api_responses.labels("5xx").set_total(t["api_5xx"])
    m.api_responses.labels("error").set_total(t["api_timeout"] + t["api_conn"])
    m.api_rate_limited.set_total(t["api_429"])
    counts, total_s = latency_counts(node)
    m.api_call.set_counts(counts, total_s)
    limits: dict[tuple[object, ...], float] = {}
    busy: dict[tuple[object, ...], float] = {}
    for h in node.live_handles():
        if h.state != READY:
            continue
        limit = int(h.counter(ch.LIMIT))
        limits[(h.position,)] = limit
        busy[(h.position,)] = min(int(h.counter(ch.INFLIGHT)), limit)
    m.slot_limit.replace(limits)
    m.slots_busy.replace(busy)
    m.workers_up.set(len(limits))
    for reason in (*CRASHES, "recycle", "reload"):
        n = node.restarts_by_reason.get(reason, 0) + node.stops_by_reason.get(reason, 0)
        m.worker_restarts.labels(reason=reason).set_total(n)
    m.nodes.set(feeder.live_nodes)


QUEUE_STATES = ("queued", "scheduled", "running")  # what queue_depth counts


def collect_figures(m: GenworkerMetrics, figures: DbFigures, plans: Iterable[str] = ()) -> None:
    # every plan x state, zeros included, once read: an empty queue is 0, not a gap
    depth: dict[tuple[object, ...], float] = {}
    if figures.at is not None:
        depth.update(((plan, state), 0) for plan in plans for state in QUEUE_STATES)
    depth.update({key: n for key, n in figures.jobs.items()})
    m.queue_jobs.replace(depth)
    m.queue_tasks.replace(
        {(state,): figures.tasks.get(state, 0) for state in ("queued", "running")}
    )
    m.oldest_runnable_age.set(figures.oldest_runnable_s)
    for plan, status, took_s in figures.finished:
        m.task_completion.labels(plan, status).observe(took_s)
    figures.finished.clear()


def collect_pool(m: GenworkerMetrics, waits: PoolWaits) -> None:
    m.db_pool_wait.set_counts(waits.counts, waits.total_s)
    m.db_pool_connections.replace({("idle",): waits.idle, ("busy",): waits.size - waits.idle})
