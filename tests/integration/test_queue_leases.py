"""Leases: an expired lease comes back and runs again; a lost lease is neither an attempt nor
a death (its node died or lost the database: not the job's fault); the reaper is safe from
many nodes at once; silent nodes are marked dead."""

from __future__ import annotations

import psycopg
from genworker.model import Outcome, OutcomeKind
from genworker.queue.client import Client
from queue_support import expire_leases, job_row, sync_queue, task_row


def test_an_expired_lease_is_requeued_and_runs_again(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = client.submit("free", "a fox in snow", n=1)
    with sync_queue(dsn) as q:
        [lost] = q.claim("node-a", 1, 30)
        assert q.reap(60).requeued == 0  # a live lease is left alone
        expire_leases(conn)
        reaped = q.reap(60)
        assert (reaped.requeued, reaped.dead_jobs) == (1, 0)
        row = job_row(conn, lost.job_id)
        assert row["status"] == "queued"
        assert row["attempts"] == 0  # refunded: losing the lease is not the job's failure
        assert row["deaths"] == 0  # nor a worker death: outages must not kill innocent jobs
        assert (row["lease_owner"], row["lease_expires"]) == (None, None)

        [again] = q.claim("node-b", 1, 30)
        assert (again.job_id, again.attempt) == (lost.job_id, 1)
        assert q.complete([Outcome(again.job_id, again.token, OutcomeKind.OK, {})]).applied
    info = client.get(task)
    assert (info.status, info.succeeded) == ("succeeded", 1)


def test_a_job_that_keeps_losing_its_lease_is_never_killed_for_it(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = client.submit("free", "outage after outage", n=1)
    with sync_queue(dsn) as q:
        for outage in range(5):  # more than max_deaths
            [job] = q.claim(f"node-{outage}", 1, 30)
            expire_leases(conn)
            reaped = q.reap(60, max_deaths=3)
            assert (reaped.requeued, reaped.dead_jobs) == (1, 0)
        [job] = q.claim("node-x", 1, 30)
        assert (job.attempt, job.deaths) == (1, 0)
        assert q.complete([Outcome(job.job_id, job.token, OutcomeKind.OK, {})]).applied
    t = task_row(conn, task)
    assert (t["status"], t["n_dead"]) == ("succeeded", 0)


def test_two_reapers_at_once_requeue_each_job_once(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    client.submit_many([{"plan": "pro", "kind": "noop"}] * 10)  # 700 jobs
    with sync_queue(dsn) as q:
        assert len(q.claim("node-a", 700, 30)) == 700
    expire_leases(conn)

    # Reaper 1 is mid-transaction holding every expired row; reaper 2 runs meanwhile.
    with psycopg.connect(dsn) as first, psycopg.connect(dsn, autocommit=True) as second:
        first.execute("SET lock_timeout = '5s'")
        assert first.execute("SELECT * FROM genworker.reap(60, 3)").fetchone() == (700, 0, 0)
        second.execute("SET lock_timeout = '5s'")  # SKIP LOCKED: it must not wait at all
        assert second.execute("SELECT * FROM genworker.reap(60, 3)").fetchone() == (0, 0, 0)
        first.commit()
        assert second.execute("SELECT * FROM genworker.reap(60, 3)").fetchone() == (0, 0, 0)

    assert conn.execute(
        "SELECT status, deaths, attempts, count(*) FROM genworker.jobs GROUP BY 1, 2, 3"
    ).fetchall() == [("queued", 0, 0, 700)]


def test_silent_nodes_are_marked_dead(dsn: str, conn: psycopg.Connection) -> None:
    with sync_queue(dsn) as q:
        q.register_node("alive", "host-a", 1, 8, {})
        q.register_node("silent", "host-b", 2, 8, {})
        q.register_node("stopped", "host-c", 3, 8, {})
        q.stop_node("stopped")
        conn.execute(
            "UPDATE genworker.nodes SET heartbeat_at = now() - interval '5 minutes'"
            " WHERE id IN ('silent', 'stopped')"
        )
        assert q.reap(60).dead_nodes == 1
        assert q.reap(60).dead_nodes == 0
        assert q.heartbeat("alive", 8, {}) == 1  # the live node count
    assert dict(conn.execute("SELECT id, status FROM genworker.nodes").fetchall()) == {
        "alive": "alive",
        "silent": "dead",
        "stopped": "stopped",
    }


def test_renewal_extends_only_the_nodes_own_leases(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    client.submit("free", "two geese")
    with sync_queue(dsn) as q:
        [a] = q.claim("node-a", 1, 30)
        [b] = q.claim("node-b", 1, 30)
        expire_leases(conn)
        assert q.renew("node-a", 30, [a.job_id, b.job_id]) == 1
        assert q.reap(60).requeued == 1
    assert job_row(conn, a.job_id)["status"] == "running"
    assert job_row(conn, b.job_id)["status"] == "queued"


def test_a_job_its_node_lost_track_of_is_not_renewed_and_comes_back(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    """A claim whose answer never reached the node, or a release that failed: the node
    still owns the row but holds no such job. Renewing by owner alone kept it running
    forever; renewing what the node holds lets it expire and run again."""
    client.submit("free", "two geese")
    with sync_queue(dsn) as q:
        held, lost = q.claim("node-a", 2, 30)
        expire_leases(conn)
        assert q.renew("node-a", 30, [held.job_id]) == 1
        assert q.reap(60).requeued == 1
    assert job_row(conn, held.job_id)["status"] == "running"
    assert job_row(conn, lost.job_id)["status"] == "queued"


def test_release_gives_jobs_back_and_a_dead_worker_counts_a_death(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    client.submit("start", "thirty swans", n=3)
    with sync_queue(dsn) as q:
        a, b, c = q.claim("node-a", 3, 30)
        # Buffered but never started (shutdown): no death, attempt refunded.
        assert q.release([(a.job_id, a.token)]).applied == {a.job_id: "queued"}
        # Its worker died holding it: a death.
        assert q.release([(b.job_id, b.token)], reason="SIGKILL").applied == {b.job_id: "queued"}
        # A restarted supervisor with the same node id gives back what it still held.
        assert q.release_node("node-a") == 1
    assert [
        (r["status"], r["attempts"], r["deaths"])
        for r in map(lambda j: job_row(conn, j.job_id), (a, b, c))
    ] == [("queued", 0, 0), ("queued", 0, 1), ("queued", 0, 0)]
