"""Running the real `genworker` CLI as subprocesses: one-shot commands, and long-lived
ones (a node, the simulated API) that are always stopped by PID, process group included."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

GENWORKER = [sys.executable, "-m", "genworker.cli"]
ROOT = Path(__file__).resolve().parents[2]


def env_for(dsn: str | None, **extra: str) -> dict[str, str]:
    """The environment of a child: this one, with DATABASE_URL (or none) and no GENWORKER_*."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GENWORKER_") and k != "DATABASE_URL"
    }
    if dsn is not None:
        env["DATABASE_URL"] = dsn
    env.update(extra)
    return env


def run(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        GENWORKER + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def run_json(args: list[str], env: dict[str, str]) -> Any:
    done = run([*args, "--json"], env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def until(check: Callable[[], Any], timeout: float = 120, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


class Proc:
    """A long-running child in its own session; stop() ends it and whatever it forked."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its workers, zygote, sim: nothing left
        return self.proc.wait(10)


@contextlib.contextmanager
def sim_api(tmp: Path, *flags: str) -> Iterator[str]:
    """The simulated API on a free port; yields its URL."""
    p = Proc(
        [*GENWORKER, "sim-api", "--port", "0", "--announce", *flags], env_for(None), tmp / "sim.log"
    )
    try:
        yield until(lambda: _url(p.output()), 60, "the simulated API's address")
    finally:
        p.stop()


def _url(text: str) -> str | None:
    m = re.search(r"http://\S+", text)
    return m[0] if m else None


@contextlib.contextmanager
def node(env: dict[str, str], tmp: Path, *flags: str, workers: int = 2) -> Iterator[Proc]:
    """`genworker start` with small settings, running until the block ends."""
    cmd = [*GENWORKER, "start", "--workers", str(workers), "--http", "", "--lease", "6"]
    cmd += ["--graceful-timeout", "5", "--output-dir", str(tmp / "results"), *flags]
    if "--api-url" not in flags:
        cmd.append("--simulate")  # no provider given: the node runs the simulated API itself
    p = Proc(cmd, env, tmp / "node.log")
    try:
        yield p
    finally:
        p.stop()


def ready_node(env: dict[str, str]) -> dict[str, Any] | None:
    """The live node of `status --json` once all its workers are ready."""
    doc = run_json(["status"], env)
    for n in doc["nodes"]:
        if n["status"] == "alive" and n["workers"] and n["ready_workers"] == n["workers"]:
            return n  # type: ignore[no-any-return]
    return None


def run_in_pty(args: list[str], env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal (as a user's terminal would be); returns (code, output)."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        GENWORKER + args,
        env={**env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"},
        cwd=ROOT,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"{args[0]} did not finish within {timeout:g}s")
        return proc.wait(30), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
