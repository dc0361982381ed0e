"""Tenant caps: a tenant holds at most its plan's cap of jobs in flight across the cluster.
The cap is counted from the jobs themselves, so it stays exact whichever way a job leaves
the in-flight set (completion, retry, release, reaper, cancellation), and it holds under
concurrent claims from several processes."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue as stdqueue
import random
from typing import Any

import psycopg
import pytest
from genworker.config import DEFAULT_PLANS, Plan, Settings
from genworker.model import Outcome, OutcomeKind
from genworker.queue import schema
from genworker.queue.client import Client
from genworker.queue.store import Queue
from psycopg_pool import AsyncConnectionPool
from queue_support import expire_leases, sync_queue


def set_caps(conn: psycopg.Connection, tenant_cap: int, **plan_caps: int) -> None:
    plans = tuple(Plan(p.name, p.images, p.priority, plan_caps.get(p.name)) for p in DEFAULT_PLANS)
    schema.sync_settings(conn, Settings(tenant_cap=tenant_cap, plans=plans))


def in_flight(conn: psycopg.Connection) -> dict[tuple[str, str], int]:
    """Jobs in flight by (tenant, plan), from the jobs themselves."""
    rows = conn.execute(
        "SELECT j.tenant, t.plan, count(*) FROM genworker.jobs j"
        "  JOIN genworker.tasks t ON t.id = j.task_id"
        " WHERE j.status = 'running' GROUP BY 1, 2"
    ).fetchall()
    return {(tenant, plan): n for tenant, plan, n in rows}


def tasks(client: Client, tenant: str, plan: str, count: int, n: int | None = None) -> list[int]:
    item: dict[str, Any] = {"plan": plan, "params": {"prompt": "p"}, "tenant": tenant}
    if n is not None:
        item["n"] = n
    return [int(t) for t in client.submit_many([item] * count)]


def ok(job: Any) -> Outcome:
    return Outcome(job.job_id, job.token, OutcomeKind.OK, {})


def test_a_tenant_at_its_cap_gets_nothing_more_and_the_next_tenant_gets_slots(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    set_caps(conn, 5)
    tasks(client, "greedy", "pro", 50)  # 3,500 jobs, all ahead of the next tenant's
    [modest] = tasks(client, "modest", "pro", 1)
    with sync_queue(dsn) as q:
        first = q.claim("node-a", 100, 30)
        assert q.claim("node-a", 100, 30) == []  # both at their cap, the queue is not empty
    assert in_flight(conn) == {("greedy", "pro"): 5, ("modest", "pro"): 5}
    assert [j.task_id for j in first].count(modest) == 5


def test_each_plan_has_its_own_cap_and_zero_means_none(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    set_caps(conn, 4, pro=2, free=0)  # start takes the default, free has no cap
    tasks(client, "acme", "pro", 2)
    tasks(client, "acme", "start", 2)
    tasks(client, "acme", "free", 10)
    with sync_queue(dsn) as q:
        q.claim("node-a", 1000, 30)
    assert in_flight(conn) == {("acme", "pro"): 2, ("acme", "start"): 4, ("acme", "free"): 20}


def test_without_caps_one_tenant_may_take_every_job(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    tasks(client, "greedy", "pro", 3)
    with sync_queue(dsn) as q:
        assert len(q.claim("node-a", 1000, 30)) == 210


def test_the_cap_stays_exact_whichever_way_jobs_leave_the_in_flight_set(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    set_caps(conn, 6)
    [task] = tasks(client, "acme", "pro", 1)
    tasks(client, "acme", "pro", 1)
    lane = ("acme", "pro")
    with sync_queue(dsn) as q:
        held = q.claim("node-a", 100, 30)
        assert len(held) == 6
        assert q.claim("node-a", 100, 30) == []

        # completed: two as ok, one as a retry (it waits in 'scheduled', not in flight)
        done = q.complete(
            [ok(held[0]), ok(held[1]), Outcome(held[2].job_id, held[2].token, OutcomeKind.RETRY)]
        )
        assert len(done.applied) == 3
        assert in_flight(conn)[lane] == 3
        assert len(q.claim("node-a", 100, 30)) == 3
        assert in_flight(conn)[lane] == 6

        # released: a dead worker's job and a shutdown's buffered one
        q.release([(held[3].job_id, held[3].token)], "killed by SIGKILL")
        q.release([(held[4].job_id, held[4].token)])
        assert in_flight(conn)[lane] == 4
        assert len(q.claim("node-a", 100, 30)) == 2
        assert in_flight(conn)[lane] == 6

        # reaped: a lost lease
        expire_leases(conn, [held[5].job_id])
        assert q.reap(60).requeued == 1
        assert in_flight(conn)[lane] == 5
        assert len(q.claim("node-a", 100, 30)) == 1
        assert in_flight(conn)[lane] == 6

        # cancelled: running jobs stay in flight until their outcome arrives, then free room
        client.cancel(task)
        running = conn.execute(
            "SELECT id, token FROM genworker.jobs WHERE task_id = %s AND status = 'running'",
            (task,),
        ).fetchall()
        assert running
        assert in_flight(conn)[lane] == 6
        assert q.claim("node-a", 100, 30) == []
        q.complete([Outcome(i, t, OutcomeKind.OK, {}) for i, t in running])
        assert in_flight(conn).get(lane, 0) == 6 - len(running)
        assert len(q.claim("node-a", 100, 30)) == len(running)
    assert in_flight(conn)[lane] == 6


def test_a_completion_under_a_cap_wakes_the_claimers(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    """A capped claim looks empty to its node; room under a cap is announced like new work."""

    def notified_after_completion() -> bool:
        with sync_queue(dsn) as q, psycopg.connect(dsn, autocommit=True) as listen:
            [job] = q.claim("node-a", 1, 30)
            listen.execute("LISTEN genworker_jobs")
            q.complete([ok(job)])
            return any(True for _ in listen.notifies(timeout=0.5, stop_after=1))

    tasks(client, "acme", "free", 2)
    assert notified_after_completion() is False
    set_caps(conn, 5)
    assert notified_after_completion() is True


# -------------------------------------------------------------- three claimers at once

PROCESSES, ROUNDS, CAP = 3, 12, 7
TENANTS = [f"tenant-{i}" for i in range(6)]


async def _claimer(dsn: str, node: str, seed: int, sync: Any, out: Any) -> None:
    """Each round: claim together with the others, wait while the parent counts, then finish
    or give back a random part of what is held, and wait again."""
    rng = random.Random(seed)
    held: list[Any] = []
    claimed = 0
    async with AsyncConnectionPool(dsn, min_size=1, max_size=1, kwargs={"autocommit": True}) as p:
        q = Queue(p)
        for _ in range(ROUNDS):
            sync.wait(30)
            for _ in range(rng.randint(1, 4)):  # several claims per round, racing the others
                jobs = await q.claim(node, rng.choice([1, 3, 10, 100]), 300)
                held += jobs
                claimed += len(jobs)
            sync.wait(30)  # the parent counts now: nobody claims or finishes
            rng.shuffle(held)
            cut = rng.randint(0, len(held))
            leaving, held = held[:cut], held[cut:]
            third = len(leaving) // 3
            await q.complete([ok(j) for j in leaving[:third]])
            await q.complete(
                [
                    Outcome(j.job_id, j.token, OutcomeKind.RETRY, delay_s=0)
                    for j in leaving[third : 2 * third]
                ]
            )
            await q.release([(j.job_id, j.token) for j in leaving[2 * third :]])
            sync.wait(30)
    out.put((node, (claimed, len(held))))


def _claimer_process(dsn: str, node: str, seed: int, sync: Any, out: Any) -> None:
    try:
        asyncio.run(_claimer(dsn, node, seed, sync, out))
    except Exception as e:  # reported to the parent, which fails the test with it
        sync.abort()
        out.put((node, f"{type(e).__name__}: {e}"))


@pytest.mark.timeout(180)
def test_caps_hold_under_concurrent_claims_from_three_processes(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    set_caps(conn, CAP, free=2 * CAP)
    for tenant in TENANTS:
        tasks(client, tenant, "pro", 4)
        tasks(client, tenant, "free", 30)
    caps = {"pro": CAP, "free": 2 * CAP}

    ctx = mp.get_context("spawn")
    sync, out = ctx.Barrier(PROCESSES + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_claimer_process, args=(dsn, f"node-{i}", i, sync, out))
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    peaks: dict[tuple[str, str], int] = {}
    try:
        for _ in range(ROUNDS):
            sync.wait(60)  # claims start
            sync.wait(60)  # claims done: only claims ran since the last count, so this is the peak
            for lane, n in in_flight(conn).items():
                peaks[lane] = max(peaks.get(lane, 0), n)
                assert n <= caps[lane[1]], f"{lane} holds {n} jobs, its cap is {caps[lane[1]]}"
            sync.wait(60)  # outcomes written
        reports = dict(out.get(timeout=30) for _ in procs)
    except (stdqueue.Empty, mp.BrokenBarrierError):
        pytest.fail(f"a claimer failed or hung: {[out.get_nowait() for _ in range(out.qsize())]}")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)

    assert all(isinstance(r, tuple) for r in reports.values()), reports
    assert all(claimed > 0 for claimed, _ in reports.values()), f"a claimer got no work: {reports}"
    # The caps were reached, not merely never approached: the test could have failed.
    assert max(peaks[(t, "pro")] for t in TENANTS) == CAP
    # and the in-flight set is exactly what the claimers still hold
    assert sum(in_flight(conn).values()) == sum(still for _, still in reports.values())
