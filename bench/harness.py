"""Shared pieces of the end-to-end benchmarks: a fresh database, the simulated API
and a genworker node as real subprocesses, CPU accounting of every process
involved (PostgreSQL included), and the results files.

Everything started here is stopped here, by PID, even when a benchmark fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from genworker.config import Settings
from genworker.queue import schema
from psycopg.conninfo import conninfo_to_dict, make_conninfo

RESULTS = Path(__file__).parent / "results"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
GENWORKER = [sys.executable, "-m", "genworker.cli"]


def admin_dsn() -> str:
    """Benchmarks measure the real PostgreSQL server: GENWORKER_TEST_DATABASE_URL, or the
    local one (never DATABASE_URL, which may be production)."""
    return os.environ.get("GENWORKER_TEST_DATABASE_URL") or DEFAULT_DSN


@contextlib.contextmanager
def fresh_database(settings: Settings | None = None) -> Iterator[str]:
    """A new, migrated database of its own, dropped afterwards."""
    admin = admin_dsn()
    name = f"gwbench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(admin, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            schema.migrate(c, settings or Settings())
        yield dsn
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout_s: float, what: str, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:g}s")


def wait_tasks_finished(conn: psycopg.Connection, n_tasks: int, timeout_s: float = 600) -> None:
    """Until the database holds n_tasks finished tasks (the benchmark's whole batch)."""
    finished = "SELECT count(*) FROM genworker.tasks WHERE finished_at IS NOT NULL"
    wait_until(
        lambda: conn.execute(finished).fetchone()[0] == n_tasks,  # type: ignore[index]
        timeout_s,
        "every task finished",
        every_s=0.1,
    )


def job_span(conn: psycopg.Connection) -> tuple[Any, Any, int]:
    """(first claim, last completion, jobs succeeded) over every job in the database."""
    row = conn.execute(
        "SELECT min(started_at), max(finished_at),"
        " count(*) FILTER (WHERE status = 'succeeded') FROM genworker.jobs"
    ).fetchone()
    assert row is not None
    return row[0], row[1], int(row[2])


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 40) -> int | None:
    """TERM, wait, then KILL the whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


@contextlib.contextmanager
def sim_api(*args: str) -> Iterator[str]:
    """The simulated image API on loopback (labelled a simulator); yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [*GENWORKER, "sim-api", "--host", "127.0.0.1", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"sim-api exited: {proc.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(up, 20, "sim-api listening")
        yield url
    finally:
        stop_process(proc, 10)


@dataclass
class Node:
    """A `genworker start` subprocess and the processes it forked."""

    proc: subprocess.Popen[bytes]
    dsn: str
    log_path: Path

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> list[psutil.Process]:
        return [p for p in self.tree() if _title(p).startswith("genworker: worker")]

    def ready_workers(self) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as c:
            row = c.execute("SELECT info FROM genworker.nodes WHERE status = 'alive'").fetchone()
        if not row:
            return 0
        return sum(1 for w in row[0].get("workers", []) if w.get("state") == "ready")


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


@contextlib.contextmanager
def node(dsn: str, *args: str, log_dir: Path) -> Iterator[Node]:
    log_path = log_dir / f"node-{uuid.uuid4().hex[:6]}.log"
    env = {**os.environ, "DATABASE_URL": dsn}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*GENWORKER, "start", "--http", "", "--log-level", "warning", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    n = Node(proc, dsn, log_path)
    try:
        yield n
    finally:
        stop_process(proc)


@dataclass
class CpuMeter:
    """CPU seconds of a set of processes between two snapshots, PostgreSQL included.

    PostgreSQL's share is that of the backends connected to the benchmark's database
    plus the server-wide WAL writer, background writer and checkpointer (so other
    databases' work on a shared server is left out).
    """

    dbname: str
    start: dict[int, float] = field(default_factory=dict)

    def _postgres(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["name"]):
            if p.info["name"] != "postgres":
                continue
            title = _title(p)
            if f" {self.dbname} " in title or any(
                k in title for k in ("walwriter", "background writer", "checkpointer")
            ):
                out.append(p)
        return out

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> dict[int, float]:
        out = {}
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        return out

    def snapshot(self, procs: list[psutil.Process]) -> dict[int, float]:
        return self._cpu(procs + self._postgres())

    def begin(self, procs: list[psutil.Process]) -> None:
        self.start = self.snapshot(procs)

    def end(self, procs: list[psutil.Process]) -> dict[str, float]:
        """CPU seconds since begin(): {'genworker': ..., 'postgres': ..., 'total': ...}."""
        pg = {p.pid for p in self._postgres()}
        now = self.snapshot(procs)
        ours = sum(v - self.start.get(pid, 0.0) for pid, v in now.items() if pid not in pg)
        theirs = sum(v - self.start.get(pid, 0.0) for pid, v in now.items() if pid in pg)
        return {"genworker_s": ours, "postgres_s": theirs, "total_s": ours + theirs}


def dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def rss_mb(p: psutil.Process) -> dict[str, float]:
    """Current and peak resident memory, from /proc (MB)."""
    out = {"rss_mb": 0.0, "peak_mb": 0.0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["peak_mb"] = int(line.split()[1]) / 1024
    return out


def write_result(filename: str, key: str, value: dict[str, Any]) -> None:
    """Merge one benchmark's figures into bench/results/<filename> (JSON)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / filename
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    data.setdefault("_machine", {})
    data["_machine"].update(
        {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
