"""What a worker stores as a job's error: a handler's exception text without secrets."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from genworker import channels as ch
from genworker.api.limiter import Aimd
from genworker.config import Settings
from genworker.model import Job, Outcome, OutcomeKind, PermanentError
from genworker.worker.process import Worker

KEY = "sk-live-9fQ2x7LmN4pR8sT1"
PASSWORD = "hunter2-pg-Zq8"
DSN = f"postgresql://app:{PASSWORD}@db.internal:5432/jobs"


def outcome_of(exc: BaseException) -> Outcome:
    async def handler(job: Job, session: Any) -> dict[str, Any]:
        raise exc

    async def scenario() -> Outcome:
        mine, theirs = socket.socketpair()
        with mine, theirs:
            settings = Settings(concurrency=1, api_key=KEY, database_url=DSN)
            worker = Worker(0, 1, mine, settings, ch.SharedBlock(1), None)
            worker.aimd, worker.handlers = Aimd(1), {"image": handler}
            worker.session = None  # type: ignore[assignment]  # the handler above needs none
            return await worker._call(Job(7, 1, 1, 0, "image", {"prompt": "p"}, 1))

    return asyncio.run(scenario())


@pytest.mark.parametrize(
    "text",
    [
        f"calling with key {KEY} failed",
        f"Authorization: Bearer {KEY}",
        f"cannot connect to {DSN}",
        f"password {PASSWORD} rejected",
        "token sk-other-tenant-abcdef123456 leaked",
    ],
)
def test_an_unexpected_exception_is_stored_without_secrets(text: str) -> None:
    out = outcome_of(RuntimeError(text + "\nsecond line"))
    assert out.kind is OutcomeKind.RETRY
    assert out.error is not None
    assert out.error.startswith("RuntimeError: ")
    for secret in (KEY, PASSWORD, "9fQ2x7LmN4pR8sT1", "abcdef123456"):
        assert secret not in out.error
    assert "\n" not in out.error


def test_a_job_error_raised_by_a_handler_is_scrubbed_too() -> None:
    out = outcome_of(PermanentError(f"upstream refused {KEY} for {DSN}"))
    assert out.kind is OutcomeKind.DEAD
    assert out.error is not None
    assert "upstream refused" in out.error
    assert KEY not in out.error
    assert PASSWORD not in out.error


def test_a_job_of_a_kind_this_worker_lacks_waits_without_spending_an_attempt() -> None:
    """During a reload that adds a --handler, an old worker may be handed the new kind: the
    job snoozes (no attempt) for a worker that has it, it does not die."""

    async def scenario() -> Outcome:
        mine, theirs = socket.socketpair()
        with mine, theirs:
            worker = Worker(0, 1, mine, Settings(concurrency=1), ch.SharedBlock(1), None)
            worker.aimd, worker.handlers = Aimd(1), {}
            return await worker._call(Job(8, 1, 1, 0, "resize", {"w": 10}, 1))

    out = asyncio.run(scenario())
    assert out.kind is OutcomeKind.SNOOZE
    assert out.retry_after_s is not None
    assert out.retry_after_s > 0
    assert out.api_calls == 0
