"""SIGKILL of a worker: its jobs are given back at once and finish exactly once, the slot
restarts, the death is counted, and no zombie is left behind. Real processes, real
PostgreSQL, the simulated API over real HTTP."""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import time
from pathlib import Path

import psycopg
from genworker.queue.client import Client
from supervisor_harness import (
    Launcher,
    Node,
    jobs,
    launch_fixture,  # noqa: F401  (the launch fixture)
    node_info,
    processes,
    status_counts,
    wait_all_finished,
    wait_for,
)

SLOTS = 5
TITLE = re.compile(r"^genworker: worker (\d+) inflight=(\d+)/(\d+) done=(\d+)")


def busy_workers(node: Node) -> dict[int, int]:
    """{slot: pid} of workers whose title says every slot is busy and a job is done (steady)."""
    out = {}
    for slot, pid in node.workers().items():
        title = processes().get(pid)
        m = TITLE.match(title.title) if title else None
        if m and int(m[2]) == SLOTS and int(m[4]) > 0:
            out[slot] = pid
    return out


def deaths(conn: psycopg.Connection) -> dict[int, int]:
    rows = conn.execute("SELECT id, deaths FROM genworker.jobs WHERE deaths > 0").fetchall()
    return {i: d for i, d in rows}


def suspects_settled(conn: psycopg.Connection, since: list[float]) -> bool:
    """True once no job that survived a death has been unfinished for 1.5 s: such a job
    runs alone and drains a worker for it, and titles lag up to a second behind."""
    pending = conn.execute(
        "SELECT count(*) FROM genworker.jobs WHERE deaths > 0"
        " AND status IN ('queued', 'scheduled', 'running')"
    ).fetchone()[0]
    if pending:
        since[:] = []
        return False
    if not since:
        since.append(time.monotonic())
    return time.monotonic() - since[0] >= 1.5


def death_line(node: Node, pid: int) -> tuple[str, str] | None:
    """(jobs given back, of them running) from the log line of this worker's death."""
    m = re.search(
        rf"\(pid {pid}\) died: .*; (\d+) jobs back in the queue \((\d+) were running\)",
        node.log(),
    )
    return (m[1], m[2]) if m else None


def keep_queue_full(client: Client, conn: psycopg.Connection, at_least: int) -> None:
    c = status_counts(conn)
    while c.get("queued", 0) < at_least:
        client.submit("start", "a lighthouse at dawn")
        c = status_counts(conn)


def test_sigkill_of_a_busy_worker_twenty_times_loses_and_repeats_nothing(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=300)
    # Random kills land on the same job now and then (released jobs are the most urgent, so
    # they are claimed again at once); at the default of 3 such a job would go dead as poison,
    # which test_supervisor_crashes covers. Here every job must survive.
    node = launch.node(sim, "test-kill", "--max-worker-deaths", "100", workers=3, lease_s=10)
    keep_queue_full(client, conn, 60)
    node.wait_workers(3)
    rng = random.Random(7)
    # (slot, pid, the jobs it was running, how many it held)
    killed: list[tuple[int, int, set[int], int]] = []
    for _ in range(20):
        keep_queue_full(client, conn, 60)
        settled: list[float] = []
        wait_for(
            lambda s=settled: keep_queue_full(client, conn, 60) or suspects_settled(conn, s),
            "the last kill's jobs done",
            30,
        )
        busy = wait_for(lambda: busy_workers(node), "a worker with 5 jobs in flight", 15)
        slot = rng.choice(sorted(busy))
        pid = busy[slot]
        before = deaths(conn)
        node.check_running()
        os.kill(pid, signal.SIGKILL)
        # The supervisor knows what the worker held: those jobs are back at once, well
        # before any lease (10 s) could expire. Those it was running take a death; a job
        # still on its way to it (a kill just as a slot was refilled) never started.
        gave_back, running = map(int, wait_for(lambda p=pid: death_line(node, p), "a death", 3))
        after = before
        if running:
            after = wait_for(lambda b=before: deaths(conn) != b and deaths(conn), "deaths", 3)
        held = {i for i, d in after.items() if d != before.get(i, 0)}
        assert len(held) == running
        if any(before.get(i, 0) for i in held):
            # a job that was already in flight at a death runs alone: it was all it held
            assert gave_back == 1, f"worker {slot} held a suspect and {gave_back - 1} more"
        else:
            assert gave_back == SLOTS, f"worker {slot} held {gave_back} jobs, not {SLOTS}"
        assert all(after[i] == before.get(i, 0) + 1 for i in held)
        # the slot restarts under a new pid, and the old one is reaped (no zombie left)
        wait_for(
            lambda s=slot, p=pid: node.workers().get(s) not in (None, p), f"worker {slot} back", 10
        )
        wait_for(lambda p=pid: p not in processes(), f"pid {pid} reaped", 3)
        killed.append((slot, pid, held, gave_back))

    wait_all_finished(conn, sum(1 for _ in jobs(conn)), timeout_s=60)
    assert set(status_counts(conn)) == {"succeeded"}, status_counts(conn)

    rows = jobs(conn)
    calls = sim.calls()
    died = {i for _, _, held, _ in killed for i in held}
    for j in rows:
        # a death is not an attempt; every claim bumps the token; the result is the file
        assert j["attempts"] == 1, j
        assert j["token"] >= j["deaths"] + 1, j
        by_token = calls.get(j["id"], {})
        assert by_token.get(j["token"]) == 1, (j, by_token)  # the final run called once
        if j["id"] in died:
            assert j["token"] > 1, j  # called again after the kill
            assert sum(by_token.values()) <= j["deaths"] + 1, (j, by_token)
        else:
            assert j["deaths"] == 0, j
            assert sum(by_token.values()) == 1, (j, by_token)
        path = Path(j["result"]["path"])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == j["result"]["sha256"]
    assert sum(j["deaths"] for j in rows) == sum(len(h) for *_, h, _ in killed)
    # each job given back without a death (it had not started) was claimed once more
    not_started = sum(gave_back - len(held) for *_, held, gave_back in killed)
    assert sum(j["token"] - 1 - j["deaths"] for j in rows) == not_started
    assert sum(len(h) for *_, h, _ in killed) >= 15  # most kills hit 5 running jobs
    bad_tasks = conn.execute(
        "SELECT id, status, n_succeeded, n_jobs FROM genworker.tasks"
        " WHERE status <> 'succeeded' OR n_succeeded <> n_jobs"
    ).fetchall()
    assert not bad_tasks

    # every death was counted and logged with its cause and the jobs it gave back
    wait_for(
        lambda: node_info(conn, "test-kill").get("restarts") == {"signal": 20},
        "20 restarts in the node's info",
        5,
    )
    log = node.log()
    for slot, pid, *_ in killed:
        assert re.search(
            rf"worker {slot} \(pid {pid}\) died: killed by SIGKILL.*; \d+ jobs back in the queue",
            log,
        ), log[-2000:]
    zombies = [p for p in node.tree() if p.state == "Z"]
    assert not zombies, zombies


def test_jobs_queued_behind_busy_slots_take_no_death_when_their_worker_dies(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    # 100 ms calls are quick: the worker gets a second job queued behind each busy slot
    sim = launch.sim(latency_ms=100)
    node = launch.node(sim, "test-queued", workers=1, lease_s=30)
    client.submit_many([{"plan": "start", "params": {"prompt": "a gannet"}}] * 4)  # 120 jobs
    node.wait_workers(1)
    wait_for(lambda: status_counts(conn).get("succeeded", 0) >= 30, "quick calls seen", 30)
    [pid] = node.workers().values()
    os.kill(pid, signal.SIGKILL)
    wait_all_finished(conn, 120, timeout_s=60)
    rows = jobs(conn)
    assert {j["status"] for j in rows} == {"succeeded"}
    died_with_it = [j for j in rows if j["deaths"] == 1]
    came_back_clean = [j for j in rows if j["deaths"] == 0 and j["token"] >= 2]
    assert 1 <= len(died_with_it) <= SLOTS  # only the jobs it was running
    assert came_back_clean  # those queued behind its slots were given back, no death
    assert all(j["attempts"] == 1 for j in rows)
