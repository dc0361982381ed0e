"""Token usage: what the provider reports in a job's result is kept on the job, summed on
its task by the completion itself, and summed per tenant from the tasks (never the jobs);
the nodes' kinds: a claim takes only jobs of the kinds its node runs; and dead jobs of an
outage are requeued across tasks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
from genworker.model import Outcome, OutcomeKind
from genworker.ops.status import status_document
from genworker.queue import sql
from genworker.queue.client import Client
from queue_support import SyncQueue, job_row, sync_queue, task_row


def usage(n_in: object, n_out: object) -> dict[str, object]:
    return {"path": "/r/x.png", "usage": {"input_tokens": n_in, "output_tokens": n_out}}


def test_usage_is_kept_per_job_and_summed_per_task(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = client.submit("free", "a heron", tenant="acme")
    q: SyncQueue
    with sync_queue(dsn) as q:
        a, b = q.claim("node-a", 2, 30)
        q.complete([Outcome(a.job_id, a.token, OutcomeKind.OK, usage(50, 4160))])
        q.complete([Outcome(b.job_id, b.token, OutcomeKind.OK, usage(50, 4000))])
    assert (job_row(conn, a.job_id)["input_tokens"], job_row(conn, a.job_id)["output_tokens"]) == (
        50,
        4160,
    )
    info = client.get(task, jobs=True)
    assert (info.input_tokens, info.output_tokens) == (100, 8160)
    assert [(j.input_tokens, j.output_tokens) for j in info.jobs] == [(50, 4160), (50, 4000)]
    assert info.to_dict()["output_tokens"] == 8160


def test_a_malformed_usage_is_dropped_and_the_outcome_still_lands(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = client.submit("free", "a heron")
    with sync_queue(dsn) as q:
        a, b = q.claim("node-a", 2, 30)
        done = q.complete(
            [
                Outcome(a.job_id, a.token, OutcomeKind.OK, usage("many", -3)),
                Outcome(b.job_id, b.token, OutcomeKind.OK, {"path": "/r/y.png", "usage": 7}),
            ]
        )
    assert done.applied == {a.job_id: "succeeded", b.job_id: "succeeded"}
    assert job_row(conn, a.job_id)["input_tokens"] is None
    row = task_row(conn, task)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("succeeded", 0, 0)


def test_tokens_of_an_answer_to_a_cancelled_task_still_count(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = client.submit("free", "a heron")
    with sync_queue(dsn) as q:
        [a] = q.claim("node-a", 1, 30)
        client.cancel(task)
        done = q.complete([Outcome(a.job_id, a.token, OutcomeKind.OK, usage(10, 20))])
    assert done.applied == {a.job_id: "cancelled"}
    assert task_row(conn, task)["output_tokens"] == 20  # spent, so billed


def test_status_sums_the_tasks_per_tenant_biggest_first(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    for tenant, n_out in (("acme", 100), ("umbrella", 900), ("acme", 300), ("idle", None)):
        client.submit("free", "x", tenant=tenant, n=1)
        with sync_queue(dsn) as q:
            [job] = q.claim("node-a", 1, 30)
            result = usage(1, n_out) if n_out else {"path": "/r/noop.png"}  # idle: no usage
            q.complete([Outcome(job.job_id, job.token, OutcomeKind.OK, result)])
    doc = status_document(conn)
    assert doc["tenants"] == {
        "umbrella": {"input_tokens": 1, "output_tokens": 900},
        "acme": {"input_tokens": 2, "output_tokens": 400},
    }
    assert list(doc["tenants"]) == ["umbrella", "acme"]
    plan = conn.execute(
        "EXPLAIN " + sql.query("tenant_usage"),
        {"since": datetime.now(UTC) - timedelta(hours=24), "limit": 50},
    ).fetchall()
    assert "genworker.jobs" not in str(plan)


# ------------------------------------------------------------------ kinds


def test_a_claim_takes_only_the_kinds_its_node_runs(dsn: str, client: Client) -> None:
    image = client.submit("free", "a", n=1)
    resize = client.submit("free", None, kind="resize", params={"w": 10}, n=1)
    with sync_queue(dsn) as q:
        q.register_node("node-a", "host", 1, 1, {}, kinds=["image", "noop"])
        assert [j.task_id for j in q.claim("node-a", 10, 30)] == [image]
        assert q.claim("node-a", 10, 30) == []
        assert [j.task_id for j in q.claim("node-a", 10, 30, kinds=["resize"])] == [resize]


def test_a_capped_claim_takes_only_the_kinds_too(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    conn.execute("UPDATE genworker.settings SET value = '5' WHERE key = 'tenant_cap'")
    resize = client.submit("free", None, kind="resize", params={"w": 10})
    image = client.submit("free", "a")
    with sync_queue(dsn) as q:
        assert {j.task_id for j in q.claim("node-a", 10, 30, kinds=["image"])} == {image}
        assert {j.task_id for j in q.claim("node-b", 10, 30)} == {resize}  # no kinds: any


def test_a_node_publishes_its_kinds(dsn: str, conn: psycopg.Connection) -> None:
    with sync_queue(dsn) as q:
        q.register_node("node-a", "host", 1, 1, {}, kinds=["image", "noop", "resize"])
    row = conn.execute(sql.query("kind_runners"), {"kind": "resize", "max_age_s": 60}).fetchone()
    assert row == (True, True)
    row = conn.execute(sql.query("kind_runners"), {"kind": "video", "max_age_s": 60}).fetchone()
    assert row == (False, True)


def test_kinds_changed_by_a_reload_are_claimed_and_published(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    resize = client.submit("free", None, kind="resize", params={"w": 10})
    with sync_queue(dsn) as q:
        q.register_node("node-a", "host", 1, 1, {}, kinds=["image", "noop"])
        assert q.claim("node-a", 10, 30) == []  # no resize handler yet
        q.queue.set_kinds(["image", "noop", "resize"])  # a HUP added --handler resize=...
        q.heartbeat("node-a", 1, {})
        row = conn.execute(sql.query("kind_runners"), {"kind": "resize", "max_age_s": 60})
        assert row.fetchone() == (True, True)
        assert {j.task_id for j in q.claim("node-a", 10, 30)} == {resize}


# ------------------------------------------------------------------ requeue after an outage


def test_dead_jobs_of_a_window_are_requeued_across_tasks_in_batches(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    tasks = [client.submit("free", f"p{i}") for i in range(3)]
    with sync_queue(dsn) as q:
        jobs = q.claim("node-a", 6, 30)
        q.complete([Outcome(j.job_id, j.token, OutcomeKind.DEAD, error="outage") for j in jobs])
    old = jobs[0].job_id  # died long before the outage: left alone
    conn.execute(
        "UPDATE genworker.jobs SET finished_at = now() - interval '2 days' WHERE id = %s", (old,)
    )
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    now = row[0]
    since = now - timedelta(hours=1)
    args = {"since": since, "before": now + timedelta(seconds=1), "limit": 2}
    batches = [conn.execute(sql.query("retry_dead"), args).fetchone() for _ in range(4)]
    assert batches == [(2,), (2,), (1,), (0,)]
    assert job_row(conn, old)["status"] == "dead"
    first = task_row(conn, tasks[0])
    assert (first["status"], first["n_dead"], first["finished_at"]) == ("running", 1, None)
    assert task_row(conn, tasks[1])["n_dead"] == 0
