"""The README's first command, on the embedded default: no DATABASE_URL, no server running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import Proc, until

pytestmark = pytest.mark.embedded

GENWORKER = [sys.executable, "-m", "genworker.cli"]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(GENWORKER + args, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    return env


def test_migrate_submit_status_on_the_embedded_default(
    embedded_env: dict[str, str], tmp_path: Path
) -> None:
    first = run(["migrate"], embedded_env)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout

    sub = run(["submit", "--plan", "start", "--prompt", "a lighthouse", "--json"], embedded_env)
    assert sub.returncode == 0, sub.stderr
    task = json.loads(sub.stdout)
    assert task["n_jobs"] == 30
    assert task["status"] == "queued"

    status = run(["status", "--json"], embedded_env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["queue"]["start"]["queued"] == 30

    # the data survives; the server stopped with the last command that used it
    pgdata = tmp_path / "xdg" / "genworker" / "pg"
    assert (pgdata / "PG_VERSION").exists()
    assert not (pgdata / "postmaster.pid").exists()


def _postmaster(env: dict[str, str]) -> Path:
    return Path(env["XDG_DATA_HOME"]) / "genworker" / "pg" / "postmaster.pid"


def test_two_commands_share_one_server_and_the_last_one_out_stops_it(
    embedded_env: dict[str, str], tmp_path: Path
) -> None:
    assert run(["migrate"], embedded_env).returncode == 0
    watcher = Proc(
        [*GENWORKER, "status", "--watch", "--json"], embedded_env, tmp_path / "watch.log"
    )
    try:
        until(lambda: watcher.output().count("\n") >= 1, 120, "the first status line")
        sub = run(["submit", "--plan", "free", "--prompt", "a cat", "--json"], embedded_env)
        assert sub.returncode == 0, sub.stderr
        # the submit has exited; the server stays up for the watcher, which sees its task
        assert _postmaster(embedded_env).exists()

        def watcher_saw_the_task() -> bool:
            lines = watcher.output().splitlines()
            return json.loads(lines[-1])["tasks"] == {"queued": 1} if lines else False

        until(watcher_saw_the_task, 60, "the watcher to see the submitted task")
        assert watcher.stop(signal.SIGINT) == 0  # Ctrl-C is how one leaves --watch
    finally:
        watcher.stop()
    assert until(lambda: not _postmaster(embedded_env).exists(), 30, "the server to stop")


def test_concurrent_first_commands_start_one_server_without_corrupting_it(
    embedded_env: dict[str, str],
) -> None:
    submits = [
        subprocess.Popen(
            [*GENWORKER, "submit", "--plan", "free", "--prompt", f"cat {i}", "--tenant", f"t{i}"],
            env=embedded_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outcomes = [p.communicate(timeout=180) for p in submits]
    assert [p.returncode for p in submits] == [0] * 4, outcomes
    status = run(["status", "--json"], embedded_env)
    assert json.loads(status.stdout)["tasks"] == {"queued": 4}
    pgdata = Path(embedded_env["XDG_DATA_HOME"]) / "genworker" / "pg"
    log = (pgdata / "log").read_text(errors="replace")
    assert "PANIC" not in log
    assert "corrupt" not in log
    assert until(lambda: not _postmaster(embedded_env).exists(), 30, "the server to stop")


def test_the_server_stops_with_the_supervisor(embedded_env: dict[str, str], tmp_path: Path) -> None:
    start = Proc(
        [*GENWORKER, "start", "--workers", "1", "--http", "", "--graceful-timeout", "5"],
        embedded_env,
        tmp_path / "start.log",
    )
    try:
        done = run(["submit", "--plan", "free", "--prompt", "a cat", "--wait"], embedded_env)
        assert done.returncode == 0, done.stderr + start.output()
        assert _postmaster(embedded_env).exists()
        assert start.stop(signal.SIGTERM) == 0, start.output()
    finally:
        start.stop()
    assert "results are placeholders" in start.output()
    assert until(lambda: not _postmaster(embedded_env).exists(), 30, "the server to stop")
