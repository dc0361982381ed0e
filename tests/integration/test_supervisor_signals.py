"""Signals to a running node under load: TERM drains (a second TERM cuts the drain short),
HUP replaces every worker, TTIN/TTOU change the worker count, and no job is lost or run
twice on the way."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psycopg
from genworker.queue.client import Client
from supervisor_harness import (
    Launcher,
    Node,
    alive,
    jobs,
    launch_fixture,  # noqa: F401  (the launch fixture)
    node_info,
    processes,
    status_counts,
    wait_all_finished,
    wait_for,
)

FULL = re.compile(r"inflight=5/5")


def all_full(node: Node, n: int) -> bool:
    """n workers, each with every slot busy (their titles lag up to a second)."""
    titles = [processes().get(pid) for pid in node.workers().values()]
    return sum(1 for t in titles if t and FULL.search(t.title)) == n


def assert_each_called_once(sim_calls: dict[int, dict[int, int]], rows: list[dict]) -> None:
    for j in rows:
        assert sim_calls.get(j["id"]) == {1: 1}, (j, sim_calls.get(j["id"]))
        assert (j["token"], j["attempts"], j["deaths"]) == (1, 1, 0), j


def test_term_finishes_in_flight_jobs_gives_back_the_buffer_and_exits_0(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=1500)
    node = launch.node(sim, "test-term", workers=2, lease_s=10)
    client.submit("start", "a heron", n=30)
    node.wait_workers(2)
    wait_for(lambda: all_full(node, 2), "both workers busy", 10)
    claimed = jobs(conn, "status = 'running'")
    assert len(claimed) > 10, "nothing buffered besides the 10 slots: the test would prove little"
    family = [p.pid for p in node.tree()]

    node.signal(signal.SIGTERM)
    assert node.wait(15) == 0, node.log()
    wait_for(lambda: not any(alive(p) for p in family), "no process left", 3)

    calls = sim.calls()
    after = {j["id"]: j for j in jobs(conn)}
    assert set(status_counts(conn)) <= {"succeeded", "queued"}, status_counts(conn)
    finished = [after[j["id"]] for j in claimed if after[j["id"]]["status"] == "succeeded"]
    given_back = [after[j["id"]] for j in claimed if after[j["id"]]["status"] == "queued"]
    # the 10 jobs in flight finished (called once, outcome written) ...
    assert len(finished) >= 10, (len(finished), len(given_back))
    assert_each_called_once(calls, finished)
    # ... and the buffered ones went back without being run or charged an attempt
    assert given_back, "no buffered job was given back"
    for j in [j for j in after.values() if j["status"] == "queued"]:
        assert j["id"] not in calls, (j, calls[j["id"]])
        assert (j["attempts"], j["deaths"], j["lease_owner"]) == (0, 0, None), j
    assert len(finished) + len(given_back) == len(claimed)
    assert "gave back" in node.log()


def test_a_second_term_gives_in_flight_jobs_back_at_once(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=20_000)
    node = launch.node(sim, "test-term2", workers=2, lease_s=30)
    client.submit("start", "a heron", n=20)
    node.wait_workers(2)
    wait_for(lambda: all_full(node, 2), "both workers busy", 10)

    node.signal(signal.SIGTERM)
    wait_for(lambda: "stop signal" in node.log(), "the first TERM noticed", 5)
    t0 = time.monotonic()
    node.signal(signal.SIGTERM)
    assert node.wait(5) == 0, node.log()
    assert time.monotonic() - t0 < 4
    wait_for(lambda: not node.tree(), "no process left", 3)
    # nothing ran to completion and nothing waits for a lease: all runnable again, uncharged
    assert status_counts(conn) == {"queued": 20}, status_counts(conn)
    assert all((j["attempts"], j["deaths"]) == (0, 0) for j in jobs(conn))


def test_quit_gives_everything_back_and_exits_at_once(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=20_000)
    node = launch.node(sim, "test-quit", workers=2, lease_s=30)
    client.submit("start", "a rail", n=20)
    node.wait_workers(2)
    wait_for(lambda: all_full(node, 2), "both workers busy", 10)

    t0 = time.monotonic()
    node.signal(signal.SIGQUIT)
    assert node.wait(5) == 0, node.log()
    assert time.monotonic() - t0 < 4
    wait_for(lambda: not node.tree(), "no process left", 3)
    assert status_counts(conn) == {"queued": 20}, status_counts(conn)
    assert all((j["attempts"], j["deaths"]) == (0, 0) for j in jobs(conn))


def test_hup_replaces_every_worker_without_losing_or_repeating_a_job(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=300)
    node = launch.node(sim, "test-hup", workers=2, lease_s=10)
    for _ in range(3):
        client.submit("start", "a crane")
    old = set(node.wait_workers(2).values())
    wait_for(lambda: all_full(node, 2), "both workers busy", 10)

    node.signal(signal.SIGHUP)
    wait_for(lambda: "every worker replaced" in node.log(), "the reload", 30)
    new = set(node.wait_workers(2).values())
    assert not old & new, (old, new)
    assert not any(alive(p) for p in old)

    wait_all_finished(conn, 90, timeout_s=60)
    assert status_counts(conn) == {"succeeded": 90}
    assert_each_called_once(sim.calls(), jobs(conn))
    assert "died" not in node.log()


def test_a_hup_that_lowers_the_worker_count_replaces_only_those_that_stay(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    config = launch.workdir / "genworker.toml"
    config.write_text("workers = 3\n")
    sim = launch.sim(latency_ms=300)
    node = launch.node(sim, "test-hup-fewer", "--config", str(config), workers=None)
    for _ in range(3):
        client.submit("start", "a curlew")
    old = set(node.wait_workers(3).values())

    config.write_text("workers = 1\n")
    node.signal(signal.SIGHUP)
    # a worker past the new count is stopped, not waited for (that took 60 s a worker)
    wait_for(lambda: "every worker replaced" in node.log(), "the reload", 20)
    wait_for(lambda: len(node.workers()) == 1, "one worker left", 20)
    assert not set(node.workers().values()) & old

    wait_all_finished(conn, 90, timeout_s=90)
    assert status_counts(conn) == {"succeeded": 90}
    assert_each_called_once(sim.calls(), jobs(conn))
    assert "died" not in node.log()


def test_ttin_and_ttou_change_the_worker_count_under_load(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=300)
    node = launch.node(sim, "test-ttin", workers=2, lease_s=10)
    for _ in range(3):
        client.submit("start", "a stork")
    node.wait_workers(2)

    def send(sig: signal.Signals, logged: str) -> None:
        # one at a time: the kernel folds a signal sent while the same one is pending
        seen = node.log().count(logged)
        node.signal(sig)
        wait_for(lambda: node.log().count(logged) > seen, f"{logged!r} logged", 5)

    send(signal.SIGTTIN, "TTIN: 3 workers")
    node.wait_workers(3)
    send(signal.SIGTTOU, "TTOU: 2 workers")
    send(signal.SIGTTOU, "TTOU: 1 workers")
    wait_for(lambda: len(node.workers()) == 1, "one worker left", 10)
    send(signal.SIGTTOU, "TTOU: 1 workers")  # never fewer than one
    send(signal.SIGTTIN, "TTIN: 2 workers")
    node.wait_workers(2)

    wait_all_finished(conn, 90, timeout_s=60)
    assert status_counts(conn) == {"succeeded": 90}
    assert_each_called_once(sim.calls(), jobs(conn))
    assert "died" not in node.log()
    node.signal(signal.SIGTERM)
    assert node.wait(10) == 0


def test_term_during_a_slow_reload_is_not_kept_waiting(
    launch: Launcher, client: Client, conn: psycopg.Connection, tmp_path: Path
) -> None:
    slow = tmp_path / "slow-boot"
    sim = launch.sim(latency_ms=300)
    node = launch.node(
        sim,
        "test-hup-term",
        "--handler",
        "ok=supervisor_handlers:ok",
        "--graceful-timeout",
        "3",
        workers=2,
        env={"GW_TEST_SLOW_BOOT_FILE": str(slow)},
    )
    client.submit("start", "a plover", n=30)
    node.wait_workers(2)
    slow.write_text("60")  # from now on a worker takes a minute to boot
    node.signal(signal.SIGHUP)
    wait_for(lambda: "HUP: replacing" in node.log(), "the reload started", 5)

    t0 = time.monotonic()
    node.signal(signal.SIGTERM)
    assert node.wait(10) == 0, node.log()
    assert time.monotonic() - t0 < 6  # the graceful timeout (3 s), not the boot (60 s)
    wait_for(lambda: not node.tree(), "no process left", 3)
    assert "running" not in status_counts(conn), status_counts(conn)
    calls = sim.calls()
    for j in jobs(conn):  # nothing lost, nothing run twice
        if j["status"] == "succeeded":
            assert calls[j["id"]] == {1: 1}, j
        else:
            assert j["status"] == "queued", j
            assert j["id"] not in calls, j


def test_recycled_workers_are_replaced_without_a_death_or_a_repeat(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=100)
    node = launch.node(sim, "test-recycle", "--max-jobs-per-worker", "10", workers=2)
    first = set(node.wait_workers(2).values())
    client.submit("start", "a wren", n=30)
    client.submit("start", "a wren", n=30)

    wait_all_finished(conn, 60, timeout_s=30)
    assert status_counts(conn) == {"succeeded": 60}
    assert_each_called_once(sim.calls(), jobs(conn))
    log = node.log()
    assert log.count("recycling worker") >= 4, log
    assert "died" not in log
    assert not first & set(node.wait_workers(2).values())
    node.signal(signal.SIGTERM)
    assert node.wait(10) == 0
    assert node_info(conn, "test-recycle")["restarts"] == {}
