"""The database figures behind /metrics, read from a real database: queue depth by plan
and state, tasks waiting to start, the oldest runnable job, and every finished task
counted once, even when more than a page of them finish in one transaction."""

from __future__ import annotations

import asyncio

import psycopg
from genworker.ops.readings import FINISHED_BATCH, DbFigures
from genworker.queue.client import Client
from psycopg_pool import AsyncConnectionPool


def refresh(dsn: str, figures: DbFigures) -> None:
    async def main() -> None:
        async with AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool:
            await figures.refresh(pool)

    asyncio.run(main())


def test_queue_figures_and_finished_tasks_counted_once(
    dsn: str, client: Client, conn: psycopg.Connection
) -> None:
    figures = DbFigures()
    refresh(dsn, figures)  # the watermark starts now: nothing finished yet
    assert (figures.jobs, figures.tasks, figures.finished) == ({}, {}, [])

    client.submit("pro", "a backlog", n=3)
    n = FINISHED_BATCH + 200
    # more tasks of one tenant in one call than the submit limits let through by default
    conn.execute(
        "UPDATE genworker.settings SET value = CASE key WHEN 'max_bulk_tasks' THEN '5000'::jsonb "
        "ELSE '0'::jsonb END WHERE key IN ('max_bulk_tasks', 'max_queued_tasks_per_tenant')"
    )
    client.submit_many([{"plan": "free", "params": {"prompt": f"t{i}"}, "n": 1} for i in range(n)])
    conn.execute(
        "UPDATE genworker.jobs SET run_after = now() - interval '42 seconds' "
        "WHERE task_id = (SELECT min(id) FROM genworker.tasks)"
    )
    refresh(dsn, figures)
    assert figures.jobs == {("pro", "queued"): 3, ("free", "queued"): n}
    assert figures.tasks == {"queued": n + 1}
    assert figures.queued_tasks == n + 1
    assert 42 <= figures.oldest_runnable_s < 100

    # every free task finishes in one transaction: one finished_at for all of them
    with conn.transaction():
        conn.execute(
            "UPDATE genworker.jobs SET status = 'succeeded', finished_at = now() "
            "WHERE tenant = 'default' AND task_id > (SELECT min(id) FROM genworker.tasks)"
        )
        conn.execute(
            "UPDATE genworker.tasks SET status = 'succeeded', n_succeeded = n_jobs, "
            "finished_at = now() WHERE plan = 'free'"
        )
    refresh(dsn, figures)
    refresh(dsn, figures)  # read again: the overlap must not count anything twice
    assert len(figures.finished) == n
    assert {(plan, status) for plan, status, _ in figures.finished} == {("free", "succeeded")}
    assert figures.tasks == {"queued": 1}
    assert figures.jobs == {("pro", "queued"): 3}
