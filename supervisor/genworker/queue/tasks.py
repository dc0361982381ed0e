"""Tasks as both clients see them: a submit's arguments checked and turned into the SQL
call's parameters, and rows turned into `TaskInfo`. Written once for `Client` and
`AsyncClient`, which only differ in how they wait for the database.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from genworker.errors import (
    InvalidCount,
    InvalidKind,
    InvalidParams,
    InvalidPlan,
    InvalidPrompt,
    InvalidTenant,
)
from genworker.model import TaskId, TaskStatus

# n travels as an SQL integer: a bigger Python int would not even find the function.
_INT4_MIN, _INT4_MAX = -(2**31), 2**31 - 1

FINISHED = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})

# NOTIFY'd in the transaction that finishes a task: {"task": id, "status": ..., "tenant": ...}
FINISHED_CHANNEL = "genworker_task_finished"
POLL_S = 0.5  # between a wait's readings when polling is all it has, or a progress bar moves
FALLBACK_POLL_S = 5.0  # between readings while it listens: in case a notification is lost


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
    input_tokens: int | None = None  # the provider's usage for this image (None: not reported)
    output_tokens: int | None = None


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
    input_tokens: int = 0  # the provider's token usage, summed over the task's images
    output_tokens: int = 0

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


def task_info(row: Sequence[Any], jobs: Sequence[Sequence[Any]] = ()) -> TaskInfo:
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
        input_tokens=int(row[15]),
        output_tokens=int(row[16]),
        jobs=tuple(JobInfo(*j) for j in jobs),
    )


def task_summary(row: Sequence[Any]) -> TaskInfo:
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


def list_params(status: str | None, tenant: str | None, limit: int) -> dict[str, Any]:
    return {"status": status, "tenant": tenant, "limit": limit}


Progress = Callable[[TaskInfo], None]  # called with each reading while a client waits


@dataclass
class Waiting:
    """One client's wait for a task, between its readings (the sync and async loops share it).

    A reading follows a notification for this task on FINISHED_CHANNEL, or the poll interval:
    `poll_s`, else POLL_S without LISTEN or with a progress callback, else FALLBACK_POLL_S."""

    task_id: int
    timeout_s: float | None
    progress: Progress | None = None
    poll_s: float | None = None
    deadline: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s

    def over(self, info: TaskInfo) -> bool:
        """Report the reading; True once the task is finished, TimeoutError past the deadline."""
        if self.progress is not None:
            self.progress(info)
        if info.done:
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise TimeoutError(f"task {self.task_id} not finished after {self.timeout_s:g}s")
        return False

    def pause(self, listening: bool) -> float:
        """Seconds until the next reading unless a notification comes first (never past the
        deadline)."""
        every = self.poll_s
        if every is None:
            every = POLL_S if self.progress is not None or not listening else FALLBACK_POLL_S
        if self.deadline is not None:
            every = min(every, max(0.0, self.deadline - time.monotonic()))
        return every

    def heard(self, payload: str) -> bool:
        """Is this notification about our task? (Anyone may NOTIFY on the channel.)"""
        try:
            event = json.loads(payload)
        except ValueError:
            return False
        return isinstance(event, dict) and event.get("task") == self.task_id
