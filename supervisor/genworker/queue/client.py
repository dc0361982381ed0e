"""Submit and follow tasks from Python: `Client` (sync) and `AsyncClient`.

Both can run inside a web app's own transaction (pass `conn=`), use its pool
(`pool=`), or open their own connection from a DSN. The SQL function does the
validation and the fan-out, so a submit from Python, the CLI or plain SQL
behaves the same; Python only checks types first so the error names the
argument. Each call is one round trip; the logic (parameters in, `TaskInfo`
out) is written once and shared by both clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from genworker.errors import (
    GenworkerError,
    InvalidCount,
    InvalidKind,
    InvalidParams,
    InvalidPlan,
    InvalidPrompt,
    InvalidTenant,
    TaskNotFound,
)
from genworker.model import TaskId, TaskStatus
from genworker.queue import sql
from genworker.queue.db import translated

# n travels as an SQL integer: a bigger Python int would not even find the function.
_INT4_MIN, _INT4_MAX = -(2**31), 2**31 - 1

FINISHED = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})


@dataclass(frozen=True)
class JobInfo:
    id: int
    index: int
    status: str
    attempts: int
    deaths: int
    result: dict[str, Any] | None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class TaskInfo:
    id: TaskId
    tenant: str
    plan: str
    kind: str
    status: TaskStatus
    n_jobs: int
    succeeded: int
    dead: int
    cancelled: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    params: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    jobs: tuple[JobInfo, ...] = ()

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    @property
    def remaining(self) -> int:
        return self.n_jobs - self.succeeded - self.dead - self.cancelled

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON document of `genworker show/submit --json` (see README)."""
        d = asdict(self)
        d["status"] = str(self.status)
        d["remaining"] = self.remaining
        for key in ("created_at", "started_at", "finished_at"):
            d[key] = _iso(d[key])
        d["jobs"] = [
            {**j, "started_at": _iso(j["started_at"]), "finished_at": _iso(j["finished_at"])}
            for j in d["jobs"]
        ]
        return d


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _bad_text(text: str) -> bool:
    """NUL (PostgreSQL text cannot hold it) or a lone surrogate (what Python makes of
    invalid UTF-8 in argv: it cannot be encoded)."""
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _any_text(obj: Any, pred: Callable[[str], bool]) -> bool:
    """Does pred hold for any string (keys included) in this JSON-like value?"""
    if isinstance(obj, str):
        return pred(obj)
    if isinstance(obj, Mapping):
        return any(pred(k) or _any_text(v, pred) for k, v in obj.items() if isinstance(k, str))
    if isinstance(obj, (list, tuple)):
        return any(_any_text(v, pred) for v in obj)
    return False


def submit_params(
    plan: str,
    prompt: str | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    tenant: str = "default",
    kind: str = "image",
    idempotency_key: str | None = None,
    n: int | None = None,
) -> dict[str, Any]:
    """Check argument types (the SQL function checks values) and build the call's parameters."""
    if not isinstance(plan, str):
        raise InvalidPlan(f"plan must be a string, got {type(plan).__name__}")
    if not isinstance(tenant, str):
        raise InvalidTenant(f"tenant must be a string, got {type(tenant).__name__}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise InvalidCount(f"n must be an integer, got {type(n).__name__}")
    if not isinstance(kind, str):
        raise InvalidKind(f"kind must be a string, got {type(kind).__name__}")
    if idempotency_key is not None and not isinstance(idempotency_key, str):
        raise InvalidParams(
            f"idempotency_key must be a string, got {type(idempotency_key).__name__}"
        )
    if n is not None and not _INT4_MIN <= n <= _INT4_MAX:
        raise InvalidCount(f"invalid n {n}: out of range")
    if params is not None and not isinstance(params, Mapping):
        raise InvalidParams(f"params must be a mapping, got {type(params).__name__}")
    merged = dict(params or {})
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidPrompt(f"prompt must be a string, got {type(prompt).__name__}")
        merged["prompt"] = prompt
    try:
        json.dumps(merged, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidParams(f"params must be JSON: {e}") from None
    if _any_text(merged, _bad_text):
        raise InvalidParams("params may not contain NUL bytes or text that is not valid UTF-8")
    for name, value in (
        ("plan", plan),
        ("tenant", tenant),
        ("kind", kind),
        ("idempotency_key", idempotency_key or ""),
    ):
        if _bad_text(value):
            raise InvalidParams(f"{name} may not contain NUL bytes or text that is not valid UTF-8")
    return {
        "plan": plan,
        "params": Jsonb(merged),
        "tenant": tenant,
        "kind": kind,
        "idempotency_key": idempotency_key,
        "n": n,
    }


def bulk_params(tasks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One `submit_tasks` call: each item takes the keyword arguments of `submit`."""
    items = []
    for t in tasks:
        p = submit_params(**t)
        items.append(
            {k: (v.obj if isinstance(v, Jsonb) else v) for k, v in p.items() if v is not None}
        )
    return {"tasks": Jsonb(items)}


def _task(row: Sequence[Any], jobs: Sequence[Sequence[Any]] = ()) -> TaskInfo:
    return TaskInfo(
        id=TaskId(row[0]),
        tenant=row[1],
        plan=row[2],
        kind=row[3],
        params=row[4],
        status=TaskStatus(row[5]),
        n_jobs=row[6],
        succeeded=row[7],
        dead=row[8],
        cancelled=row[9],
        error=row[10],
        idempotency_key=row[11],
        created_at=row[12],
        started_at=row[13],
        finished_at=row[14],
        jobs=tuple(JobInfo(*j) for j in jobs),
    )


def _summary(row: Sequence[Any]) -> TaskInfo:
    return TaskInfo(
        id=TaskId(row[0]),
        tenant=row[1],
        plan=row[2],
        kind=row[3],
        status=TaskStatus(row[4]),
        n_jobs=row[5],
        succeeded=row[6],
        dead=row[7],
        cancelled=row[8],
        error=row[9],
        created_at=row[10],
        started_at=row[11],
        finished_at=row[12],
    )


def _list_params(status: str | None, tenant: str | None, limit: int) -> dict[str, Any]:
    return {"status": status, "tenant": tenant, "limit": limit}


Progress = Callable[[TaskInfo], None]


class Client:
    """Synchronous client. `Client(dsn)`, `Client(conn=...)` or `Client(pool=...)`."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        conn: psycopg.Connection | None = None,
        pool: Any = None,
    ) -> None:
        if sum(x is not None for x in (dsn, conn, pool)) != 1:
            raise GenworkerError("Client needs exactly one of dsn, conn or pool")
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
                    assert self._dsn is not None  # __init__ takes exactly one source
                    self._own = psycopg.connect(
                        self._dsn, autocommit=True, application_name="genworker"
                    )
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
            row = c.execute(sql.query("get_task"), {"task_id": task_id}).fetchone()
            if row is None:
                raise TaskNotFound(f"no task {task_id}")
            job_rows = (
                c.execute(sql.query("task_jobs"), {"task_id": task_id}).fetchall() if jobs else ()
            )
        return _task(row, job_rows)

    def tasks(
        self, *, status: str | None = None, tenant: str | None = None, limit: int = 20
    ) -> list[TaskInfo]:
        with self._conn() as c:
            rows = c.execute(
                sql.query("list_tasks"), _list_params(status, tenant, limit)
            ).fetchall()
        return [_summary(r) for r in rows]

    def wait(
        self,
        task_id: int,
        *,
        timeout_s: float | None = None,
        poll_s: float = 0.5,
        progress: Progress | None = None,
    ) -> TaskInfo:
        """Block until the task finishes (or timeout_s passes: TimeoutError)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            info = self.get(task_id)
            if progress is not None:
                progress(info)
            if info.done:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} not finished after {timeout_s:g}s")
            time.sleep(poll_s)

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


class AsyncClient:
    """Asynchronous client, the same calls as `Client`, awaited."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        conn: psycopg.AsyncConnection | None = None,
        pool: Any = None,
    ) -> None:
        if sum(x is not None for x in (dsn, conn, pool)) != 1:
            raise GenworkerError("AsyncClient needs exactly one of dsn, conn or pool")
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
                    assert self._dsn is not None  # __init__ takes exactly one source
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
            row = await (await c.execute(sql.query("get_task"), {"task_id": task_id})).fetchone()
            if row is None:
                raise TaskNotFound(f"no task {task_id}")
            job_rows: Sequence[Any] = ()
            if jobs:
                job_rows = await (
                    await c.execute(sql.query("task_jobs"), {"task_id": task_id})
                ).fetchall()
        return _task(row, job_rows)

    async def tasks(
        self, *, status: str | None = None, tenant: str | None = None, limit: int = 20
    ) -> list[TaskInfo]:
        async with self._conn() as c:
            cur = await c.execute(sql.query("list_tasks"), _list_params(status, tenant, limit))
            return [_summary(r) for r in await cur.fetchall()]

    async def wait(
        self,
        task_id: int,
        *,
        timeout_s: float | None = None,
        poll_s: float = 0.5,
        progress: Progress | None = None,
    ) -> TaskInfo:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            info = await self.get(task_id)
            if progress is not None:
                progress(info)
            if info.done:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} not finished after {timeout_s:g}s")
            await asyncio.sleep(poll_s)

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
