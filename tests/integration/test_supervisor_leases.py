"""A node renews the lease of every job it holds (with a worker, in its buffer, or with an
outcome not yet written), so a call that outlasts the lease is never taken away from it."""

from __future__ import annotations

import psycopg
from genworker.queue.client import Client
from supervisor_harness import (
    Launcher,
    jobs,
    launch_fixture,  # noqa: F401  (the launch fixture)
    status_counts,
    wait_all_finished,
)


def test_calls_longer_than_the_lease_keep_their_jobs(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=2500)  # each call outlasts the 1 s lease twice over
    node = launch.node(sim, "test-renew", "--concurrency", "2", workers=1, lease_s=1)
    node.wait_workers(1)
    client.submit("start", "a slow osprey", n=6)  # 2 running, the rest buffered meanwhile
    wait_all_finished(conn, 6, timeout_s=60)
    assert status_counts(conn) == {"succeeded": 6}
    calls = sim.calls()
    for j in jobs(conn):
        assert calls.get(j["id"]) == {1: 1}, (j, calls.get(j["id"]))
        assert (j["token"], j["attempts"]) == (1, 1), j
    assert "expired leases requeued" not in node.log()
