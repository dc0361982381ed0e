"""The shared rate limit under a provider that answers 429 beyond 100 requests/s.

8 workers x 5 slots could send 800 requests/s at 50 ms; the simulated API accepts
100 a second and answers 429 (with Retry-After) past that. Without any --api-rps
the host learns the limit from the 429s (AIMD on the shared token bucket):
goodput is the completed jobs/s as a ratio to the 100/s limit (aim >= 0.9), and
the share of calls that were 429s (aim < 5 %).

Run: .venv/bin/pytest bench/test_bench_api.py
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .harness import fresh_database, sim_api, write_result
from .test_bench_supervisor import run_node

LIMIT_RPS = 100
JOBS = 3_000


@pytest.fixture
def database() -> Any:
    with fresh_database() as dsn:
        yield dsn


def test_goodput_under_a_429_limit(benchmark: Any, database: str, tmp_path: Path) -> None:
    result: dict[str, Any] = {}

    def run() -> None:
        with sim_api("--rps", str(LIMIT_RPS), "--latency-ms", "50", "--jitter-ms", "10") as url:
            result.update(
                run_node(
                    database,
                    tmp_path,
                    JOBS,
                    "image",
                    {"prompt": "rate limited"},
                    "--api-url",
                    url,
                    "--model",  # url answers: gpt-image-1 only answers b64_json
                    "dall-e-3",
                    "--response-format",
                    "url",
                )
            )
            with urllib.request.urlopen(f"{url}/stats") as r:
                stats = json.load(r)
        calls = stats["total"]
        limited = stats["by_status"].get("429", 0)
        result.update(
            api_calls=calls,
            api_429=limited,
            share_429=round(limited / calls, 4),
            sim_max_in_any_second=stats.get("max_in_any_second"),
            limit_rps=LIMIT_RPS,
            goodput_ratio=round(result["jobs_per_s"] / LIMIT_RPS, 3),
        )

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    write_result("api.json", "goodput_429_beyond_100rps", result)
    assert result["succeeded"] == JOBS
