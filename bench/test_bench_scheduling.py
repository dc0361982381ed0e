"""Scheduling benchmarks: real nodes (8 workers x 5 slots) against the simulated API with
latency L = 100 ms +- 20 ms, tasks submitted at their arrival times.

* the morning: 10 Pro tasks at once while Free and Start tasks keep arriving; slot
  utilisation, makespan against the ideal, completion by plan, against the
  shortest-remaining-first model and the old design's model on the same arrivals;
* a flood: Free tasks arriving faster than they can be served while one Pro task waits;
* a greedy tenant (50 Pro tasks) and a modest one (1 Pro task), with and without a cap;
* scaling: 1 to 16 workers at 50 ms, jobs/s and CPU per 1,000 jobs;
* the claim's latency with 100,000 runnable jobs against an almost empty queue.

Run: GENWORKER_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \
     .venv/bin/pytest bench/test_bench_scheduling.py
Figures: bench/results/scheduling.json; charts: bench/results/scheduling_*.png.
"""

from __future__ import annotations

import json
import os
import random
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from genworker.config import Settings
from genworker.model import Job, Outcome, OutcomeKind
from genworker.queue.client import Client

from .harness import (
    RESULTS,
    CpuMeter,
    dbname,
    fresh_database,
    job_span,
    node,
    sim_api,
    wait_tasks_finished,
    wait_until,
)
from .harness import write_result as _write_result
from .queue_support import LoopQueue, load_tasks, timing_summary, vacuum_analyze
from .scheduling_charts import completion_cdf_chart, scaling_chart
from .scheduling_support import (
    PRIORITY,
    SLOTS,
    WARM_UP,
    Arrival,
    Run,
    flood,
    mean_of,
    morning,
    old_design_model,
    phases,
    quantile,
    replay,
    scheduling_node,
    serve_model,
    srpt_model,
    utilisation,
    work_time_alone,
)

L_S = 0.1
DEFAULTS = Settings()
RESULTS_FILE = "scheduling.json"
COMMAND = (
    "GENWORKER_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test "
    ".venv/bin/pytest bench/test_bench_scheduling.py"
)


def write_result(key: str, value: dict[str, Any]) -> None:
    value = {**value, "load_average": [round(x, 2) for x in os.getloadavg()]}
    _write_result(RESULTS_FILE, key, value)
    _write_result(RESULTS_FILE, "_command", {"run": COMMAND})


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_database() as dsn:
        yield dsn


def run_workload(
    benchmark: Any,
    dsn: str,
    tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    arrivals: list[Arrival],
    *flags: str,
    latency_s: float = L_S,
) -> Run:
    runs: list[Run] = []

    def run() -> None:
        with scheduling_node(dsn, tmp, monkeypatch, latency_s * 1000, *flags):
            runs.append(replay(dsn, arrivals))

    benchmark.pedantic(run, rounds=1, iterations=1)
    [done] = runs
    assert len(done.tasks) == len(arrivals), "every task succeeded"
    return done


# ------------------------------------------------------------------ the morning


def _plan_figures(
    arrivals: list[Arrival], completions: list[float], latency_s: float
) -> dict[str, Any]:
    """Per plan: mean seconds, p50/p95 in units of L, worst seconds."""
    out = {}
    for plan in PRIORITY:
        c = [x for a, x in zip(arrivals, completions, strict=True) if a.plan == plan]
        out[plan] = {
            "mean_s": round(statistics.fmean(c), 3),
            "p50_L": round(quantile(c, 0.5) / latency_s, 2),
            "p95_L": round(quantile(c, 0.95) / latency_s, 2),
            "max_s": round(max(c), 3),
        }
    return out


def _our_key(arrivals: list[Arrival]) -> Callable[[int, int], tuple[float, ...]]:
    """genworker's order of service with the default settings (genworker.urgency)."""
    step, size = DEFAULTS.priority_step_s, DEFAULTS.size_step_s
    return lambda i, _: (
        arrivals[i].at_s + PRIORITY[arrivals[i].plan] * step + arrivals[i].n * size,
        i,
    )


@pytest.mark.parametrize("latency_ms", [100, 1000])
def test_the_morning(
    benchmark: Any,
    database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    latency_ms: int,
) -> None:
    """At L = 100 ms as the issue asks, and at 1 s, where a node's fixed costs per job
    (claim round trip, pipes, batched writes: tens of ms) no longer count in units of L."""
    latency = latency_ms / 1000
    arrivals = morning(scale=latency / L_S)  # the same morning, its clock stretched with L
    run = run_workload(benchmark, database, tmp_path, monkeypatch, arrivals, latency_s=latency)
    ours = [t.completion_s for t in run.tasks]  # tasks in id order: the arrival order
    jobs = sum(a.n for a in arrivals)
    makespan = max(t.finished for t in run.tasks) - min(t.created for t in run.tasks)
    ideal = jobs * latency / SLOTS
    srpt = srpt_model(arrivals, SLOTS, latency)
    old = old_design_model(arrivals, latency, latency / 5)
    mine, theirs = _plan_figures(arrivals, ours, latency), _plan_figures(arrivals, old, latency)
    used = utilisation(run.jobs, SLOTS)
    result = {
        "latency_s": latency,
        "slots": SLOTS,
        "tasks": {p: sum(a.plan == p for a in arrivals) for p in PRIORITY},
        "jobs": jobs,
        "utilisation": used,
        "makespan_s": round(makespan, 3),
        "ideal_s": round(ideal, 3),
        "makespan_over_ideal": round(makespan / ideal, 3),
        # a slot is busy for more than L per image: the HTTP exchange and storing the file
        # (fsynced) come on top of the simulator's latency
        "mean_call_s": round(statistics.fmean(j.t1 - j.t0 for j in run.jobs), 4),
        "makespan_over_busy_time": round(
            makespan / (sum(j.t1 - j.t0 for j in run.jobs) / SLOTS), 3
        ),
        "by_plan": mine,
        "pro_mean_srpt_model_s": round(mean_of("pro", arrivals, srpt), 3),
        "pro_mean_over_srpt": round(mine["pro"]["mean_s"] / mean_of("pro", arrivals, srpt), 3),
        "mean_completion_s": round(statistics.fmean(ours), 3),
        "mean_completion_srpt_model_s": round(statistics.fmean(srpt), 3),
        "phases_median_s": {p: phases(run, p) for p in PRIORITY},
        "our_order_model_by_plan": _plan_figures(
            arrivals, serve_model(arrivals, SLOTS, latency, _our_key(arrivals)), latency
        ),
        "old_design_model": {
            "by_plan": theirs,
            "mean_completion_s": round(statistics.fmean(old), 3),
            "makespan_s": round(max(a.at_s + c for a, c in zip(arrivals, old, strict=True)), 3),
        },
        "old_over_ours": {
            plan: {
                "mean": round(theirs[plan]["mean_s"] / mine[plan]["mean_s"], 1),
                "p95": round(theirs[plan]["p95_L"] / mine[plan]["p95_L"], 1),
            }
            for plan in PRIORITY
        },
        "aims": {
            "utilisation_while_waiting_ge_0.95": used["while_waiting"] >= 0.95,
            "makespan_over_ideal_le_1.1": makespan / ideal <= 1.1,
            "free_p95_le_3L": mine["free"]["p95_L"] <= 3,
        },
    }
    benchmark.extra_info.update(result)
    write_result(f"morning_L_{latency_ms}ms", result)
    completion_cdf_chart(
        {p: [c for a, c in zip(arrivals, ours, strict=True) if a.plan == p] for p in PRIORITY},
        {p: [c for a, c in zip(arrivals, old, strict=True) if a.plan == p] for p in PRIORITY},
        latency,
        RESULTS / f"scheduling_cdf_L_{latency_ms}ms.png",
    )


# ------------------------------------------------------------------ a flood

FLOOD_RATE, FLOOD_S, PRO_AT_S = 250.0, 10.0, 1.0  # Free tasks/s: 500 jobs/s, 1.25 x capacity
STEP_S, SIZE_STEP_S = 2.0, 0.01  # short aging steps, so the bound fits in a benchmark


def _pro_figures(dsn: str, run: Run) -> dict[str, Any]:
    """When the Pro task finished, against the bound of the order of service: it waits for
    the jobs with a smaller key only (those that arrived before its key minus their own
    offset), so it is done once they and its own are, at the rate the node serves jobs."""
    with psycopg.connect(dsn) as c:
        ahead, offset, overtaking = c.execute(
            "SELECT (SELECT count(*) FROM genworker.jobs o"
            "         WHERE o.urgency < p.urgency AND o.tenant <> %(warm)s),"
            "       p.urgency - extract(epoch FROM p.created_at),"
            "       (SELECT count(*) FROM genworker.jobs o"
            "         WHERE o.urgency > p.urgency AND o.finished_at < t.finished_at)"
            "  FROM genworker.jobs p JOIN genworker.tasks t ON t.id = p.task_id"
            " WHERE t.plan = 'pro' AND t.tenant <> %(warm)s ORDER BY p.urgency DESC LIMIT 1",
            {"warm": WARM_UP},
        ).fetchone()  # type: ignore[misc]
    [pro] = [t for t in run.tasks if t.plan == "pro"]
    start = min(t.created for t in run.tasks)
    end = max(t.finished for t in run.tasks)
    served_per_s = len(run.jobs) / (end - start)
    last_free = max(t.finished for t in run.tasks if t.plan == "free")
    return {
        "pro_submitted_at_s": round(pro.created - start, 3),
        "pro_finished_at_s": round(pro.finished - start, 3),
        "pro_completion_s": round(pro.completion_s, 3),
        "pro_aging_offset_s": round(float(offset), 3),
        "jobs_with_a_smaller_key": ahead,
        "later_key_jobs_finished_before_it": overtaking,
        "served_jobs_per_s": round(served_per_s, 1),
        "bound_at_served_rate_s": round((ahead + pro.n) / served_per_s, 3),
        "bound_at_full_capacity_s": round((ahead + pro.n) * L_S / SLOTS, 3),
        "finished_over_bound_at_served_rate": round(
            (pro.finished - start) / ((ahead + pro.n) / served_per_s), 3
        ),
        "last_free_finished_at_s": round(last_free - start, 3),
    }


@pytest.mark.parametrize("aging", ["aging", "no-aging"])
def test_a_flood_of_free_tasks_and_one_pro_task(
    benchmark: Any, database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aging: str
) -> None:
    """Free tasks arrive faster than the slots can serve them; one Pro task still finishes
    within its aging bound. Without aging (the default 600 s step, far beyond the flood) it
    waits for the flood to end."""
    step = STEP_S if aging == "aging" else 600.0
    arrivals = flood(FLOOD_RATE, FLOOD_S, PRO_AT_S)
    flags = ("--priority-step", str(step), "--size-step", str(SIZE_STEP_S))
    run = run_workload(benchmark, database, tmp_path, monkeypatch, arrivals, *flags)
    result = {
        "free_tasks_per_s": FLOOD_RATE,
        "offered_over_capacity": round(FLOOD_RATE * 2 * L_S / SLOTS, 2),
        "flood_s": FLOOD_S,
        "priority_step_s": step,
        "size_step_s": SIZE_STEP_S,
        **_pro_figures(database, run),
        "free": {
            "p50_L": round(
                quantile([t.completion_s for t in run.tasks if t.plan == "free"], 0.5) / L_S, 2
            ),
        },
        "utilisation": utilisation(run.jobs, SLOTS),
    }
    benchmark.extra_info.update(result)
    write_result(f"flood_{aging.replace('-', '_')}", result)


# ------------------------------------------------------------------ a greedy tenant

GREEDY_TASKS, CAP = 50, 20


@pytest.mark.parametrize("cap", [CAP, 0], ids=["cap-20", "no-cap"])
def test_a_greedy_tenant_and_a_modest_one(
    benchmark: Any, database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: int
) -> None:
    """One tenant's 50 Pro tasks at once, another tenant's one Pro task a second later: with
    a cap the second finishes within a small multiple of its own work time."""
    arrivals = [Arrival(0.0, "pro", 70, "greedy")] * GREEDY_TASKS
    arrivals.append(Arrival(1.0, "pro", 70, "modest"))
    run = run_workload(
        benchmark, database, tmp_path, monkeypatch, arrivals, "--tenant-cap", str(cap)
    )
    [modest] = [t for t in run.tasks if t.tenant == "modest"]
    alone = work_time_alone(70, min(cap or SLOTS, SLOTS), L_S)
    greedy_done = max(t.finished for t in run.tasks if t.tenant == "greedy")
    start = min(t.created for t in run.tasks)
    result = {
        "tenant_cap": cap,
        "greedy_tasks": GREEDY_TASKS,
        "modest_completion_s": round(modest.completion_s, 3),
        "modest_alone_s": round(alone, 3),
        "modest_over_alone": round(modest.completion_s / alone, 2),
        "greedy_finished_at_s": round(greedy_done - start, 3),
        "greedy_ideal_s": round(GREEDY_TASKS * 70 * L_S / min(cap or SLOTS, SLOTS), 3),
        "utilisation": utilisation(run.jobs, SLOTS),
    }
    benchmark.extra_info.update(result)
    write_result(f"greedy_{'cap' if cap else 'no_cap'}", result)


# ------------------------------------------------------------------ scaling

SCALING_L_S = 0.05


def _scaling_run(dsn: str, tmp: Path, workers: int, n_jobs: int) -> dict[str, Any]:
    """n_jobs image jobs (Pro tasks of 70), committed at once on an idle node of `workers`
    workers x 5 slots; first claim to last completion, and the CPU of every process."""
    tasks = [
        {"plan": "pro", "n": min(70, n_jobs - i), "params": {"prompt": "p"}}
        for i in range(0, n_jobs, 70)
    ]
    meter = CpuMeter(dbname(dsn))
    with sim_api("--latency-ms", "50", "--jitter-ms", "10") as url:
        flags = ["--workers", str(workers), "--concurrency", "5", "--api-url", url]
        with node(dsn, *flags, "--output-dir", str(tmp / "out"), log_dir=tmp) as n:
            wait_until(lambda: n.ready_workers() == workers, 90, f"{workers} workers ready")
            meter.begin(n.tree())
            with Client(dsn) as client, psycopg.connect(dsn, autocommit=True) as c:
                client.submit_many(tasks)
                wait_tasks_finished(c, len(tasks))
                cpu = meter.end(n.tree())
                first, last, ok = job_span(c)
    seconds = (last - first).total_seconds()
    ideal = workers * 5 / SCALING_L_S
    return {
        "workers": workers,
        "jobs": n_jobs,
        "succeeded": ok,
        "seconds": round(seconds, 3),
        "jobs_per_s": round(n_jobs / seconds, 1),
        "ideal_jobs_per_s": ideal,
        "ratio_to_ideal": round(n_jobs / seconds / ideal, 3),
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_s_per_1000_jobs": round(cpu["total_s"] / n_jobs * 1000, 3),
    }


@pytest.mark.parametrize("workers", [1, 2, 4, 8, 16])
def test_scaling_with_workers(benchmark: Any, database: str, tmp_path: Path, workers: int) -> None:
    """About 6 s of ideal work per run (600 jobs a worker, at most 6,000)."""
    n_jobs = min(600 * workers, 6000)
    result: dict[str, Any] = {}
    benchmark.pedantic(
        lambda: result.update(_scaling_run(database, tmp_path, workers, n_jobs)),
        rounds=1,
        iterations=1,
    )
    assert result["succeeded"] == n_jobs
    benchmark.extra_info.update(result)
    write_result(f"scaling_{workers:02d}_workers", result)
    data = json.loads((RESULTS / RESULTS_FILE).read_text())
    points = {k: v for k, v in data.items() if k.startswith("scaling_")}
    scaling_chart(points, RESULTS / "scheduling_scaling.png")


# ------------------------------------------------------------------ claim latency

LATENCY_ROUNDS = 150
# scenario -> (tasks of 100 jobs, tenants, tenant cap, a capped tenant's tasks ahead)
CLAIM_SCENARIOS: dict[str, tuple[int, int, int, int]] = {
    "almost empty (100-200 runnable)": (2, 1, 0, 0),
    "100k runnable (1,000 tasks, 100 tenants)": (1000, 100, 0, 0),
    "almost empty, caps on": (2, 1, 1000, 0),
    "100k runnable, caps on": (1000, 100, 1000, 0),
    "100k runnable, caps on, a tenant at its cap with 50 tasks ahead": (1000, 100, 20, 50),
}


def _load_capped_ahead(c: psycopg.Connection, tasks: int) -> None:
    """A tenant's Pro-sized tasks queued before everything else (an older key)."""
    c.execute(
        "INSERT INTO genworker.tasks (tenant, plan, kind, params, priority, n_jobs, created_at)"
        " SELECT 'greedy', 'bench', 'noop', '{}', 1, 70,"
        "        now() - interval '2 days' + g * interval '1 ms' FROM generate_series(1, %s) g",
        (tasks,),
    )
    c.execute(
        "INSERT INTO genworker.jobs (task_id, idx, tenant, kind, urgency, max_attempts,"
        "                           created_at, run_after)"
        " SELECT t.id, i, t.tenant, t.kind, extract(epoch FROM t.created_at), 5, t.created_at,"
        "        t.created_at FROM genworker.tasks t CROSS JOIN generate_series(0, 69) i"
        " WHERE t.tenant = 'greedy'"
    )


@pytest.mark.parametrize("scenario", list(CLAIM_SCENARIOS))
@pytest.mark.timeout(900)
def test_claim_latency(
    benchmark: Any, bench_db: str, loop_queue: Callable[[], LoopQueue], scenario: str
) -> None:
    """Claims of 100 (the previous batch completed, untimed), as a supervisor makes them."""
    tasks, tenants, cap, ahead = CLAIM_SCENARIOS[scenario]
    with psycopg.connect(bench_db, autocommit=True) as c:
        c.execute("UPDATE genworker.settings SET value = %s WHERE key = 'tenant_cap'", (str(cap),))
        if ahead:
            _load_capped_ahead(c, ahead)
        load_tasks(c, tasks=tasks, jobs_per_task=100, tenants=tenants)
    vacuum_analyze(bench_db)
    lq = loop_queue()
    if ahead:  # the greedy tenant holds its cap: every claim steps over its 50 tasks
        assert len(lq.run(lq.queue.claim("holder", cap, 3600))) == cap
    held: list[Job] = []
    refill = tasks < 10

    def complete_previous() -> tuple[tuple[()], dict[str, Any]]:
        if held:
            ok = [Outcome(j.job_id, j.token, OutcomeKind.OK, {}) for j in held]
            lq.run(lq.queue.complete(ok))
            held.clear()
        if refill:  # keep the queue almost empty but never dry: 100-200 runnable jobs
            with psycopg.connect(bench_db, autocommit=True) as c:
                queued = c.execute(
                    "SELECT count(*) FROM genworker.jobs WHERE status = 'queued'"
                ).fetchone()[0]  # type: ignore[index]
                if queued < 150:
                    load_tasks(c, tasks=1, jobs_per_task=100, tenants=1)
                    # read the new rows once, as the 100k case's VACUUM did: the timed claim
                    # should not be the first to set their hint bits
                    c.execute("SELECT count(*) FROM genworker.jobs").fetchone()
        return (), {}

    def claim() -> int:
        held.extend(lq.run(lq.queue.claim("bench-node", 100, 300)))
        return len(held)

    claimed = benchmark.pedantic(
        claim, setup=complete_previous, rounds=LATENCY_ROUNDS, warmup_rounds=5
    )
    assert claimed == 100
    timing = timing_summary(benchmark.stats.stats.data)
    benchmark.extra_info.update(timing)
    data = (
        json.loads((RESULTS / RESULTS_FILE).read_text())
        if (RESULTS / RESULTS_FILE).exists()
        else {}
    )
    latency = data.get("claim_latency_batch_100", {})
    latency[scenario] = timing
    write_result("claim_latency_batch_100", latency)


# ------------------------------------------------------------------ the order, modelled

MODEL_LOADS, MODEL_SEEDS, MODEL_TASKS = (0.9, 0.95, 1.05), (1, 2, 3), 3000
SIZE_STEPS_IN_SLOT_TIMES = (1, 4, 16, 64, 256, 1024)  # size_step_s in units of L / slots


def _mixed_sizes(seed: int, load: float) -> list[Arrival]:
    """Tasks of 1-70 images (uniform) in one plan, Poisson arrivals at `load` x capacity."""
    rng = random.Random(seed)
    rate = load * SLOTS / L_S / 35.5
    out, t = [], 0.0
    for _ in range(MODEL_TASKS):
        t += rng.expovariate(rate)
        out.append(Arrival(t, "pro", rng.randint(1, 70), "model"))
    return out


def _policies(a: list[Arrival]) -> dict[str, Callable[[int, int], tuple[float, ...]]]:
    """Keys for serve_model: (task, jobs left) -> sort key, smallest served first."""
    out: dict[str, Callable[[int, int], tuple[float, ...]]] = {
        "srpt (exact, fewest left)": lambda i, left: (left, a[i].at_s, i),
        "arrival order": lambda i, left: (a[i].at_s, i),
        "least attained (per-image key)": lambda i, left: (a[i].n - left, a[i].at_s, i),
    }
    for k in SIZE_STEPS_IN_SLOT_TIMES:
        step = k * L_S / SLOTS
        out[f"static key, size step {k} x L/slots"] = lambda i, left, s=step: (
            a[i].at_s + a[i].n * s,
            i,
        )
    return out


def test_order_of_service_model(benchmark: Any) -> None:
    """Why a static key on the task's size: mean and worst completion of tasks of mixed
    sizes under exact shortest-remaining-first, arrival order, a per-image key that counts
    down a task (least attained service), and the static key at several size steps."""
    result: dict[str, Any] = {}

    def run() -> None:
        for load in MODEL_LOADS:
            rows: dict[str, list[tuple[float, float]]] = {}
            for seed in MODEL_SEEDS:
                a = _mixed_sizes(seed, load)
                for name, key in _policies(a).items():
                    c = serve_model(a, SLOTS, L_S, key)
                    rows.setdefault(name, []).append((statistics.fmean(c), max(c)))
            srpt_mean = statistics.fmean(m for m, _ in rows["srpt (exact, fewest left)"])
            result[f"load_{load}"] = {
                name: {
                    "mean_over_srpt": round(statistics.fmean(m for m, _ in v) / srpt_mean, 2),
                    "worst_s": round(statistics.fmean(w for _, w in v), 1),
                }
                for name, v in rows.items()
            }

    benchmark.pedantic(run, rounds=1, iterations=1)
    result["setup"] = {
        "tasks": MODEL_TASKS,
        "images": "uniform 1-70",
        "slots": SLOTS,
        "latency_s": L_S,
        "seeds": list(MODEL_SEEDS),
        "model": "bench/scheduling_support.py serve_model: one job per slot, each L long",
    }
    write_result("order_model", result)
