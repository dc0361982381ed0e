"""Submit and follow tasks from Python: `Client` (sync) and `AsyncClient`.

Both can run inside a web app's own transaction (pass `conn=`), use its pool
(`pool=`), or open their own connection from a DSN. The SQL function does the
validation and the fan-out, so a submit from Python, the CLI or plain SQL
behaves the same; Python only checks types first so the error names the
argument. Each call is one round trip; the logic (parameters in, `TaskInfo`
out) is written once, in `queue.tasks`, and shared by both clients. `wait`
LISTENs for the task's NOTIFY on the connection it reads on, and polls anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from genworker.errors import GenworkerError, TaskNotFound
from genworker.model import TaskId, TaskStatus
from genworker.queue import sql
from genworker.queue.db import default_dsn, translated
from genworker.queue.tasks import (
    FINISHED,
    FINISHED_CHANNEL,
    JobInfo,
    Progress,
    TaskInfo,
    Waiting,
    bulk_params,
    list_params,
    submit_params,
    task_info,
    task_summary,
)

# TaskInfo and the rest were defined here first: callers may still import them from here
__all__ = [
    "FINISHED",
    "AsyncClient",
    "Client",
    "JobInfo",
    "Progress",
    "TaskInfo",
    "bulk_params",
    "submit_params",
]


class Client:
    """Synchronous client. `Client(dsn)`, `Client(conn=...)` or `Client(pool=...)`;
    `Client()` connects where `genworker` commands do: DATABASE_URL, else the embedded
    server (brought up to date, like the commands do)."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        conn: psycopg.Connection | None = None,
        pool: Any = None,
    ) -> None:
        if sum(x is not None for x in (dsn, conn, pool)) > 1:
            raise GenworkerError("Client takes one of dsn, conn or pool (none: DATABASE_URL)")
        self._dsn, self._given, self._pool = dsn, conn, pool
        self._own: psycopg.Connection | None = None

    @contextlib.contextmanager
    def _conn(self) -> Iterator[psycopg.Connection]:
        with translated(self._dsn):
            if self._given is not None:
                yield self._given
            elif self._pool is not None:
                with self._pool.connection() as c:
                    yield c
            else:
                if self._own is None or self._own.closed:
                    embedded = False
                    if self._dsn is None:
                        self._dsn, embedded = default_dsn()
                    self._own = psycopg.connect(
                        self._dsn, autocommit=True, application_name="genworker"
                    )
                    if embedded:
                        _migrate_embedded(self._own)
                yield self._own

    def _one(self, name: str, params: dict[str, Any]) -> Any:
        with self._conn() as c:
            row = c.execute(sql.query(name), params).fetchone()
        return row[0] if row else None

    def submit(self, plan: str, prompt: str | None = None, **kw: Any) -> TaskId:
        """Submit one task; returns its id (the first task's, for a repeated idempotency key)."""
        return TaskId(self._one("submit_task", submit_params(plan, prompt, **kw)))

    def submit_many(self, tasks: Sequence[Mapping[str, Any]]) -> list[TaskId]:
        """Submit many tasks in one round trip and one transaction."""
        return [TaskId(i) for i in self._one("submit_tasks", bulk_params(tasks))]

    def get(self, task_id: int, *, jobs: bool = False) -> TaskInfo:
        with self._conn() as c:
            row = _task_row(c, task_id)
            job_rows = (
                c.execute(sql.query("task_jobs"), {"task_id": task_id}).fetchall() if jobs else ()
            )
        return task_info(row, job_rows)

    def tasks(
        self, *, status: str | None = None, tenant: str | None = None, limit: int = 20
    ) -> list[TaskInfo]:
        with self._conn() as c:
            rows = c.execute(sql.query("list_tasks"), list_params(status, tenant, limit)).fetchall()
        return [task_summary(r) for r in rows]

    def wait(
        self,
        task_id: int,
        *,
        timeout_s: float | None = None,
        poll_s: float | None = None,
        progress: Progress | None = None,
    ) -> TaskInfo:
        """Block until the task finishes (or timeout_s passes: TimeoutError). Wakes on the
        task's NOTIFY and reads it every poll_s anyway (default: 5 s while it listens, 0.5 s
        with a progress callback or inside an app's transaction, where LISTEN hears nothing)."""
        waiting = Waiting(task_id, timeout_s, progress, poll_s)
        with self._conn() as c, _listening(c, own=self._given is None) as listening:
            while True:
                info = task_info(_task_row(c, task_id))
                if listening:
                    _idle(c)
                if waiting.over(info):
                    return info
                if not listening:
                    time.sleep(waiting.pause(listening))
                    continue
                with contextlib.closing(c.notifies(timeout=waiting.pause(listening))) as notes:
                    for note in notes:
                        if waiting.heard(note.payload):
                            break

    def cancel(self, task_id: int) -> TaskStatus:
        return TaskStatus(self._one("cancel_task", {"task_id": task_id}))

    def retry(self, task_id: int) -> int:
        return int(self._one("retry_task", {"task_id": task_id}))

    def close(self) -> None:
        if self._own is not None:
            self._own.close()
            self._own = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _task_row(c: psycopg.Connection, task_id: int) -> Any:
    row = c.execute(sql.query("get_task"), {"task_id": task_id}).fetchone()
    if row is None:
        raise TaskNotFound(f"no task {task_id}")
    return row


def _can_listen(c: psycopg.Connection | psycopg.AsyncConnection, own: bool) -> bool:
    """A connection the client opened or took from a pool, or an app's connection idle in
    autocommit: NOTIFY reaches a session between transactions, never inside one."""
    return own or (c.autocommit and c.info.transaction_status == TransactionStatus.IDLE)


_ALREADY_LISTENING = "SELECT %s = ANY (ARRAY(SELECT pg_listening_channels()))"


def _idle(c: psycopg.Connection) -> None:
    """End the transaction a pooled connection without autocommit opened (only on the
    client's own connections): notifications wait for it."""
    if not c.autocommit:
        c.commit()


@contextlib.contextmanager
def _listening(c: psycopg.Connection, *, own: bool) -> Iterator[bool]:
    """LISTEN on c for the length of a wait (True), or not at all (False: the wait polls).
    An app's connection that already listens on the channel keeps its LISTEN after."""
    if not _can_listen(c, own):
        yield False
        return
    row = None if own else c.execute(_ALREADY_LISTENING, (FINISHED_CHANNEL,)).fetchone()
    keep = bool(row and row[0])
    if not keep:
        c.execute(f"LISTEN {FINISHED_CHANNEL}")
        _idle(c)
    try:
        yield True
    finally:
        if not keep and not c.closed:
            if not c.autocommit:  # ours, holding reads only: also after an error or ^C
                c.rollback()
            c.execute(f"UNLISTEN {FINISHED_CHANNEL}")
            _idle(c)


async def _atask_row(c: psycopg.AsyncConnection, task_id: int) -> Any:
    row = await (await c.execute(sql.query("get_task"), {"task_id": task_id})).fetchone()
    if row is None:
        raise TaskNotFound(f"no task {task_id}")
    return row


async def _aidle(c: psycopg.AsyncConnection) -> None:
    if not c.autocommit:
        await c.commit()


@contextlib.asynccontextmanager
async def _alistening(c: psycopg.AsyncConnection, *, own: bool) -> AsyncIterator[bool]:
    """`_listening` for an async connection."""
    if not _can_listen(c, own):
        yield False
        return
    keep = False
    if not own:
        row = await (await c.execute(_ALREADY_LISTENING, (FINISHED_CHANNEL,))).fetchone()
        keep = bool(row and row[0])
    if not keep:
        await c.execute(f"LISTEN {FINISHED_CHANNEL}")
        await _aidle(c)
    try:
        yield True
    finally:
        if not keep and not c.closed:
            if not c.autocommit:
                await c.rollback()
            await c.execute(f"UNLISTEN {FINISHED_CHANNEL}")
            await _aidle(c)


def _migrate_embedded(conn: psycopg.Connection) -> None:
    """The embedded server is genworker's own: bring its schema up to date, as the
    `genworker` commands do (plans stay what `migrate`/`start` last wrote)."""
    from genworker.queue import schema

    schema.migrate(conn)


def _default_dsn_migrated() -> str:
    """`default_dsn`, the embedded server's schema brought up to date."""
    dsn, embedded = default_dsn()
    if embedded:
        with psycopg.connect(dsn, autocommit=True, application_name="genworker") as conn:
            _migrate_embedded(conn)
    return dsn


class AsyncClient:
    """Asynchronous client, the same calls as `Client`, awaited."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        conn: psycopg.AsyncConnection | None = None,
        pool: Any = None,
    ) -> None:
        if sum(x is not None for x in (dsn, conn, pool)) > 1:
            raise GenworkerError("AsyncClient takes one of dsn, conn or pool (none: DATABASE_URL)")
        self._dsn, self._given, self._pool = dsn, conn, pool
        self._own: psycopg.AsyncConnection | None = None

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection]:
        with translated(self._dsn):
            if self._given is not None:
                yield self._given
            elif self._pool is not None:
                async with self._pool.connection() as c:
                    yield c
            else:
                if self._own is None or self._own.closed:
                    if self._dsn is None:
                        # may start the embedded server: not on the event loop's thread
                        self._dsn = await asyncio.to_thread(_default_dsn_migrated)
                    self._own = await psycopg.AsyncConnection.connect(
                        self._dsn, autocommit=True, application_name="genworker"
                    )
                yield self._own

    async def _one(self, name: str, params: dict[str, Any]) -> Any:
        async with self._conn() as c:
            cur = await c.execute(sql.query(name), params)
            row = await cur.fetchone()
        return row[0] if row else None

    async def submit(self, plan: str, prompt: str | None = None, **kw: Any) -> TaskId:
        return TaskId(await self._one("submit_task", submit_params(plan, prompt, **kw)))

    async def submit_many(self, tasks: Sequence[Mapping[str, Any]]) -> list[TaskId]:
        return [TaskId(i) for i in await self._one("submit_tasks", bulk_params(tasks))]

    async def get(self, task_id: int, *, jobs: bool = False) -> TaskInfo:
        async with self._conn() as c:
            row = await _atask_row(c, task_id)
            job_rows: Sequence[Any] = ()
            if jobs:
                job_rows = await (
                    await c.execute(sql.query("task_jobs"), {"task_id": task_id})
                ).fetchall()
        return task_info(row, job_rows)

    async def tasks(
        self, *, status: str | None = None, tenant: str | None = None, limit: int = 20
    ) -> list[TaskInfo]:
        async with self._conn() as c:
            cur = await c.execute(sql.query("list_tasks"), list_params(status, tenant, limit))
            return [task_summary(r) for r in await cur.fetchall()]

    async def wait(
        self,
        task_id: int,
        *,
        timeout_s: float | None = None,
        poll_s: float | None = None,
        progress: Progress | None = None,
    ) -> TaskInfo:
        """`Client.wait`, awaited."""
        waiting = Waiting(task_id, timeout_s, progress, poll_s)
        async with self._conn() as c, _alistening(c, own=self._given is None) as listening:
            while True:
                info = task_info(await _atask_row(c, task_id))
                if listening:
                    await _aidle(c)
                if waiting.over(info):
                    return info
                if not listening:
                    await asyncio.sleep(waiting.pause(listening))
                    continue
                notes = c.notifies(timeout=waiting.pause(listening))
                async with contextlib.aclosing(notes):
                    async for note in notes:
                        if waiting.heard(note.payload):
                            break

    async def cancel(self, task_id: int) -> TaskStatus:
        return TaskStatus(await self._one("cancel_task", {"task_id": task_id}))

    async def retry(self, task_id: int) -> int:
        return int(await self._one("retry_task", {"task_id": task_id}))

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()
            self._own = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
