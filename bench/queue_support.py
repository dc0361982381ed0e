"""Queue benchmark helpers: bulk loading, the real Queue driven step by step, timings."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Coroutine
from typing import Any, TypeVar

import psycopg
from genworker.queue.store import Queue
from psycopg_pool import AsyncConnectionPool

T = TypeVar("T")


def load_tasks(
    conn: psycopg.Connection,
    *,
    tasks: int,
    jobs_per_task: int,
    tenants: int = 1,
    finished: bool = False,
) -> None:
    """Insert tasks and their jobs in two INSERT ... SELECT statements (no per-row round
    trips): runnable ones as submit_task leaves them, or finished ones as a drained queue
    leaves them (succeeded, a result each)."""
    status, job_status = ("succeeded", "succeeded") if finished else ("queued", "queued")
    conn.execute(
        """
        INSERT INTO genworker.tasks (tenant, plan, kind, params, priority, n_jobs, n_succeeded,
                                     status, created_at, started_at, finished_at)
        SELECT 'tenant-' || (g %% %(tenants)s), 'bench', 'noop', '{}', 1, %(per)s,
               CASE WHEN %(finished)s THEN %(per)s ELSE 0 END, %(status)s,
               now() - interval '1 day' + g * interval '1 ms',
               CASE WHEN %(finished)s THEN now() - interval '1 day' END,
               CASE WHEN %(finished)s THEN now() - interval '1 day' END
          FROM generate_series(1, %(tasks)s) g
        """,
        {
            "tasks": tasks,
            "per": jobs_per_task,
            "tenants": tenants,
            "finished": finished,
            "status": status,
        },
    )
    conn.execute(
        """
        INSERT INTO genworker.jobs (task_id, idx, tenant, kind, status, urgency, attempts,
                                    max_attempts, token, result, created_at, started_at,
                                    finished_at, run_after)
        SELECT t.id, i, t.tenant, t.kind, %(job_status)s,
               extract(epoch FROM t.created_at) + t.priority * 600,
               CASE WHEN %(finished)s THEN 1 ELSE 0 END, 5,
               CASE WHEN %(finished)s THEN 1 ELSE 0 END,
               CASE WHEN %(finished)s THEN '{"ok": true}'::jsonb END,
               t.created_at, t.started_at, t.finished_at, t.created_at
          FROM genworker.tasks t CROSS JOIN generate_series(0, t.n_jobs - 1) i
         WHERE t.status = %(status)s AND NOT EXISTS (
               SELECT 1 FROM genworker.jobs j WHERE j.task_id = t.id)
        """,
        {"job_status": job_status, "finished": finished, "status": status},
    )


def vacuum_analyze(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("VACUUM ANALYZE")


class LoopQueue:
    """The real Queue over a one-connection pool, driven step by step from a benchmark."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = AsyncConnectionPool(
            dsn, min_size=1, max_size=1, open=False, kwargs={"autocommit": True}
        )
        self.loop.run_until_complete(self.pool.open(wait=True, timeout=10))
        self.queue = Queue(self.pool)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.close())
        self.loop.close()


def timing_summary(data_s: list[float]) -> dict[str, float]:
    """Milliseconds: fastest, median, p95 and mean of the per-round times."""
    ms = sorted(x * 1000 for x in data_s)
    p95 = statistics.quantiles(ms, n=20, method="inclusive")[18] if len(ms) > 1 else ms[0]
    return {
        "min_ms": round(ms[0], 3),
        "p50_ms": round(statistics.median(ms), 3),
        "p95_ms": round(p95, 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "rounds": len(ms),
    }
