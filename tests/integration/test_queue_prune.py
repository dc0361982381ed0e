"""Prune: finished tasks older than the retention go, with their jobs, a small batch at a
time; recent ones and unfinished ones (however old) stay."""

from __future__ import annotations

import psycopg
from genworker.model import Outcome, OutcomeKind
from genworker.queue.client import Client
from queue_support import counts, sync_queue

DAY_S = 86400.0


def _finish_all(dsn: str) -> None:
    with sync_queue(dsn) as q:
        jobs = q.claim("node-a", 1000, 30)
        q.complete([Outcome(j.job_id, j.token, OutcomeKind.OK, {}) for j in jobs])


def _age(conn: psycopg.Connection, task_ids: list[int], days: int) -> None:
    conn.execute(
        "UPDATE genworker.tasks SET created_at = now() - make_interval(days => %(d)s),"
        " finished_at = CASE WHEN finished_at IS NOT NULL"
        "                    THEN now() - make_interval(days => %(d)s) END"
        " WHERE id = ANY (%(ids)s)",
        {"ids": task_ids, "d": days},
    )


def test_old_finished_tasks_are_pruned_in_batches_with_their_jobs(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    old = client.submit_many([{"plan": "free", "prompt": "old"}] * 5)
    recent = client.submit_many([{"plan": "free", "prompt": "recent"}] * 2)
    _finish_all(dsn)
    failed_old = client.submit("free", "old and failed", n=1)
    cancelled_old = client.submit("free", "old and cancelled", n=1)
    with sync_queue(dsn) as q:
        [job] = q.claim("node-a", 1, 30)
        q.complete([Outcome(job.job_id, job.token, OutcomeKind.DEAD, error="no")])
    client.cancel(cancelled_old)
    _age(conn, [*old, failed_old, cancelled_old], days=8)
    assert counts(conn) == (9, 16)

    with sync_queue(dsn) as q:
        batches = [q.prune(7 * DAY_S, limit=3) for _ in range(4)]
    assert batches == [3, 3, 1, 0]
    left = {r[0] for r in conn.execute("SELECT id FROM genworker.tasks").fetchall()}
    assert left == set(recent)
    assert counts(conn) == (2, 4)  # no orphan jobs
    assert conn.execute(
        "SELECT count(*) FROM genworker.jobs WHERE task_id <> ALL (%s)", (recent,)
    ).fetchone() == (0,)


def test_unfinished_tasks_are_never_pruned(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    running = client.submit("free", "running for ages")
    with sync_queue(dsn) as q:
        assert {j.task_id for j in q.claim("node-a", 10, 30)} == {running}
        queued = client.submit("free", "waiting for ages")
        _age(conn, [queued, running], days=400)
        assert q.prune(0, limit=100) == 0
    statuses = dict(conn.execute("SELECT id, status FROM genworker.tasks").fetchall())
    assert statuses == {queued: "queued", running: "running"}
    assert counts(conn) == (2, 4)


def test_prune_forgets_old_dead_and_stopped_nodes(dsn: str, conn: psycopg.Connection) -> None:
    with sync_queue(dsn) as q:
        for node in ("alive", "dead", "stopped", "recently-stopped"):
            q.register_node(node, "h", 1, 1, {})
        q.stop_node("stopped")
        q.stop_node("recently-stopped")
        conn.execute(
            "UPDATE genworker.nodes SET heartbeat_at = now() - interval '30 days',"
            " status = CASE WHEN id = 'dead' THEN 'dead' ELSE status END"
            " WHERE id IN ('alive', 'dead', 'stopped')"
        )
        q.prune(7 * DAY_S)
    left = {r[0] for r in conn.execute("SELECT id FROM genworker.nodes").fetchall()}
    assert left == {"alive", "recently-stopped"}
