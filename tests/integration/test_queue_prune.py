"""Prune: finished tasks older than the retention go, with their jobs, a small batch at a
time; recent ones and unfinished ones (however old) stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_prune_deletes_the_result_files_no_remaining_job_names(
    dsn: str, conn: psycopg.Connection, client: Client, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    out.mkdir()
    elsewhere = tmp_path / "another-host"
    elsewhere.mkdir()

    def image(name: str, where: Path = out) -> str:
        (where / name).write_bytes(b"png")
        return str(where / name)

    old = client.submit("free", "old", n=2)
    shared_old = client.submit("free", "old, its image shared by a recent task", n=1)
    recent = client.submit("free", "recent", n=1)
    results = {  # task -> the result paths its jobs will name, in claim order
        old: [image("a.png"), image("b.png", elsewhere)],
        shared_old: [image("shared.png")],
        recent: [str(out / "shared.png")],  # a cache hit: the same file as shared_old's
    }
    with sync_queue(dsn) as q:
        jobs = q.claim("node-a", 10, 30)
        by_task = {t: list(paths) for t, paths in results.items()}
        q.complete(
            [
                Outcome(j.job_id, j.token, OutcomeKind.OK, {"path": by_task[j.task_id].pop(0)})
                for j in jobs
            ]
        )
    _age(conn, [old, shared_old], days=8)

    env = {k: v for k, v in os.environ.items() if not k.startswith("GENWORKER_")}
    env |= {"DATABASE_URL": dsn, "GENWORKER_OUTPUT_DIR": str(out)}
    done = subprocess.run(
        [sys.executable, "-m", "genworker.cli", "prune", "--retention", str(7 * DAY_S)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(
        "pruned 2 finished tasks older than 604800s and 1 result files"
    )
    assert not (out / "a.png").exists()  # its task is gone and nothing else names it
    assert (out / "shared.png").exists()  # the recent task still shows it
    assert (elsewhere / "b.png").exists()  # not in this host's output directory
    assert {r[0] for r in conn.execute("SELECT id FROM genworker.tasks").fetchall()} == {recent}
