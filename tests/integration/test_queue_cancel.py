"""Cancel: a cancelled task's queued and scheduled jobs never run, and results that
arrive later for its running jobs are discarded; the counters still add up."""

from __future__ import annotations

import psycopg
import pytest
from genworker.errors import TaskNotFound
from genworker.model import Outcome, OutcomeKind
from genworker.queue.client import Client
from queue_support import expire_leases, job_row, sync_queue, task_row


def test_queued_jobs_never_run_and_late_results_are_discarded(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = client.submit("start", "a cancelled parade", n=5)
    with sync_queue(dsn) as q:
        running = q.claim("node-a", 2, 30)
        other = client.submit("free", "an unrelated cat", n=1)
        assert client.cancel(task) == "cancelled"
        t = task_row(conn, task)
        assert (t["status"], t["n_cancelled"]) == ("cancelled", 3)
        assert t["finished_at"] is not None

        # The claim after the cancel gets the other task's job and none of this one's.
        assert [j.task_id for j in q.claim("node-a", 10, 30)] == [other]

        late = q.complete([Outcome(j.job_id, j.token, OutcomeKind.OK, {"x": 1}) for j in running])
        assert late.applied == {j.job_id: "cancelled" for j in running}
    for j in running:
        row = job_row(conn, j.job_id)
        assert (row["status"], row["result"], row["error"]) == ("cancelled", None, "task cancelled")
    t = task_row(conn, task)
    assert (t["status"], t["n_succeeded"], t["n_dead"], t["n_cancelled"]) == ("cancelled", 0, 0, 5)
    assert conn.execute(
        "SELECT count(*) FROM genworker.jobs WHERE task_id = %s AND status <> 'cancelled'", (task,)
    ).fetchone() == (0,)


def test_scheduled_retries_are_cancelled_too(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = client.submit("free", "a retried heron", n=1)
    with sync_queue(dsn) as q:
        [job] = q.claim("node-a", 1, 30)
        q.complete([Outcome(job.job_id, job.token, OutcomeKind.RETRY, error="e", delay_s=0)])
        assert client.cancel(task) == "cancelled"
        assert q.claim("node-a", 1, 30) == []
    assert job_row(conn, job.job_id)["status"] == "cancelled"
    assert task_row(conn, task)["n_cancelled"] == 1


def test_a_reaped_job_of_a_cancelled_task_is_not_requeued(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = client.submit("free", "a lost pigeon", n=1)
    with sync_queue(dsn) as q:
        [job] = q.claim("node-a", 1, 30)
        client.cancel(task)
        expire_leases(conn)
        reaped = q.reap(60)
        assert (reaped.requeued, reaped.dead_jobs) == (0, 0)
        assert q.claim("node-b", 1, 30) == []
    assert job_row(conn, job.job_id)["status"] == "cancelled"
    assert task_row(conn, task)["n_cancelled"] == 1


def test_cancelling_a_finished_task_keeps_its_outcome(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = client.submit("free", "a finished owl", n=1)
    with sync_queue(dsn) as q:
        [job] = q.claim("node-a", 1, 30)
        q.complete([Outcome(job.job_id, job.token, OutcomeKind.OK, {})])
    assert client.cancel(task) == "succeeded"
    assert task_row(conn, task)["n_cancelled"] == 0
    with pytest.raises(TaskNotFound):
        client.cancel(10**12)
