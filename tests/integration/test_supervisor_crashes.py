"""Workers that die on their own: a crash-looping position backs off and marks the node
degraded while the others work; every position crash-looping stops the node (exit 6); a
worker that cannot boot stops it at once (exit 3); a job that kills its worker goes dead
after --max-worker-deaths with the reason; a worker whose heartbeat stops is replaced."""

from __future__ import annotations

import itertools
import os
import re
import signal
from datetime import datetime

import psycopg
from genworker.queue.client import Client
from supervisor_harness import (
    Launcher,
    alive,
    jobs,
    launch_fixture,  # noqa: F401  (the launch fixture)
    node_info,
    status_counts,
    wait_all_finished,
    wait_for,
)

OK_HANDLERS = "ok=supervisor_handlers:ok,crash=supervisor_handlers:crash"
DEATH = re.compile(
    r"^(\S+) WARNING genworker.arbiter: worker (\d+) \(pid \d+\) died: (.*?); "
    r"(\d+) jobs back in the queue \((\d+) were running\); restarting in ([\d.]+)s(.*)$",
    re.M,
)


def deaths_of(log: str, position: int) -> list[tuple[float, float, str]]:
    """(seconds since the first, announced delay, rest of line) of each logged death."""
    out = []
    for m in DEATH.finditer(log):
        if int(m[2]) == position:
            t = datetime.strptime(m[1], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
            out.append((t, float(m[6]), m[3] + m[7]))
    return [(t - out[0][0], d, rest) for t, d, rest in out]


def test_a_crash_looping_worker_backs_off_and_the_node_reports_degraded(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=50)
    node = launch.node(
        sim,
        "test-crashloop",
        "--handler",
        OK_HANDLERS,
        workers=2,
        env={"GW_TEST_CRASH_AT_BOOT_SLOT": "1"},  # worker 1 dies in every boot
    )
    wait_for(
        lambda: "crash loop: held back" in node.log() or node.check_running(),
        "worker 1 held back",
        30,
    )
    deaths = deaths_of(node.log(), 1)
    assert [d for _, d, _ in deaths] == [0.1, 0.2, 0.4, 0.8, 30.0], deaths
    for (t0, delay, _), (t1, _, _) in itertools.pairwise(deaths):
        assert t1 - t0 >= delay - 0.01, deaths  # each restart waited out its backoff
    assert all(why.startswith("exited with code 1") for _, _, why in deaths)
    wait_for(lambda: node_info(conn, "test-crashloop").get("degraded"), "degraded in nodes", 5)
    wait_for(lambda: " degraded" in node.title(), "degraded in the title", 3)

    # The other worker is not held back with it: the node keeps working.
    client.submit("start", params={}, kind="ok", n=20)
    wait_all_finished(conn, 20, timeout_s=20)
    assert status_counts(conn) == {"succeeded": 20}
    assert len(deaths_of(node.log(), 1)) == 5  # held back: no sixth start within 30 s
    assert deaths_of(node.log(), 0) == []
    wait_for(
        lambda: node_info(conn, "test-crashloop")["restarts"] == {"exit": 5},
        "5 restarts counted",
        5,
    )


def test_every_worker_crash_looping_stops_the_node_with_exit_6(
    launch: Launcher, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=50)
    node = launch.node(
        sim,
        "test-allcrash",
        "--handler",
        OK_HANDLERS,
        workers=1,
        env={"GW_TEST_CRASH_AT_BOOT_SLOT": "0"},
    )
    assert node.wait(30) == 6, node.log()
    assert "every worker keeps crashing" in node.log()
    wait_for(lambda: not node.tree(), "no process left", 3)


def test_a_worker_that_cannot_boot_stops_the_node_with_exit_3(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    client.submit("start", "a swan", n=5)
    sim = launch.sim(latency_ms=50)
    node = launch.node(sim, "test-boot", "--handler", "bad=no_such_module_xyz:run", workers=2)
    assert node.wait(20) == 3, node.log()
    log = node.log()
    assert "cannot import no_such_module_xyz" in log
    assert "cannot start" in log
    assert "restarting in" not in log  # a boot failure is not retried
    wait_for(lambda: not node.tree(), "no process left", 3)
    assert status_counts(conn) == {"queued": 5}


def test_a_job_that_kills_its_worker_goes_dead_after_3_deaths_with_the_reason(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=300)
    # One slot per worker: the poison job shares its worker with no other job (the test
    # below shows what happens to jobs that do).
    node = launch.node(
        sim,
        "test-poison",
        "--handler",
        "poison=supervisor_handlers:poison",
        "--concurrency",
        "1",
        workers=2,
    )
    node.wait_workers(2)
    poison = client.submit("free", params={}, kind="poison", n=1)
    client.submit("start", "a gull", n=10)

    wait_all_finished(conn, 11, timeout_s=40)
    [bad] = jobs(conn, "task_id = %s", (poison,))
    assert bad["status"] == "dead", bad
    assert bad["deaths"] == 3, bad
    assert bad["error"] == (
        "worker died while running it: killed by SIGKILL (out of memory? see dmesg)"
    )
    assert status_counts(conn) == {"succeeded": 10, "dead": 1}, status_counts(conn)
    assert client.get(poison).status == "failed"
    wait_for(
        lambda: node_info(conn, "test-poison").get("restarts") == {"signal": 3},
        "3 restarts counted",
        5,
    )
    node.wait_workers(2)  # and the node is still whole


def test_a_worker_whose_heartbeat_stops_is_killed_and_replaced(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=1500)  # 30 jobs on 10 slots outlast the workers' start
    node = launch.node(sim, "test-hang", "--worker-timeout", "1", workers=2, lease_s=10)
    client.submit("start", "a tern", n=30)
    workers = node.wait_workers(2)
    wait_for(lambda: status_counts(conn).get("running", 0) >= 10, "jobs in flight", 10)

    os.kill(workers[0], signal.SIGSTOP)  # its loop stops: no heartbeat, TERM does nothing
    wait_for(lambda: not alive(workers[0]), "the stopped worker killed", 10)
    wait_for(lambda: node.workers().get(0) not in (None, workers[0]), "worker 0 back", 10)
    wait_all_finished(conn, 30, timeout_s=30)
    assert status_counts(conn) == {"succeeded": 30}
    assert "heartbeat timeout" in node.log()
    wait_for(
        lambda: node_info(conn, "test-hang").get("restarts") == {"heartbeat_timeout": 1},
        "the restart counted",
        5,
    )


def test_jobs_that_shared_a_worker_with_a_poison_job_are_not_killed_with_it(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    poison = client.submit("free", params={}, kind="poison", n=1)
    client.submit("start", "a puffin", n=4)  # they fit in the same worker's 5 slots
    sim = launch.sim(latency_ms=300)
    launch.node(sim, "test-bystanders", "--handler", "poison=supervisor_handlers:poison", workers=1)

    wait_all_finished(conn, 5, timeout_s=30)
    [bad] = jobs(conn, "task_id = %s", (poison,))
    assert bad["status"] == "dead", bad
    innocent = jobs(conn, "task_id <> %s", (poison,))
    assert [j["status"] for j in innocent] == ["succeeded"] * 4, innocent
