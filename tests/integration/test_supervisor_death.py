"""The supervisor (or its zygote) dies: nothing of it is left running, its jobs wait under
their lease, and another node brings them back when the lease runs out."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime

import psycopg
from genworker.queue.client import Client
from supervisor_harness import (
    Launcher,
    alive,
    jobs,
    launch_fixture,  # noqa: F401  (the launch fixture)
    processes,
    status_counts,
    wait_all_finished,
    wait_for,
)


def db_now(conn: psycopg.Connection) -> datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def test_sigkill_of_the_supervisor_leaves_no_process_and_the_lease_brings_jobs_back(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=2000)
    first = launch.node(sim, "test-dead-a", workers=2, lease_s=3)
    client.submit("start", "a fox", n=15)
    first.wait_workers(2)
    held = wait_for(
        lambda: len(r := jobs(conn, "status = 'running'")) == 15 and r, "15 jobs claimed", 10
    )
    family = [p.pid for p in first.tree()]
    assert len(family) == 4  # supervisor, zygote, 2 workers

    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    # (the issue asks for 2 s; a worker must notice its supervisor's death within 1 s)
    wait_for(lambda: not any(alive(p) for p in family), "the zygote and workers gone", 1)
    assert time.monotonic() - killed_at < 1.0
    assert first.wait(5) == -signal.SIGKILL

    # Nobody gives those jobs back early: they stay running under the dead node's lease.
    running = jobs(conn, "status = 'running'")
    assert {j["id"] for j in running} == {j["id"] for j in held}
    assert {j["lease_owner"] for j in running} == {"test-dead-a"}
    expires = max(j["lease_expires"] for j in running)

    second = launch.node(sim, "test-dead-b", workers=2, lease_s=3)
    second.wait_workers(2)
    while db_now(conn) < expires:
        still = jobs(conn, "status = 'running'")
        if db_now(conn) < expires:
            assert {j["lease_owner"] for j in still} == {"test-dead-a"}, still
            assert len(still) == 15
        time.sleep(0.1)

    wait_all_finished(conn, 15, timeout_s=30)
    assert status_counts(conn) == {"succeeded": 15}
    calls = sim.calls()
    for j in jobs(conn):
        # reaped once (a lost lease is neither a death nor an attempt), run again under a
        # new token
        assert (j["deaths"], j["token"], j["attempts"]) == (0, 2, 1), j
        assert calls[j["id"]].get(2) == 1, calls.get(j["id"])
    assert "expired leases requeued" in second.log()


def test_sigkill_of_the_zygote_stops_the_node_and_gives_its_jobs_back(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=5000)
    node = launch.node(sim, "test-zygote", workers=2, lease_s=30)
    client.submit("start", "an owl", n=10)
    workers = node.wait_workers(2)
    wait_for(lambda: status_counts(conn).get("running") == 10, "10 jobs claimed", 10)
    zygote = node.zygote()
    assert zygote is not None

    os.kill(zygote, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in workers.values()), "workers gone", 1)
    code = node.wait(10)
    assert code != 0, node.log()
    assert "the zygote died" in node.log()
    # the jobs did not wait for their 30 s lease
    assert status_counts(conn) == {"queued": 10}, status_counts(conn)
    wait_for(lambda: not node.tree(), "every process of the node gone", 3)


def test_the_built_in_simulated_api_does_not_outlive_its_supervisor(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    node = launch.node(None, "test-own-sim", workers=1)  # no --api-url: it starts the sim
    node.wait_workers(1)
    client.submit("free", "a snipe")
    wait_all_finished(conn, 2, timeout_s=20)
    sims = [
        p.pid for p in processes().values() if p.ppid == node.pid and "genworker.sim" in p.title
    ]
    assert len(sims) == 1, [p.title for p in processes().values() if p.ppid == node.pid]

    node.signal(signal.SIGKILL)
    try:
        wait_for(lambda: not alive(sims[0]), "the sim gone with its supervisor", 2)
    finally:
        if alive(sims[0]):
            os.kill(sims[0], signal.SIGKILL)
