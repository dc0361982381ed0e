"""Several hosts on one database: three supervisors with their own node ids share the work
and finish nothing twice; a host that dies (its supervisor and workers SIGKILLed at once)
has its jobs taken by the others when their leases run out, and shows as dead; a
supervisor restarted under its node id gives its previous life's jobs back at once; and
the cluster-wide API caps (--api-rps, --api-max-inflight) hold across the three, as the
simulated API counts them."""

from __future__ import annotations

import signal
import time

import psycopg
from audit import Faults, audit
from genworker.node.upkeep import reap_every_s
from genworker.queue.client import Client
from supervisor_harness import (
    Launcher,
    Node,
    jobs,
    launch_fixture,  # noqa: F401  (the launch fixture)
    wait_all_finished,
    wait_for,
)

LEASE_S = 3.0
REAP_EVERY_S = reap_every_s(LEASE_S)  # the reaper interval for this lease


def three_nodes(launch: Launcher, sim: object, *args: str, workers: int = 2) -> list[Node]:
    nodes = [
        launch.node(sim, f"host-{name}", *args, workers=workers, lease_s=LEASE_S)  # type: ignore[arg-type]
        for name in "abc"
    ]
    for n in nodes:
        n.wait_workers(workers, timeout_s=60)
    return nodes


def wait_cluster_known(conn: psycopg.Connection, n: int) -> None:
    """Every node alive in the table, and a heartbeat round later each has counted them
    all (a node learns the live count at its heartbeat, every lease/3)."""
    wait_for(
        lambda: conn.execute(
            "SELECT count(*) = %s FROM genworker.nodes WHERE status = 'alive'", (n,)
        ).fetchone()[0],  # type: ignore[index]
        f"{n} live nodes",
        30,
    )
    time.sleep(2 * LEASE_S / 3 + 0.5)


def finished_by(conn: psycopg.Connection) -> dict[str, int]:
    """Succeeded jobs per node (the claim that completed a job leaves its lease_owner)."""
    rows = conn.execute(
        "SELECT lease_owner, count(*) FROM genworker.jobs WHERE status = 'succeeded'"
        " GROUP BY lease_owner"
    ).fetchall()
    return {owner: int(n) for owner, n in rows}


def test_three_hosts_share_the_work_and_finish_nothing_twice(
    launch: Launcher, client: Client, conn: psycopg.Connection, dsn: str
) -> None:
    sim = launch.sim("--fail-500", "0.05", "--seed", "3", latency_ms=100, jitter_ms=50)
    three_nodes(launch, sim, "--retry-base", "0.1", "--retry-max", "0.5")
    wait_cluster_known(conn, 3)
    client.submit_many([{"plan": "start", "prompt": f"shared {i}"} for i in range(20)])
    wait_all_finished(conn, 600, timeout_s=120)

    report = audit(dsn, sim.stats(), submitted=600)
    assert report.ok, report.summary()
    assert report.by_status == {"succeeded": 600}
    assert report.duplicates == 0  # no host died: no image was ever lost and redone
    shares = finished_by(conn)
    assert set(shares) == {"host-a", "host-b", "host-c"}, shares
    assert min(shares.values()) >= 600 // 10, shares  # each host took a real share


def test_a_dead_host_s_jobs_are_back_in_flight_within_its_lease_and_one_reaper_pass(
    launch: Launcher, client: Client, conn: psycopg.Connection, dsn: str
) -> None:
    sim = launch.sim(latency_ms=2500)
    nodes = three_nodes(launch, sim)
    wait_cluster_known(conn, 3)
    client.submit("start", "a harbour at night", n=30)  # one call in flight per slot
    wait_for(lambda: len(jobs(conn, "status = 'running'")) == 30, "30 jobs claimed", 20)
    held_by = {
        n.node_id: {j["id"] for j in jobs(conn, "lease_owner = %s", (n.node_id,))} for n in nodes
    }
    victim = max(nodes, key=lambda n: len(held_by[n.node_id]))
    held = held_by[victim.node_id]
    assert held

    victim.kill_session()  # the host is gone: supervisor, zygote and workers at once
    killed_at = time.monotonic()
    assert victim.wait(5) == -signal.SIGKILL

    def back_in_flight() -> bool:
        rows = jobs(conn, "id = ANY(%s)", (list(held),))
        return all(
            j["status"] == "succeeded"
            or (j["status"] == "running" and j["lease_owner"] != victim.node_id)
            for j in rows
        )

    wait_for(back_in_flight, "the dead host's jobs running on the others", 30, every_s=0.05)
    recovery_s = time.monotonic() - killed_at
    print(f"\ndead host: {len(held)} jobs back in flight after {recovery_s:.2f}s")
    # Its last renewal was at most lease/3 before the kill, so the leases ran out within
    # LEASE_S; a live node's reaper passes every REAP_EVERY_S; NOTIFY wakes the claimers.
    assert recovery_s <= LEASE_S + REAP_EVERY_S + 1.0

    wait_for(
        lambda: (
            conn.execute(
                "SELECT status FROM genworker.nodes WHERE id = %s", (victim.node_id,)
            ).fetchone()
            == ("dead",)
        ),
        "the dead host marked dead",
        10,
    )
    wait_all_finished(conn, 30, timeout_s=30)
    faults = Faults(supervisor_kills=1, held_at_node_kills=held)
    report = audit(dsn, sim.stats(), submitted=30, faults=faults)
    assert report.ok, report.summary()
    for j in jobs(conn, "id = ANY(%s)", (list(held),)):
        # claimed once by the dead host, once more by a live one, which finished it
        assert j["token"] == 2, j
        assert j["lease_owner"] != victim.node_id, j


def test_a_supervisor_restarted_under_its_node_id_gives_its_jobs_back_at_once(
    launch: Launcher, client: Client, conn: psycopg.Connection, dsn: str
) -> None:
    sim = launch.sim(latency_ms=1500)
    lease_s = 60.0  # long: nothing here may wait for a lease
    first = launch.node(sim, "host-same", workers=2, lease_s=lease_s)
    first.wait_workers(2)
    client.submit("start", "a tide pool", n=10)
    wait_for(lambda: len(jobs(conn, "status = 'running'")) == 10, "10 jobs claimed", 20)
    held = {j["id"] for j in jobs(conn, "status = 'running'")}

    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    first.wait(5)
    again = launch.node(sim, "host-same", workers=2, lease_s=lease_s)  # what systemd does
    again.wait_workers(2)
    wait_all_finished(conn, 10, timeout_s=30)
    assert time.monotonic() - killed_at < lease_s / 3
    assert "gave back 10 jobs held by a previous run of node host-same" in again.log()
    faults = Faults(supervisor_kills=1, supervisor_restarts=1, held_at_node_kills=held)
    report = audit(dsn, sim.stats(), submitted=10, faults=faults)
    assert report.ok, report.summary()
    assert report.deaths == 0  # given back by its own node: not a death


def test_the_cluster_wide_rate_holds_across_three_hosts(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    rps = 30
    sim = launch.sim(latency_ms=20, jitter_ms=5)
    three_nodes(launch, sim, "--api-rps", str(rps))
    wait_cluster_known(conn, 3)
    sim.reset_stats()
    client.submit_many([{"plan": "start", "prompt": f"paced {i}"} for i in range(10)])
    started = time.monotonic()
    wait_all_finished(conn, 300, timeout_s=120)
    elapsed = time.monotonic() - started
    stats = sim.stats()
    print(f"\n--api-rps {rps} over 3 hosts: at most {stats['max_in_any_second']} calls in a second")
    # Each host draws rps/3 from its own bucket: in any second at most that plus one burst
    # (a tenth of a second's worth, at least 1) and one at the window's edge.
    burst = max(1, rps / 3 * 0.1)
    assert stats["max_in_any_second"] <= rps + 3 * (burst + 1), stats["max_in_any_second"]
    # ... and the cap was what held them back: 30 slots at 20 ms could call 1500 times a second
    assert stats["max_in_any_second"] >= 0.7 * rps
    assert elapsed >= 300 / (rps + 3 * (burst + 1)) * 0.9


def test_the_cluster_wide_inflight_cap_holds_across_three_hosts(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    cap = 12
    sim = launch.sim(latency_ms=300, jitter_ms=50)
    three_nodes(launch, sim, "--api-max-inflight", str(cap))
    wait_cluster_known(conn, 3)
    sim.reset_stats()
    client.submit_many([{"plan": "start", "prompt": f"held {i}"} for i in range(4)])
    wait_all_finished(conn, 120, timeout_s=120)
    stats = sim.stats()
    print(f"\n--api-max-inflight {cap} over 3 hosts: at most {stats['max_inflight']} at once")
    # each host dispatches at most cap // 3 jobs at a time; 30 slots would hold 30
    assert stats["max_inflight"] <= cap, stats["max_inflight"]
    assert stats["max_inflight"] >= cap - 3
