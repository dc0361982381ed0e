"""genworker installs next to supervisord (PyPI's `supervisor`) in one environment.

The source root is a folder named `supervisor/`; the wheel must ship only the
`genworker` package, never a top-level `supervisor` that would shadow supervisord's.
A fresh venv gets `pip install supervisor`, then a normal (non-editable) install of a
copy of this repository, and both must work from outside the source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# what a build would leave in the tree, or must not see: the copy holds the sources only
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".*_cache", ".benchmarks"
)
SMALLEST_DEMO = ["--pro", "1", "--free", "1", "--start", "1", "--window", "1"]
SMALLEST_DEMO += ["--latency-ms", "50", "--workers", "1", "--concurrency", "2", "--http", ""]

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Venv:
    bin: Path
    site: Path
    cwd: Path  # outside the repository, so nothing is imported from the source tree
    env: dict[str, str]

    def run(
        self, cmd: str, *args: str, timeout: float = 60, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / cmd), *args],
            env={**self.env, **env},
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def python(self, code: str) -> str:
        done = self.run("python", "-c", code)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


def _clean_env(home: Path) -> dict[str, str]:
    """This environment without anything that would point at the repo or a database."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DATABASE_URL"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("GENWORKER_")}
    env["XDG_DATA_HOME"] = str(home / "xdg")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    base = tmp_path_factory.mktemp("coexist")
    try:
        yield _install(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)  # a venv is ~100 MB: keep none of them


def _install(base: Path) -> Venv:
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=60)
    work = base / "work"
    work.mkdir()
    site = subprocess.run(
        [
            str(base / "venv/bin/python"),
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    v = Venv(base / "venv" / "bin", Path(site), work, _clean_env(base))
    done = v.run("pip", "install", "-q", "supervisor", timeout=120)
    assert done.returncode == 0, done.stderr
    source = base / "genworker-src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)  # pip builds in the tree it is given
    done = v.run("pip", "install", "-q", str(source), timeout=180)
    assert done.returncode == 0, done.stderr
    return v


def test_supervisord_still_runs(venv: Venv) -> None:
    done = venv.run("supervisord", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()[:1].isdigit(), done.stdout
    where = venv.python(
        "import supervisor.http, supervisor.supervisord; print(supervisor.__file__)"
    )
    assert Path(where).parent == venv.site / "supervisor"


def test_genworker_imports_from_the_installed_wheel(venv: Venv) -> None:
    where = venv.python("from genworker import Client; import genworker; print(genworker.__file__)")
    assert Path(where).parent == venv.site / "genworker"  # not the source tree: no editable
    files = json.loads(
        venv.python(
            "import importlib.metadata as m, json; "
            "print(json.dumps([str(f) for f in m.files('genworker')]))"
        )
    )
    shipped = {f.split("/", 1)[0] for f in files if not f.startswith("..")}  # ../bin/genworker
    assert {d for d in shipped if not d.endswith(".dist-info")} == {"genworker"}, shipped
    assert any(f.endswith("queue/sql/migrations/0001_initial.sql") for f in files)


def test_the_command_line_answers(venv: Venv) -> None:
    done = venv.run("genworker", "--help")
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout
    done = venv.run("genworker", "config")
    assert done.returncode == 0, done.stderr
    assert "database_url" in done.stdout


def test_the_smallest_demo_runs_to_the_end(venv: Venv, empty_dsn: str) -> None:
    done = venv.run(
        "genworker", "demo", *SMALLEST_DEMO, "--json", timeout=90, DATABASE_URL=empty_dsn
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["ok"] is True
    tasks_succeeded = {p: v["succeeded"] for p, v in doc["genworker"]["plans"].items()}
    assert tasks_succeeded == {"free": 1, "start": 1, "pro": 1}
