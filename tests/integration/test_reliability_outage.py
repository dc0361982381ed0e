"""Database outages, on a PostgreSQL of the test's own (the machine's shared server is
never stopped): while it is down the workers finish the calls they hold, the supervisor
claims nothing, keeps the outcomes in memory (no more than the jobs it holds) and says
why (title and /readyz); when it is back the outcomes are written under the same claims
and work resumes within 5 s, without a restart. An exhausted pool is a fast, logged
error; a stop during an outage ends in bounded time, and nothing it held is lost."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import psycopg
from audit import Faults, audit
from genworker.queue.client import Client
from ops_support import http_address, readyz
from supervisor_harness import (
    Launcher,
    PrivatePostgres,
    jobs,
    launch_fixture,  # noqa: F401  (the launch fixture)
    private_pg,  # noqa: F401  (the private_pg fixture)
    status_counts,
    wait_all_finished,
    wait_for,
)

RESUME_S = 5.0  # the bound: work resumes within this of PostgreSQL's return


def claims(conn: psycopg.Connection) -> int:
    """Claims made so far: every claim bumps one job's token."""
    row = conn.execute("SELECT coalesce(sum(token), 0) FROM genworker.jobs").fetchone()
    assert row is not None
    return int(row[0])


def test_an_outage_keeps_calls_and_outcomes_and_work_resumes_within_5s_of_the_return(
    launch: Launcher,
    private_pg: PrivatePostgres,  # noqa: F811
) -> None:
    dsn = private_pg.create_database("outage")
    sim = launch.sim(latency_ms=2000)
    node = launch.node(
        sim, "test-outage", "--http", "127.0.0.1:0", dsn=dsn, workers=2, lease_s=30
    )  # the lease outlasts the outage: the claims stay this node's
    address = http_address(node)
    workers = node.wait_workers(2)
    conn = psycopg.connect(dsn, autocommit=True)
    with Client(dsn) as client:
        client.submit("start", "a lantern", n=30)
    # 10 calls in flight (2 workers x 5 slots), 10 more jobs buffered, 10 left queued
    held = wait_for(
        lambda: (
            len(r := jobs(conn, "status = 'running'")) == 20 and sim.stats()["inflight"] == 10 and r
        ),
        "20 jobs held, 10 calls in flight",
        20,
    )
    held_tokens = {j["id"]: j["token"] for j in held}
    conn.close()

    private_pg.stop("immediate")  # a crash: every connection dies at once
    down_at = time.monotonic()
    # The workers finish what they hold, the buffer included: 20 images, and no call for
    # a job the node did not hold (it claims nothing while the database is away).
    wait_for(lambda: sum(sim.stats()["images_by_request_id"].values()) == 20, "20 images", 15)
    called = sim.calls()
    assert set(called) == set(held_tokens), called
    assert all(called[j] == {t: 1} for j, t in held_tokens.items()), called
    wait_for(lambda: "db-down" in node.title(), "db-down in the supervisor's title", 10)
    status, doc = readyz(address)
    assert status == 503
    assert "database unreachable" in doc["reasons"], doc
    assert node.workers() == workers  # the same worker processes: nothing restarted
    # Stay down for 20 s: psycopg_pool's reconnection attempts back off 1, 2, 4, 8, 16 s
    # by default, which once left the node waiting 11-20 s after the server was back.
    time.sleep(max(0.0, 20.0 - (time.monotonic() - down_at)))
    node.check_running()

    private_pg.start()
    back_at = time.monotonic()
    conn = psycopg.connect(dsn, autocommit=True)
    before = claims(conn)
    wait_for(
        lambda: status_counts(conn).get("succeeded", 0) >= 20,
        "the outcomes held in memory written",
        RESUME_S + 5,
        every_s=0.05,
    )
    written_s = time.monotonic() - back_at
    wait_for(lambda: claims(conn) > before, "a new claim", RESUME_S + 5, every_s=0.05)
    claimed_s = time.monotonic() - back_at
    print(
        f"\nback after the outage: outcomes written in {written_s:.2f}s, claims in {claimed_s:.2f}s"
    )
    assert written_s <= RESUME_S
    assert claimed_s <= RESUME_S
    for j in jobs(conn, "id = ANY(%s)", (list(held_tokens),)):
        # written under the claim that made the call: the fence let it through
        assert (j["status"], j["token"]) == ("succeeded", held_tokens[j["id"]]), j

    wait_all_finished(conn, 30, timeout_s=30)
    wait_for(lambda: "db-down" not in node.title(), "db-down gone from the title", 5)
    # /readyz no longer blames the database (the db_wait alarm may linger for its window)
    _, doc = readyz(address)
    assert "database unreachable" not in doc["reasons"], doc
    assert node.workers() == workers
    report = audit(dsn, sim.stats(), submitted=30)
    assert report.ok, report.summary()
    assert report.duplicates == 0  # nothing ran twice: the outage cost no call
    log = node.log()
    assert log.count("database unreachable") == 1, log[-3000:]  # one line, not one per retry
    assert "database reachable again" in log
    conn.close()


def test_an_exhausted_pool_is_a_fast_logged_error_and_the_node_carries_on(
    launch: Launcher, client: Client, conn: psycopg.Connection, dsn: str
) -> None:
    sim = launch.sim(latency_ms=300)
    node = launch.node(
        sim, "test-pool", "--db-pool-size", "1", "--db-pool-timeout", "1", workers=2, lease_s=3
    )
    node.wait_workers(2)
    client.submit("start", "a windmill", n=30)
    wait_for(lambda: status_counts(conn).get("succeeded", 0) >= 5, "work under way", 20)
    # Someone holds the jobs table: the node's one connection waits on the lock in a
    # statement, so every other use of the pool has to wait for a connection.
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE genworker.jobs IN ACCESS EXCLUSIVE MODE")
        locked_at = time.monotonic()
        line = wait_for(
            lambda: re.search(
                r".*database pool exhausted \(.*?\) \(([^)]*PoolTimeout)\)", node.log()
            ),
            "a PoolTimeout logged",
            15,
        )
        logged_s = time.monotonic() - locked_at
        time.sleep(3)
        node.check_running()
    print(f"\nexhausted pool: '{line[1]}' logged {logged_s:.2f}s after the lock")
    # within the pool timeout (1 s) of the first loop that needed a connection (the lease
    # loop, every lease/3 = 1 s), not an endless wait
    assert logged_s <= 1.0 + 1.0 + 3.0
    wait_all_finished(conn, 30, timeout_s=60)
    assert status_counts(conn) == {"succeeded": 30}
    assert "database reachable again" in node.log()


def test_a_stop_during_an_outage_ends_in_bounded_time_and_loses_nothing(
    launch: Launcher,
    private_pg: PrivatePostgres,  # noqa: F811
) -> None:
    dsn = private_pg.create_database("outage_stop")
    sim = launch.sim(latency_ms=1000)
    args = ("--db-pool-timeout", "1", "--graceful-timeout", "3")
    first = launch.node(sim, "test-stop-a", *args, dsn=dsn, workers=2, lease_s=3)
    first.wait_workers(2)
    with psycopg.connect(dsn, autocommit=True) as conn, Client(dsn) as client:
        client.submit("start", "a lighthouse keeper", n=20)
        held = wait_for(
            lambda: len(r := jobs(conn, "status = 'running'")) == 20 and r, "20 jobs held", 20
        )
    held_ids = {j["id"] for j in held}

    private_pg.stop("immediate")
    wait_for(lambda: "db-down" in first.title(), "db-down in the title", 15)
    first.signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    code = first.wait(60)  # its outcomes cannot be written: it must give up, not hang
    stop_s = time.monotonic() - stopped_at
    print(f"\nstop during an outage: exit {code} after {stop_s:.1f}s")
    assert code == 0, first.log()[-3000:]
    assert stop_s < 45

    private_pg.start()  # the jobs it held come back when their leases run out
    second = launch.node(sim, "test-stop-b", *args, dsn=dsn, workers=2, lease_s=3)
    second.wait_workers(2)
    with psycopg.connect(dsn, autocommit=True) as conn:
        wait_all_finished(conn, 20, timeout_s=60)
    faults = Faults(supervisor_restarts=1, db_restarts=1, held_at_node_kills=held_ids)
    report = audit(dsn, sim.stats(), submitted=20, faults=faults)
    assert report.ok, report.summary()


def test_a_write_cut_short_by_the_stop_keeps_its_outcomes_pending() -> None:
    """The stop cancels a write that hangs (the database is away or slow); the batch it
    held must stay pending, or the shutdown would give back jobs that already ran (their
    outcomes lost, their API calls made again)."""
    from genworker.config import Settings
    from genworker.model import Outcome, OutcomeKind
    from genworker.node.feeder import Feeder

    async def scenario() -> list[tuple[Outcome, int]]:
        feeder = Feeder(Settings(), "postgresql://nowhere.invalid/x", "n", list, print)
        written = asyncio.Event()

        async def hanging_write(outcomes: object) -> None:
            written.set()
            await asyncio.sleep(3600)

        feeder.queue.complete = hanging_write  # type: ignore[method-assign]
        outcomes = [(Outcome(i, 1, OutcomeKind.OK, {}), 1) for i in range(3)]
        stop = asyncio.Event()
        writer = asyncio.create_task(feeder.writer.write_loop(stop))
        feeder.writer.add(outcomes)
        stop.set()
        await asyncio.wait_for(written.wait(), 5)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        return feeder.holdings.pending

    assert asyncio.run(scenario()) == [(Outcome(i, 1, OutcomeKind.OK, {}), 1) for i in range(3)]
