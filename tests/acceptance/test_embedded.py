"""The README's first command, on the embedded default: no DATABASE_URL, no server running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.embedded

GENWORKER = [sys.executable, "-m", "supervisor.cli"]


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
    assert task["n_jobs"] == 30 and task["status"] == "queued"

    status = run(["status", "--json"], embedded_env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["queue"]["start"]["queued"] == 30

    # the data survives; the server stopped with the last command that used it
    pgdata = tmp_path / "xdg" / "genworker" / "pg"
    assert (pgdata / "PG_VERSION").exists()
    assert not (pgdata / "postmaster.pid").exists()
