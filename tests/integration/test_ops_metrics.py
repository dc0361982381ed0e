"""/metrics of a real node against what the database says: jobs done, dead and in flight
add up, during a run and after it; the exposition is read by a strict parser."""

from __future__ import annotations

import signal
import time

import psycopg
from exposition import Sample, family
from genworker.queue.client import Client
from ops_support import http_address, readyz, scrape
from supervisor_harness import (
    Launcher,
    launch_fixture,  # noqa: F401  (the launch fixture)
    status_counts,
    wait_all_finished,
    wait_for,
)


def v(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: dict[Sample, float], name: str) -> float:
    return sum(family(samples, name).values())


def test_in_flight_jobs_are_where_the_database_says(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=60_000)  # nothing finishes while we look
    node = launch.node(sim, "test-metrics-held", "--http", "127.0.0.1:0", workers=2, lease_s=10)
    address = http_address(node)
    node.wait_workers(2)
    client.submit("start", "a still heron", n=20)  # 10 slots and a buffer of 10: all claimed
    wait_for(lambda: status_counts(conn) == {"running": 20}, "20 jobs claimed", 20)
    client.submit("start", "a waiting heron", n=5)  # the buffer is full: these wait

    def settled() -> dict[Sample, float] | None:
        m = scrape(address)
        busy = total(m, "genworker_worker_slots_busy")
        queued = frozenset({("plan", "start"), ("state", "queued")})
        figures = m.get(("genworker_queue_jobs", queued))
        return m if busy == 10 and figures == 5 else None

    m = wait_for(settled, "the workers' slots and the queue figures to show", 20)
    assert status_counts(conn) == {"running": 20, "queued": 5}
    assert v(m, "genworker_jobs_in_flight", where="workers") == 10
    assert v(m, "genworker_jobs_in_flight", where="buffer") == 10
    assert v(m, "genworker_jobs_in_flight", where="writing") == 0
    assert v(m, "genworker_jobs_claimed_total") == 20
    assert v(m, "genworker_queue_jobs", plan="start", state="running") == 20
    assert v(m, "genworker_queue_tasks", state="queued") == 1
    assert v(m, "genworker_queue_tasks", state="running") == 1
    assert v(m, "genworker_queue_oldest_runnable_age_seconds") > 0
    assert family(m, "genworker_worker_slots_limit") == {
        frozenset({("worker", "0")}): 5,
        frozenset({("worker", "1")}): 5,
    }
    assert v(m, "genworker_workers_up") == 2
    assert v(m, "genworker_nodes") == 1
    assert v(m, "genworker_ready") == 1
    assert readyz(address) == (200, {"ready": True, "reasons": []})

    node.signal(signal.SIGQUIT)  # give everything back now rather than in a minute
    assert node.wait(15) == 0, node.log()[-3000:]
    assert status_counts(conn) == {"queued": 25}


def test_counters_add_up_to_the_database_during_and_after_a_run(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    # a 400 kills a job at once; a 500 is retried
    sim = launch.sim("--fail-400", "0.15", "--fail-500", "0.1", latency_ms=150, jitter_ms=100)
    node = launch.node(
        sim, "test-metrics-run", "--http", "127.0.0.1:0", "--retry-base", "0.05",
        workers=2, lease_s=3,
    )  # fmt: skip
    address = http_address(node)
    node.wait_workers(2)
    client.submit_many([{"plan": "start", "params": {"prompt": f"p{i}"}} for i in range(3)])
    n_jobs = 90

    # during the run: never more than the database has, never less than it had before
    db_earlier: dict[str, int] = {}
    last: dict[Sample, float] = {}
    scrapes = 0
    while True:
        m = scrape(address)
        db = status_counts(conn)
        scrapes += 1
        for metric, state in (
            ("genworker_jobs_succeeded_total", "succeeded"),
            ("genworker_jobs_dead_total", "dead"),
        ):
            assert db_earlier.get(state, 0) <= v(m, metric) <= db.get(state, 0), (metric, db)
        for key, before in last.items():  # counters and histogram buckets never go down
            if key[0].endswith(("_total", "_bucket", "_count")):
                assert m[key] >= before, key
        last, db_earlier = m, db
        if db.get("succeeded", 0) + db.get("dead", 0) == n_jobs:
            break
        time.sleep(0.3)
    assert scrapes >= 3, "the run ended before it could be watched"

    # after it: exactly what the database says
    wait_all_finished(conn, n_jobs)
    db = status_counts(conn)

    def written() -> dict[Sample, float] | None:
        m = scrape(address)
        done = v(m, "genworker_jobs_succeeded_total") + v(m, "genworker_jobs_dead_total")
        tasks = sum(  # succeeded or failed (a 400 kills a job): each task once
            n for (name, labels), n in m.items()
            if name == "genworker_task_completion_seconds_count" and ("plan", "start") in labels
        )  # fmt: skip
        return m if done == n_jobs and tasks == 3 else None

    m = wait_for(written, "every outcome and task in /metrics", 20)
    assert v(m, "genworker_jobs_succeeded_total") == db["succeeded"]
    assert v(m, "genworker_jobs_dead_total") == db["dead"] > 0
    assert total(m, "genworker_jobs_in_flight") == 0 == db.get("running", 0)
    retried = v(m, "genworker_jobs_retried_total")
    assert retried > 0
    assert v(m, "genworker_jobs_claimed_total") == db["succeeded"] + db["dead"] + retried
    assert v(m, "genworker_jobs_released_total") == 0

    refused = conn.execute(
        "SELECT count(*) FROM genworker.jobs WHERE status = 'dead' AND error LIKE 'HTTP 400%'"
    ).fetchone()[0]
    spent = conn.execute(
        "SELECT count(*) FROM genworker.jobs WHERE error LIKE 'attempts spent%'"
    ).fetchone()[0]
    assert refused + spent == db["dead"]
    calls = sim.stats()["total"]
    assert v(m, "genworker_api_responses_total", status_class="2xx") == db["succeeded"]
    assert v(m, "genworker_api_responses_total", status_class="4xx") == refused
    assert v(m, "genworker_api_responses_total", status_class="5xx") == retried + spent
    assert total(m, "genworker_api_responses_total") == calls
    assert v(m, "genworker_api_call_seconds_count") == calls
    assert v(m, "genworker_api_call_seconds_bucket", le="+Inf") == calls
    assert v(m, "genworker_api_call_seconds_bucket", le="0.025") < calls  # 150 ms +- 100
    assert v(m, "genworker_queue_tasks", state="queued") == 0
    assert total(m, "genworker_queue_jobs") == 0
    # an empty queue is zeros for every plan and state, not a metric that vanished
    for plan in ("free", "start", "pro"):
        for state in ("queued", "scheduled", "running"):
            assert (
                m.get(("genworker_queue_jobs", frozenset({("plan", plan), ("state", state)}))) == 0
            )
    assert v(m, "genworker_db_pool_wait_seconds_count") > 0
    assert total(m, "genworker_db_pool_connections") >= 1
    assert v(m, "genworker_leases_renewed_total") >= 0
    assert total(m, "genworker_worker_restarts_total") == 0
