"""The systemd units: systemd-analyze accepts them, the sandbox scores "OK", and the
units and the env example stay in step with the code."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from genworker import config

UNITS = Path(__file__).resolve().parents[2] / "systemd"
INSTALLED = "/opt/genworker/bin/genworker"
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values in order (keys like SystemCallFilter repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def genworker_script(tmp_path: Path) -> Path:
    """The genworker console script of this venv; verify checks ExecStart exists and is
    executable. A stub stands in when the package is not installed as a script."""
    script = Path(sys.executable).parent / "genworker"
    if script.is_file() and os.access(script, os.X_OK):
        return script
    stub = tmp_path / "bin" / "genworker"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return stub


@pytest.fixture
def unit_copies(tmp_path: Path) -> Path:
    """Both units, their ExecStart pointed at a binary that exists on this machine."""
    script = genworker_script(tmp_path)
    out = tmp_path / "units"
    out.mkdir()
    for name in ("genworker.service", "genworker@.service"):
        text = (UNITS / name).read_text()
        assert INSTALLED in text
        (out / name).write_text(text.replace(INSTALLED, str(script)))
    return out


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


@needs_analyze
@pytest.mark.parametrize("unit", ["genworker.service", "genworker@.service"])
def test_systemd_analyze_verify_passes_without_a_warning(unit_copies: Path, unit: str) -> None:
    result = analyze("verify", str(unit_copies / unit))
    # verify exits 0 on unknown keys and bad values ("ignoring"): any output is a finding
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_analyze
@pytest.mark.parametrize("unit", ["genworker.service", "genworker@demo.service"])
def test_security_exposure_is_at_most_2(unit_copies: Path, unit: str) -> None:
    result = analyze("security", "--offline=true", str(unit_copies / unit))
    assert result.returncode == 0, result.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert m, result.stdout[-500:]
    assert float(m[1]) <= MAX_EXPOSURE, result.stdout
    assert m[2] == "OK"


def test_the_unit_runs_the_supervisor_as_issue_6_asks() -> None:
    from genworker.errors import UsageError
    from genworker.exits import EXIT_BOOT as EXIT_BOOT_FAILED
    from genworker.exits import EXIT_CRASH_LOOP

    service = parse_unit(UNITS / "genworker.service")["Service"]
    one = {k: v[-1] for k, v in service.items()}
    assert one["Type"] == "notify"  # notify-reload needs systemd >= 253
    assert one["NotifyAccess"] == "main"
    assert one["ExecStart"] == f"{INSTALLED} start"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["KillMode"] == "mixed"
    assert one["Restart"] == "on-failure"
    assert one["OOMPolicy"] == "continue"  # a worker's OOM kill is the supervisor's to handle
    no_restart = {int(code) for code in one["RestartPreventExitStatus"].split()}
    assert {UsageError.exit_code, EXIT_BOOT_FAILED} <= no_restart
    assert EXIT_CRASH_LOOP not in no_restart  # that one is for systemd to restart
    graceful = config.Settings().graceful_timeout_s
    # the drain, 5 s for workers killed at its end, up to 15 s for the last writes
    assert seconds(one["TimeoutStopSec"]) >= graceful + 20
    assert seconds(one["WatchdogSec"]) >= 10
    assert int(one["LimitNOFILE"]) >= 4096
    assert one["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert service["SystemCallFilter"][0] == "@system-service"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "DynamicUser"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert one["StateDirectory"] == "genworker"
    assert "GENWORKER_DATA_DIR=%S/genworker" in service["Environment"]


def seconds(span: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", span)
    assert m, span
    return int(m[1]) * (60 if m[2] == "min" else 1)


# What may differ between the single unit and the template, and how.
INSTANCE_ONLY = {
    "Description",
    "EnvironmentFile",
    "Environment",
    "SyslogIdentifier",
    "User",
    "StateDirectory",
    "RuntimeDirectory",
}


def test_the_template_keeps_in_step_with_the_single_unit() -> None:
    single = parse_unit(UNITS / "genworker.service")
    template = parse_unit(UNITS / "genworker@.service")
    assert single.keys() == template.keys()
    for section in single:
        a = {k: v for k, v in single[section].items() if k not in INSTANCE_ONLY}
        b = {k: v for k, v in template[section].items() if k not in INSTANCE_ONLY}
        assert a == b, section
    service = template["Service"]
    assert service["EnvironmentFile"] == [
        "-/etc/genworker/genworker.env",
        "/etc/genworker/%i.env",
    ]
    assert service["StateDirectory"] == ["genworker-%i"]
    assert "GENWORKER_DATA_DIR=%S/genworker-%i" in service["Environment"]


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (UNITS / "genworker.env.example").read_text().splitlines():
        m = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line)
        if m:
            assert m[1] not in values, f"{m[1]} twice"
            values[m[1]] = m[2]
    return values


def test_env_example_lists_every_setting() -> None:
    expected = {config.env_name(f.name) for f in dataclasses.fields(config.Settings)}
    assert set(env_example()) == expected


def test_env_example_values_are_the_defaults() -> None:
    if config.DEFAULT_CONFIG_FILE.is_file():
        pytest.skip(f"{config.DEFAULT_CONFIG_FILE} exists here and would change the defaults")
    settings, _ = config.build(flags={}, environ=env_example())
    assert settings == config.Settings()
