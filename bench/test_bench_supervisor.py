"""End-to-end throughput of one node: `genworker start --workers 8` (x 5 slots) on the
real PostgreSQL, from the first claim to the last completion.

* no-op jobs: the machinery's whole overhead per job (claim, dispatch, channel round
  trip, batched fenced write), and the CPU of every process, PostgreSQL included;
* jobs that each call a loopback HTTP server answering in 50 ms: how close to the
  ideal 40 slots / 0.05 s = 800 jobs/s, and the CPU per 1,000 jobs;
* resident memory of the supervisor and of each worker.

The jobs are committed in one transaction once the node is up and idle, so the
figures leave out start-up (imports, forking) and measure only the work.

Run: .venv/bin/pytest bench/test_bench_supervisor.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from genworker.queue.client import Client

from .harness import (
    CpuMeter,
    dbname,
    fresh_database,
    job_span,
    node,
    rss_mb,
    sim_api,
    wait_tasks_finished,
    wait_until,
    write_result,
)

WORKERS, SLOTS = 8, 5
RESULTS_FILE = "supervisor.json"


def _tasks(n_jobs: int, kind: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Pro tasks of 70 jobs (the last one smaller) adding up to n_jobs."""
    out = []
    left = n_jobs
    while left > 0:
        n = min(70, left)
        out.append({"plan": "pro", "kind": kind, "params": params, "n": n})
        left -= n
    return out


def _workers_up(n: Any) -> bool:
    titles = [" ".join(p.cmdline()) for p in n.workers()]
    return len(titles) == WORKERS and all("inflight=" in t for t in titles)


def run_node(
    dsn: str, tmp: Path, n_jobs: int, kind: str, params: dict[str, Any], *args: str
) -> dict[str, Any]:
    tasks = _tasks(n_jobs, kind, params)
    meter = CpuMeter(dbname(dsn))
    with node(
        dsn,
        "--workers",
        str(WORKERS),
        "--concurrency",
        str(SLOTS),
        "--output-dir",
        str(tmp / "out"),
        *args,
        log_dir=tmp,
    ) as n:
        wait_until(lambda: _workers_up(n), 90, f"{WORKERS} workers up")
        meter.begin(n.tree())
        Client(dsn).submit_many(tasks)  # one transaction: all queued at once
        with psycopg.connect(dsn, autocommit=True) as c:
            wait_tasks_finished(c, len(tasks))
            cpu = meter.end(n.tree())
            first, last, ok = job_span(c)
        procs = n.tree()
        sup = rss_mb(procs[0])
        workers = [rss_mb(p) for p in n.workers()]
    seconds = (last - first).total_seconds()
    return {
        "jobs": n_jobs,
        "succeeded": ok,
        "seconds": round(seconds, 3),
        "jobs_per_s": round(n_jobs / seconds, 1),
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_s_per_1000_jobs": round(cpu["total_s"] / n_jobs * 1000, 3),
        "supervisor_rss_mb": round(sup["rss_mb"], 1),
        "supervisor_peak_mb": round(sup["peak_mb"], 1),
        "worker_rss_mb_max": round(max(w["rss_mb"] for w in workers), 1),
        "worker_peak_mb_max": round(max(w["peak_mb"] for w in workers), 1),
        "workers": WORKERS,
        "slots_per_worker": SLOTS,
    }


def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round of median throughput, with every round's jobs/s beside it: one round of
    a few seconds on two shared cores swings by a third either way."""
    ranked = sorted(runs, key=lambda r: r["jobs_per_s"])
    return {
        **ranked[len(ranked) // 2],
        "jobs_per_s_rounds": [r["jobs_per_s"] for r in runs],
        "cpu_s_per_1000_jobs_rounds": [r["cpu_s_per_1000_jobs"] for r in runs],
    }


def test_noop_jobs_end_to_end(benchmark: Any, tmp_path: Path) -> None:
    """20,000 no-op jobs: the whole per-job overhead of the machinery (5 rounds, a fresh
    node each; the median round is reported)."""
    runs: list[dict[str, Any]] = []

    def run() -> None:
        # no-op jobs call no API; the URL only keeps the node from starting the simulator
        with fresh_database() as dsn:  # every round starts from the same empty queue
            runs.append(
                run_node(dsn, tmp_path, 20_000, "noop", {}, "--api-url", "http://127.0.0.1:9")
            )

    benchmark.pedantic(run, rounds=5, iterations=1)
    result = median_round(runs)
    benchmark.extra_info.update(result)
    write_result(RESULTS_FILE, "noop_20000_jobs", result)
    assert result["succeeded"] == 20_000


@pytest.mark.parametrize(
    ("response_format", "key"),
    [("url", "http_50ms_4000_jobs"), ("b64_json", "http_50ms_4000_jobs_b64_files")],
    ids=["the call", "the call + a stored file"],
)
def test_http_jobs_at_50ms(benchmark: Any, tmp_path: Path, response_format: str, key: str) -> None:
    """4,000 jobs, each one call to a loopback server answering in 50 ms: ideal 800 jobs/s
    (3 rounds, a fresh node and simulator each; the median round is reported).

    "the call": the answer is a URL, stored on the job (what the machinery costs).
    "the call + a stored file": the answer is a base64 PNG, decoded and written to a
    content-addressed file with fsync of the file and its directory (what a real image
    costs on this disk).
    """
    runs: list[dict[str, Any]] = []

    def run() -> None:
        with fresh_database() as dsn, sim_api("--latency-ms", "50", "--jitter-ms", "0") as url:
            runs.append(
                run_node(
                    dsn,
                    tmp_path,
                    4_000,
                    "image",
                    {"prompt": "a benchmark"},
                    "--api-url",
                    url,
                    "--model",  # takes both forms (gpt-image-1 only answers b64_json)
                    "dall-e-3",
                    "--response-format",
                    response_format,
                )
            )

    benchmark.pedantic(run, rounds=3, iterations=1)
    result = median_round(runs)
    ideal = WORKERS * SLOTS / 0.05
    result["ideal_jobs_per_s"] = ideal
    result["ratio_to_ideal"] = round(result["jobs_per_s"] / ideal, 3)
    result["response_format"] = response_format
    benchmark.extra_info.update(result)
    write_result(RESULTS_FILE, key, result)
    assert result["succeeded"] == 4_000
