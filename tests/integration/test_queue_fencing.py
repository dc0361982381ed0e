"""A completion is applied only while its sender still owns the job: a stale owner's
write (lease lost, job re-claimed) or a wrong token changes nothing and is reported."""

from __future__ import annotations

import psycopg
from genworker.model import Outcome, OutcomeKind
from genworker.queue.client import Client
from queue_support import SyncQueue, counts, expire_leases, job_row, sync_queue


def _one_job_task(client: Client) -> int:
    return client.submit("free", "a red kite", n=1)


def test_stale_owner_cannot_overwrite_the_new_owner(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = _one_job_task(client)
    with sync_queue(dsn) as q:
        [first] = q.claim("node-a", 10, 30)
        expire_leases(conn)
        assert q.reap(60).requeued == 1
        [second] = q.claim("node-b", 10, 30)
        assert second.job_id == first.job_id
        assert second.token == first.token + 1

        late = q.complete([Outcome(first.job_id, first.token, OutcomeKind.OK, {"by": "a"})])
        assert late.applied == {}
        assert late.stale == [first.job_id]
        row = job_row(conn, first.job_id)
        assert (row["status"], row["lease_owner"], row["token"], row["result"]) == (
            "running",
            "node-b",
            second.token,
            None,
        )

        done = q.complete([Outcome(second.job_id, second.token, OutcomeKind.OK, {"by": "b"})])
        assert done.applied == {second.job_id: "succeeded"}

        # Arriving after the rightful result, the stale one is still refused.
        again = q.complete([Outcome(first.job_id, first.token, OutcomeKind.DEAD, error="x")])
        assert again.stale == [first.job_id]
    row = job_row(conn, first.job_id)
    assert (row["status"], row["result"], row["error"]) == ("succeeded", {"by": "b"}, None)
    assert client.get(task).succeeded == 1


def test_stale_owner_cannot_release_or_fail_the_job(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    _one_job_task(client)
    with sync_queue(dsn) as q:
        [first] = q.claim("node-a", 1, 30)
        expire_leases(conn)
        q.reap(60)
        [second] = q.claim("node-b", 1, 30)
        before = job_row(conn, second.job_id)
        assert q.release([(first.job_id, first.token)], reason="worker died").stale == [
            first.job_id
        ]
        assert q.complete(
            [Outcome(first.job_id, first.token, OutcomeKind.RETRY, error="e", delay_s=0)]
        ).stale == [first.job_id]
        assert job_row(conn, second.job_id) == before


def test_wrong_token_changes_nothing(dsn: str, conn: psycopg.Connection, client: Client) -> None:
    _one_job_task(client)
    with sync_queue(dsn) as q:
        [job] = q.claim("node-a", 1, 30)
        before = job_row(conn, job.job_id)
        for token in (job.token + 1, job.token - 1, 0):
            done = q.complete([Outcome(job.job_id, token, OutcomeKind.OK, {"forged": True})])
            assert (done.applied, done.stale) == ({}, [job.job_id])
        assert job_row(conn, job.job_id) == before
        assert q.complete([Outcome(job.job_id, job.token, OutcomeKind.OK, {})]).applied == {
            job.job_id: "succeeded"
        }


def test_a_result_is_written_once(dsn: str, conn: psycopg.Connection, client: Client) -> None:
    task = _one_job_task(client)
    with sync_queue(dsn) as q:
        [job] = q.claim("node-a", 1, 30)
        assert q.complete([Outcome(job.job_id, job.token, OutcomeKind.OK, {"n": 1})]).applied
        # The same owner, the same token, a second time: the job is no longer running.
        repeat = q.complete([Outcome(job.job_id, job.token, OutcomeKind.OK, {"n": 2})])
        assert repeat.stale == [job.job_id]
    assert job_row(conn, job.job_id)["result"] == {"n": 1}
    assert client.get(task).succeeded == 1


def test_a_batch_applies_the_owned_rows_and_reports_the_rest(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    client.submit("free", "two herons")
    with sync_queue(dsn) as q:
        a, b = q.claim("node-a", 2, 30)
        done = q.complete(
            [
                Outcome(a.job_id, a.token, OutcomeKind.OK, {}),
                Outcome(b.job_id, b.token + 7, OutcomeKind.OK, {}),
                Outcome(10**12, 1, OutcomeKind.OK, {}),  # no such job
            ]
        )
    assert done.applied == {a.job_id: "succeeded"}
    assert done.stale == [b.job_id, 10**12]
    assert job_row(conn, b.job_id)["status"] == "running"
    assert counts(conn) == (1, 2)


def test_job_fields_reach_the_worker_in_their_places(dsn: str, client: Client) -> None:
    params = {"model": "dall-e-2", "size": "512x512"}  # a size the default model does not take
    task = client.submit("free", "an owl", n=1, params=params)
    q: SyncQueue
    with sync_queue(dsn) as q:
        [job] = q.claim("node-a", 1, 30)
    assert (job.task_id, job.idx, job.kind, job.attempt) == (task, 0, "image", 1)
    assert job.params == {"prompt": "an owl", **params}
