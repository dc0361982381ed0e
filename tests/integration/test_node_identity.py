"""A node id belongs to one live supervisor: the default (the host name) is stable across
restarts, so a restarted node takes back its jobs at once, and a second live supervisor
under the same id is refused instead of renewing and giving back the first one's jobs."""

from __future__ import annotations

import signal
import socket

import psycopg
from genworker.queue.client import Client
from supervisor_harness import (
    Launcher,
    jobs,
    launch_fixture,  # noqa: F401  (the launch fixture)
    node_info,
    status_counts,
    wait_all_finished,
    wait_for,
)


def test_a_second_live_supervisor_under_the_same_id_is_refused(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=200)
    first = launch.node(sim, "test-twin", workers=1)
    first.wait_workers(1)
    wait_for(lambda: node_info(conn, "test-twin").get("_status") == "alive", "registered", 10)
    second = launch.node(sim, "test-twin", workers=1)
    assert second.wait(30) == 2
    assert "node id 'test-twin' is in use by the supervisor with pid" in second.log()
    first.check_running()


def test_the_default_id_is_the_host_name_and_a_restart_takes_its_jobs_back_at_once(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=5000)  # jobs stay in flight while we kill the node
    first = launch.node(sim, "", workers=1, lease_s=60)  # no --node-id: the default
    client.submit("start", "a heron", n=5)
    wait_for(lambda: status_counts(conn).get("running", 0) == 5, "5 jobs in flight", 30)
    assert {j["lease_owner"] for j in jobs(conn)} == {socket.gethostname()}
    first.kill_session()  # supervisor, zygote and workers: a crash, no goodbye
    second = launch.node(sim, "", workers=1, lease_s=60)
    # the lease has 60 s to run: only the restart under the same id gives them back now
    wait_for(
        lambda: (
            status_counts(conn).get("running", 0) == 5 and all(j["token"] == 2 for j in jobs(conn))
        ),
        "the jobs back in flight",
        30,
    )
    wait_all_finished(conn, 5, timeout_s=60)
    assert "held by a previous run of node" in second.log()
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0
