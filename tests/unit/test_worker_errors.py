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
