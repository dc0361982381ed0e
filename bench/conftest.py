"""Benchmark fixtures: a migrated template on the GENWORKER_TEST_DATABASE_URL server, one
database of its own per benchmark, fast bulk loading, and a summary written to bench/results/.

Benchmarks measure the real server (PostgreSQL 15 here, its own settings: fsync and
synchronous_commit on), never the embedded one: without GENWORKER_TEST_DATABASE_URL
they are skipped (DATABASE_URL, which may be production, is never used).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from genworker.config import Settings
from genworker.queue import schema
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .queue_support import LoopQueue

RESULTS = Path(__file__).parent / "results"
_counter = itertools.count()


@pytest.fixture(scope="session")
def bench_admin_dsn() -> str:
    url = os.environ.get("GENWORKER_TEST_DATABASE_URL")
    if not url:
        pytest.skip("benchmarks run against a real server: set GENWORKER_TEST_DATABASE_URL")
    return url


def _drop_leftovers(admin: psycopg.Connection) -> None:
    """Drop the databases of benchmark runs that died before cleaning up (a 1M-job one is big)."""
    rows = admin.execute(
        "SELECT datname FROM pg_database WHERE datname ~ '^gwb(tpl)?_[0-9]+(_[0-9]+)?$'"
    ).fetchall()
    for (name,) in rows:
        try:
            os.kill(int(name.split("_")[1]), 0)
            continue  # that run is still going
        except ProcessLookupError:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except PermissionError:
            continue


@pytest.fixture(scope="session")
def bench_template(bench_admin_dsn: str) -> Iterator[str]:
    name = f"gwbtpl_{os.getpid()}"
    with psycopg.connect(bench_admin_dsn, autocommit=True) as admin:
        _drop_leftovers(admin)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(make_conninfo(bench_admin_dsn, dbname=name), autocommit=True) as c:
        schema.migrate(c, Settings())
        # tasks as big as a benchmark wants; priority 1 like "start"
        c.execute("INSERT INTO genworker.plans (name, images, priority) VALUES ('bench', 10000, 1)")
    try:
        yield name
    finally:
        with psycopg.connect(bench_admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def bench_db(bench_admin_dsn: str, bench_template: str) -> Iterator[str]:
    """A database of this benchmark's own, copied from the migrated template."""
    name = f"gwb_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(bench_admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{bench_template}"')
    try:
        yield make_conninfo(bench_admin_dsn, dbname=name)
    finally:
        with psycopg.connect(bench_admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def loop_queue(bench_db: str) -> Iterator[Callable[[], LoopQueue]]:
    made: list[LoopQueue] = []

    def make() -> LoopQueue:
        made.append(LoopQueue(bench_db))
        return made[-1]

    yield make
    for q in made:
        q.close()


@pytest.fixture(scope="session")
def queue_summary(bench_admin_dsn: str) -> Iterator[dict[str, Any]]:
    """Figures the queue benchmarks add; written to bench/results/queue.json at the end."""
    with psycopg.connect(bench_admin_dsn) as c:
        settings = dict(
            c.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN"
                " ('synchronous_commit', 'fsync', 'shared_buffers', 'autovacuum')"
            ).fetchall()
        )
        server = c.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    summary: dict[str, Any] = {
        "what": "genworker queue: claim + complete through genworker.queue.store.Queue, "
        "one connection",
        "command": "GENWORKER_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test "
        ".venv/bin/pytest bench/test_bench_queue.py --benchmark-json=/tmp/queue-raw.json",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
        },
        "server": {
            "version": server,
            "host": conninfo_to_dict(bench_admin_dsn).get("host", "local socket"),
            **settings,
        },
        "throughput_jobs_per_s": {},
        "claim_latency_batch_100": {},
    }
    yield summary
    summary["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if summary["throughput_jobs_per_s"] or summary["claim_latency_batch_100"]:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / "queue.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
