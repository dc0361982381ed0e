"""Queue benchmarks on the real PostgreSQL (GENWORKER_TEST_DATABASE_URL), one connection,
the real Queue:

- throughput: claim a batch and complete it as ok, at batch sizes 1, 10, 100, 500;
- claim latency at batch 100: with 0 and 1,000,000 finished jobs in the table, and with
  100,000 runnable jobs (1,000 tasks, 100 tenants) against a small queue.

Run: GENWORKER_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \
     .venv/bin/pytest bench/test_bench_queue.py --benchmark-json=/tmp/queue-raw.json
(the summary goes to bench/results/queue.json; the raw pytest-benchmark data is large)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from genworker.model import Job, Outcome, OutcomeKind

from .queue_support import LoopQueue, load_tasks, timing_summary, vacuum_analyze

NODE, LEASE_S = "bench-node", 300.0

# batch size -> timed rounds (each round claims and completes one batch)
THROUGHPUT_ROUNDS = {1: 1000, 10: 500, 100: 300, 500: 100}
WARMUP_ROUNDS = 10


def _ok(jobs: list[Job]) -> list[Outcome]:
    return [Outcome(j.job_id, j.token, OutcomeKind.OK, {"ok": True}) for j in jobs]


@pytest.mark.parametrize("batch", list(THROUGHPUT_ROUNDS))
def test_claim_complete_throughput(
    benchmark: Any,
    bench_db: str,
    loop_queue: Callable[[], LoopQueue],
    queue_summary: dict[str, Any],
    batch: int,
) -> None:
    rounds = THROUGHPUT_ROUNDS[batch]
    jobs_needed = (rounds + WARMUP_ROUNDS) * batch
    with psycopg.connect(bench_db, autocommit=True) as c:
        load_tasks(c, tasks=-(-jobs_needed // 100), jobs_per_task=100)
    vacuum_analyze(bench_db)
    lq = loop_queue()

    async def cycle() -> int:
        jobs = await lq.queue.claim(NODE, batch, LEASE_S)
        done = await lq.queue.complete(_ok(jobs))
        return len(done.applied)

    applied = benchmark.pedantic(
        lambda: lq.run(cycle()), rounds=rounds, iterations=1, warmup_rounds=WARMUP_ROUNDS
    )
    assert applied == batch  # the queue never ran dry: every round did a full batch

    timing = timing_summary(benchmark.stats.stats.data)
    rates = {
        # sustained (mean round), typical (median round), and uncontended (fastest round):
        # on a shared machine the gap between them is other processes' load
        "jobs_per_s": round(batch / (timing["mean_ms"] / 1000)),
        "jobs_per_s_median": round(batch / (timing["p50_ms"] / 1000)),
        "jobs_per_s_best": round(batch / (timing["min_ms"] / 1000)),
    }
    benchmark.extra_info.update(rates)
    queue_summary["throughput_jobs_per_s"][str(batch)] = {**rates, **timing}


# scenario -> how the table is filled before claiming
SCENARIOS: dict[str, dict[str, Any]] = {
    "0 finished, 20k runnable": {"finished_tasks": 0, "tasks": 200, "tenants": 1},
    "1M finished, 20k runnable": {"finished_tasks": 10_000, "tasks": 200, "tenants": 1},
    "100k runnable (1,000 tasks, 100 tenants)": {
        "finished_tasks": 0,
        "tasks": 1_000,
        "tenants": 100,
    },
}
LATENCY_ROUNDS = 150


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.timeout(900)
def test_claim_latency(
    benchmark: Any,
    bench_db: str,
    loop_queue: Callable[[], LoopQueue],
    queue_summary: dict[str, Any],
    scenario: str,
) -> None:
    shape = SCENARIOS[scenario]
    with psycopg.connect(bench_db, autocommit=True) as c:
        if shape["finished_tasks"]:
            load_tasks(c, tasks=shape["finished_tasks"], jobs_per_task=100, finished=True)
        load_tasks(c, tasks=shape["tasks"], jobs_per_task=100, tenants=shape["tenants"])
    vacuum_analyze(bench_db)
    with psycopg.connect(bench_db) as c:
        sizes = c.execute(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'),"
            "       count(*) FILTER (WHERE status = 'queued') FROM genworker.jobs"
        ).fetchone()
    assert sizes == (shape["finished_tasks"] * 100, shape["tasks"] * 100)
    lq = loop_queue()
    held: list[Job] = []

    def complete_previous() -> tuple[tuple[()], dict[str, Any]]:
        # untimed: keep the running set small, as a live supervisor does
        if held:
            lq.run(lq.queue.complete(_ok(held)))
            held.clear()
        return (), {}

    def claim() -> int:
        held.extend(lq.run(lq.queue.claim(NODE, 100, LEASE_S)))
        return len(held)

    claimed = benchmark.pedantic(
        claim, setup=complete_previous, rounds=LATENCY_ROUNDS, warmup_rounds=5
    )
    assert claimed == 100

    timing = timing_summary(benchmark.stats.stats.data)
    benchmark.extra_info.update(timing)
    queue_summary["claim_latency_batch_100"][scenario] = {
        "finished_jobs": sizes[0],
        "runnable_jobs": sizes[1],
        **timing,
    }
