"""Helpers for the queue tests: drive the async Queue from plain tests, read rows back,
and move the clock of a row instead of sleeping (leases and run_after are timestamps)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from genworker.queue.store import Queue
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool


class SyncQueue:
    """The real `Queue` over its own pool; every method call runs to completion on a
    private event loop, so a test reads top to bottom. Nothing is re-implemented."""

    def __init__(self, dsn: str, **queue_kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = AsyncConnectionPool(
            dsn, min_size=1, max_size=2, open=False, kwargs={"autocommit": True}
        )
        self.loop.run_until_complete(self.pool.open(wait=True, timeout=10))
        self.queue = Queue(self.pool, **queue_kw)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.queue, name)
        return lambda *args, **kw: self.loop.run_until_complete(method(*args, **kw))

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.close())
        self.loop.close()


@contextmanager
def sync_queue(dsn: str, **queue_kw: Any) -> Iterator[SyncQueue]:
    q = SyncQueue(dsn, **queue_kw)
    try:
        yield q
    finally:
        q.close()


def counts(conn: psycopg.Connection) -> tuple[int, int]:
    """(tasks, jobs) rows in the database."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM genworker.tasks), (SELECT count(*) FROM genworker.jobs)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def job_row(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM genworker.jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None, f"no job {job_id}"
    return row


def task_row(conn: psycopg.Connection, task_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM genworker.tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None, f"no task {task_id}"
    return row


def expire_leases(conn: psycopg.Connection, job_ids: list[int] | None = None) -> int:
    """Let leases run out now: the same state as a lease nobody renewed."""
    cur = conn.execute(
        "UPDATE genworker.jobs SET lease_expires = now() - interval '1 second'"
        " WHERE status = 'running' AND (%(ids)s::bigint[] IS NULL OR id = ANY (%(ids)s))",
        {"ids": job_ids},
    )
    return cur.rowcount


def make_due(conn: psycopg.Connection) -> int:
    """Bring every scheduled job's run_after into the past."""
    cur = conn.execute(
        "UPDATE genworker.jobs SET run_after = now() - interval '1 second'"
        " WHERE status = 'scheduled'"
    )
    return cur.rowcount
