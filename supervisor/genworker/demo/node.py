"""The demo's child processes: the simulated API and a `genworker start` node.

Each runs in a session of its own, so a Ctrl-C in the terminal reaches only
the demo, which then stops them itself, by PID: TERM, a bounded wait, KILL
(of the whole process group, so no worker outlives its node). On Linux they
also get SIGTERM should the demo itself die without cleaning up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from genworker.errors import GenworkerError
from genworker.procs import child_environ, python_module

_URL = re.compile(r"https?://\S+")
_PR_SET_PDEATHSIG = 1


class DemoError(GenworkerError):
    """The demo could not set up or finish its run; the message says where to look."""


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the demo dies (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return


class Child:
    """One child process, stopped by PID and never left behind."""

    def __init__(self, name: str, cmd: list[str], *, env: dict[str, str], log: IO[Any]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # before any thread exists
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float) -> int | None:
        """TERM, wait up to timeout_s, then KILL its process group; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)  # then KILL, below
        # the group is the child's own session: whatever it forked goes with it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        return self.proc.returncode


def start_sim(
    latency_ms: float,
    jitter_ms: float,
    fail_rate: float,
    seed: int,
    log_path: Path,
    timeout_s: float = 60,
) -> tuple[Child, str]:
    """The simulated API on a free loopback port; returns it and its base URL."""
    cmd = python_module("genworker.sim", "--host", "127.0.0.1", "--port", "0")
    cmd += ["--latency-ms", f"{latency_ms:g}", "--jitter-ms", f"{jitter_ms:g}"]
    cmd += ["--fail-500", f"{fail_rate:g}", "--seed", str(seed)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        sim = Child("simulated API", cmd, env=child_environ(), log=log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and sim.alive():
        # it prints its address once it listens (port 0: the kernel picked one)
        m = _URL.search(log_path.read_text(errors="replace"))
        if m:
            return sim, m[0].rstrip("/")
        time.sleep(0.05)
    sim.stop(2)
    raise DemoError(
        f"the simulated API did not start: {last_line(log_path) or 'no output'} (see {log_path})"
    )


def start_node(args: list[str], dsn: str, log_path: Path) -> Child:
    """`genworker start` with these flags on this database, its output going to log_path."""
    env = dict(os.environ)
    env["DATABASE_URL"] = dsn  # in the environment, not argv: a DSN may hold a password
    env.pop("GENWORKER_DATABASE_URL", None)
    env.pop("GENWORKER_SIMULATE", None)  # the demo gives its node the demo's own simulator
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        return Child("node", python_module("genworker.cli", "start", *args), env=env, log=log)


def last_line(path: Path) -> str:
    """The line of a child's log that best says why it stopped, for a one-line error:
    its own one-line error ("genworker: ..."), else its first ERROR (the cause: what follows
    is the consequence, e.g. "stopping the node"), else its last line."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    said = [line for line in lines if line.startswith("genworker:")]
    errors = [line for line in lines if " ERROR " in line or " CRITICAL " in line]
    best = said[0] if said else errors[0] if errors else lines[-1] if lines else ""
    return best[:300]
