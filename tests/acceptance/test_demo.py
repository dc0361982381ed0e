"""`genworker demo`: the README's first command, run to the end on the embedded default;
its live view on a terminal; Ctrl-C stops everything it started."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
from cli_support import GENWORKER, ROOT, Proc, env_for, run, run_in_pty, until

SMALL = ["--pro", "2", "--free", "3", "--start", "1", "--window", "2", "--latency-ms", "100"]
SMALL += ["--workers", "2"]


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)\n```", text, re.S)
    assert m, f"README.md has no {marker} block"
    return m[1].strip()


def test_the_readmes_first_command_installs_and_runs_the_demo() -> None:
    first = readme_block("run-command")
    assert first.startswith("python3 -m venv .venv && .venv/bin/pip install")
    assert first.endswith(".venv/bin/genworker demo")
    assert ".venv/bin/pytest" in readme_block("test-command")


def _processes_with(env_key: str, value: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(env_key) == value:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.embedded
def test_the_demo_runs_to_the_end_on_the_embedded_default(open_tmp_path: Path) -> None:
    xdg = str(open_tmp_path / "xdg")
    env = env_for(None, XDG_DATA_HOME=xdg)  # no DATABASE_URL: no server running, none needed
    done = run(["demo", *SMALL, "--json"], env, timeout=280)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["ok"] is True
    assert doc["scenario"]["database"] == "embedded"
    ours, old = doc["genworker"], doc["old_design"]
    assert {p: v["succeeded"] for p, v in ours["plans"].items()} == {
        "free": 3,
        "start": 1,
        "pro": 2,
    }
    assert ours["images"] == old["images"] == 3 * 2 + 30 + 2 * 70
    assert set(old["plans"]) == {"free", "start", "pro"}
    for plan in ("free", "start", "pro"):
        assert set(doc["ratios"]["plans"][plan]) >= {"wait_s_p95", "completion_s_p95"}
    assert 0 < ours["slot_utilisation"] <= 1
    # it stopped everything it started, the embedded server included, and kept the data
    assert until(lambda: not _processes_with("XDG_DATA_HOME", xdg), 30, "children to exit")
    assert (Path(xdg) / "genworker" / "pg" / "PG_VERSION").exists()
    assert not (Path(xdg) / "genworker" / "pg" / "postmaster.pid").exists()


def test_the_live_view_draws_progress_then_lists_every_plan(dsn: str) -> None:
    code, out = run_in_pty(["demo", *SMALL], env_for(dsn))
    assert code == 0, out[-3000:]
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    assert "\x1b[" in out  # drawn with terminal escapes, not printed as plain lines
    assert "━" in plain  # the progress bars
    assert re.search(r"\d+/70 images", plain)  # a Pro task's bar, counting its images
    summary = plain[plain.index("all tasks finished") :]
    for plan in ("free", "start", "pro"):
        assert re.search(rf"^\s*{plan}\s+genworker", summary, re.M), summary
    assert "old design" in summary
    assert "slot utilisation" in summary


def test_without_a_terminal_there_is_no_live_view_but_the_summary_prints(dsn: str) -> None:
    done = run(["demo", *SMALL], env_for(dsn), timeout=280)
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout
    assert "━" not in done.stdout
    for plan in ("free", "start", "pro"):
        assert re.search(rf"^\s*{plan}\s+genworker", done.stdout, re.M)


def test_ctrl_c_stops_the_demo_and_everything_it_started(dsn: str, tmp_path: Path) -> None:
    long_morning = ["--pro", "1", "--free", "50", "--start", "0", "--window", "600"]
    demo = Proc(
        [*GENWORKER, "demo", *long_morning, "--workers", "1", "--latency-ms", "50"],
        env_for(dsn, XDG_DATA_HOME=str(tmp_path / "xdg")),
        tmp_path / "demo.log",
    )
    try:
        until(lambda: "replaying" in demo.output(), 120, "the demo to start replaying")
        children = psutil.Process(demo.proc.pid).children(recursive=True)
        assert len(children) >= 3  # the simulated API, the node, its zygote and worker
        started = time.monotonic()
        code = demo.stop(signal.SIGINT, timeout=60)
        assert code == 130, demo.output()
        assert time.monotonic() - started < 60
        _gone, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], [p.cmdline() for p in alive]
        assert "interrupted" in demo.output()
        assert "Traceback" not in demo.output()
    finally:
        demo.stop()


def test_a_node_that_cannot_start_ends_the_demo_with_its_reason(dsn: str, tmp_path: Path) -> None:
    xdg = str(tmp_path / "xdg")
    bad = ["--handler", "image=no_such_module:run", "--workers", "1"]
    done = run(
        ["demo", "--pro", "1", "--free", "0", "--start", "0", *bad], env_for(dsn, XDG_DATA_HOME=xdg)
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "no_such_module" in lines[0]
    assert "node.log" in lines[0]
    assert until(lambda: not _processes_with("XDG_DATA_HOME", xdg), 30, "children to exit")
