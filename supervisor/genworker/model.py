"""The small vocabulary every layer shares: ids, statuses, a job as handed to a
worker, and the outcome a worker sends back.

Nothing here imports the database or the HTTP client, so both sides of a fork
(and both layers: queue and API) can use it.
"""

from __future__ import annotations

import enum
import json
from typing import Any, Literal, NamedTuple, NewType

JobId = NewType("JobId", int)
TaskId = NewType("TaskId", int)
NodeId = NewType("NodeId", str)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"  # runnable now
    SCHEDULED = "scheduled"  # waiting for run_after (retry backoff, rate-limit snooze)
    RUNNING = "running"  # claimed under a lease
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"


class TaskStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every job succeeded
    FAILED = "failed"  # finished, at least one job dead
    CANCELLED = "cancelled"


class OutcomeKind(enum.StrEnum):
    OK = "ok"  # result stored, job succeeded
    RETRY = "retry"  # transient failure: spends an attempt, backs off
    SNOOZE = "snooze"  # rate limited: wait, without spending an attempt
    DEAD = "dead"  # permanent failure: stop now


class Job(NamedTuple):
    """A claimed job as a worker sees it (crosses the process boundary)."""

    job_id: int
    token: int  # fencing token: the completion must present it
    task_id: int
    idx: int  # position in its task (the image's variation index)
    kind: str  # handler name: "image", "noop", or a user kind
    params: dict[str, Any]  # the task's parameters (prompt, size, model ...)
    attempt: int  # 1 for the first run
    deaths: int = 0  # worker deaths it was in flight for: a suspect runs alone
    urgency: float = 0.0  # the claim's order key, smallest first (genworker.urgency)


class Outcome(NamedTuple):
    """What a worker reports for one job."""

    job_id: int
    token: int
    kind: OutcomeKind
    result: dict[str, Any] | None = None
    error: str | None = None  # short, never contains a secret
    retry_after_s: float | None = None  # RETRY/SNOOZE: the wait the provider (handler) asked for
    alarm: str | None = None  # node-level condition raised by this outcome, e.g. "bad_api_key"
    api_calls: int = 1
    # RETRY/SNOOZE: the wait the queue writes, set by the node from retry_after_s or the
    # backoff (queue.store.retry_delay_s); None until then
    delay_s: float | None = None


# Outcome.alarm of a call that never reached the provider (refused, DNS, TLS, connect
# timeout): not the job's fault, so it spends no attempt; a run of them is an outage
# (node/outage.py).
PROVIDER_UNREACHABLE = "provider_unreachable"

# Which part of a call failed, for the worker's counters: the provider's HTTP answer, no
# answer in time, the connection, a 2xx answer we could not use, or storing the result.
Cause = Literal["http", "timeout", "connection", "answer", "storage"]


class JobError(Exception):
    """Base of the errors a handler raises to say how its job ended.

    Handlers return a result dict on success and raise one of these otherwise;
    any other exception is treated as a transient failure of that job. `status` and
    `cause` describe the failed call, when there was one (None for a handler's own error).
    """

    outcome = OutcomeKind.RETRY
    # class-level defaults too: a subclass whose __init__ skips ours still reads as "no call"
    status: int | None = None
    cause: Cause | None = None

    def __init__(
        self,
        reason: str,
        *,
        retry_after_s: float | None = None,
        alarm: str | None = None,
        status: int | None = None,
        cause: Cause | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s  # the wait the provider asked for, if any
        self.alarm = alarm
        self.status = status
        self.cause = cause


class TransientError(JobError):
    """Try again later, spending an attempt (5xx, timeout, connection reset)."""

    outcome = OutcomeKind.RETRY


class RateLimited(JobError):
    """The provider said slow down: snooze without spending an attempt."""

    outcome = OutcomeKind.SNOOZE


class PermanentError(JobError):
    """Retrying cannot help (400/404/422, bad key, no quota, garbage answer)."""

    outcome = OutcomeKind.DEAD


def unstorable(value: object) -> str | None:
    """Why PostgreSQL's jsonb would refuse this value (a result, an outcome's parts), else
    None: NaN and Infinity are not JSON, a lone surrogate is not UTF-8, jsonb has no NUL."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
        return f"not JSON ({type(e).__name__}: {e})"
    if _has_nul(value):
        return "a NUL character"
    return None


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False
