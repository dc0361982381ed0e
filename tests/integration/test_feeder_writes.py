"""What a node writes: an outcome PostgreSQL cannot store (a NaN or a NUL that a custom
handler or a provider slipped past the checks) fails its own job, with the reason, and
never stops the node's writes of the other jobs' outcomes."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest
from genworker.config import Settings
from genworker.model import Outcome, OutcomeKind
from genworker.node.feeder import Feeder
from genworker.queue.client import Client
from queue_support import job_row, sync_queue


def test_an_unstorable_outcome_fails_its_job_and_the_others_are_written(
    dsn: str, conn: psycopg.Connection, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    client.submit("free", "a heron", n=1)
    client.submit("start", "a stork", n=3)
    with sync_queue(dsn) as q:
        jobs = q.claim("node-w", 10, 60)
    assert len(jobs) == 4
    nan, nul, surrogate, fine = jobs
    outcomes = [
        Outcome(nan.job_id, nan.token, OutcomeKind.OK, {"score": float("nan")}),
        Outcome(nul.job_id, nul.token, OutcomeKind.DEAD, error="the provider said \x00no"),
        Outcome(surrogate.job_id, surrogate.token, OutcomeKind.OK, {"text": "half \ud800"}),
        Outcome(fine.job_id, fine.token, OutcomeKind.OK, {"path": "x.png"}),
    ]

    async def scenario() -> None:
        feeder = Feeder(Settings(), dsn, "node-w", list, print)
        await feeder.open()
        stop = asyncio.Event()
        writer = asyncio.create_task(feeder.writer.write_loop(stop))
        try:
            feeder.writer.add([(o, 1) for o in outcomes])
            stop.set()
            await asyncio.wait_for(writer, 30)  # it would die at the first batch, or hang
        finally:
            writer.cancel()
            await feeder.close()

    with caplog.at_level(logging.WARNING, logger="genworker"):
        asyncio.run(scenario())

    rows = {j.job_id: job_row(conn, j.job_id) for j in jobs}
    assert (rows[fine.job_id]["status"], rows[fine.job_id]["result"]) == (
        "succeeded",
        {"path": "x.png"},
    )
    for job, why in ((nan, "not JSON"), (nul, "a NUL character"), (surrogate, "not JSON")):
        row = rows[job.job_id]
        assert row["status"] == "dead"
        assert row["error"].startswith("outcome not storable: ")
        assert why in row["error"]
    assert sum("cannot be stored" in r.getMessage() for r in caplog.records) == 3
