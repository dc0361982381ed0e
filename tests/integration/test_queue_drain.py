"""Four claimers in four OS processes drain 20,000 jobs: every job runs exactly once."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue as stdqueue
import time
from collections import Counter
from typing import Any

import psycopg
import pytest
from genworker.model import Outcome, OutcomeKind
from genworker.queue.client import Client
from genworker.queue.store import Queue
from psycopg_pool import AsyncConnectionPool

PROCESSES = 4
TASKS, JOBS_PER_TASK = 400, 50  # 20,000 jobs
BATCH = 50


async def _drain(dsn: str, node: str, deadline: float) -> dict[str, Any]:
    claimed: list[tuple[int, int]] = []
    applied = stale = 0
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=1, kwargs={"autocommit": True}
    ) as pool:
        q = Queue(pool)
        while time.monotonic() < deadline:
            jobs = await q.claim(node, BATCH, lease_s=300)
            if not jobs:
                break
            claimed += [(j.job_id, j.token) for j in jobs]
            done = await q.complete(
                [Outcome(j.job_id, j.token, OutcomeKind.OK, {"by": node}) for j in jobs]
            )
            applied += len(done.applied)
            stale += len(done.stale)
    return {"node": node, "claimed": claimed, "applied": applied, "stale": stale}


def _claimer(dsn: str, node: str, start: Any, results: Any, deadline: float) -> None:
    start.wait(60)  # all four begin together, after their slow spawn-time imports
    try:
        results.put(asyncio.run(_drain(dsn, node, deadline)))
    except Exception as e:  # a deadlock or a lost connection: the parent fails with it
        results.put({"node": node, "error": f"{type(e).__name__}: {e}"})


@pytest.mark.timeout(120)
def test_four_processes_complete_every_job_exactly_once(dsn: str, conn: psycopg.Connection) -> None:
    with Client(dsn) as client:
        task_ids = client.submit_many([{"plan": "pro", "kind": "noop", "n": JOBS_PER_TASK}] * TASKS)
    total = TASKS * JOBS_PER_TASK

    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(PROCESSES), ctx.Queue()
    deadline = time.monotonic() + 60
    procs = [
        ctx.Process(target=_claimer, args=(dsn, f"node-{i}", start, results, deadline))
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=90) for _ in procs]
        for p in procs:
            p.join(10)
    except stdqueue.Empty:
        pytest.fail("a claimer process did not report back in time")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)

    assert [r.get("error") for r in reports] == [None] * PROCESSES
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    claims = [c for r in reports for c in r["claimed"]]
    # No job was handed out twice: not to two processes, not twice to one.
    repeated = [job for job, n in Counter(job for job, _ in claims).items() if n > 1]
    assert repeated == []
    assert len(set(claims)) == len(claims) == total
    # Every claim was completed by its owner, none refused as stale.
    assert sum(r["applied"] for r in reports) == total
    assert [r["stale"] for r in reports] == [0] * PROCESSES
    assert all(r["claimed"] for r in reports), "a claimer never got work: not concurrent"

    by_status = dict(
        conn.execute("SELECT status, count(*) FROM genworker.jobs GROUP BY status").fetchall()
    )
    assert by_status == {"succeeded": total}
    assert conn.execute(
        "SELECT count(*) FROM genworker.jobs WHERE attempts <> 1 OR token <> 1 OR result IS NULL"
    ).fetchone() == (0,)
    tasks = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'succeeded' AND n_succeeded = n_jobs"
        "                          AND n_dead = 0 AND finished_at IS NOT NULL), count(*)"
        "  FROM genworker.tasks WHERE id = ANY (%s)",
        (task_ids,),
    ).fetchone()
    assert tasks == (TASKS, TASKS)
