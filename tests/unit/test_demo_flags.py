"""The demo's node: its own flags, the user's flags passed on, never the real API or a DSN."""

from __future__ import annotations

from pathlib import Path

from genworker.cli.main import make_parser, settings_from_args
from genworker.demo.run import node_flags


def flags_for(*argv: str) -> list[str]:
    args = make_parser().parse_args(["demo", *argv])
    settings, sources = settings_from_args(args)
    return node_flags(settings, sources, "http://127.0.0.1:9", "demo-1", Path("/tmp/w"))


def pairs(flags: list[str]) -> dict[str, str]:
    return {f: v for f, v in zip(flags, [*flags[1:], ""], strict=True) if f.startswith("--")}


def test_the_node_runs_the_demos_simulated_api_quietly_with_quick_heartbeats() -> None:
    got = pairs(flags_for())
    assert got["--api-url"] == "http://127.0.0.1:9"
    assert got["--node-id"] == "demo-1"
    assert got["--http"] == ""
    assert got["--lease"] == "9"  # a heartbeat every 3 s: the figures come from it
    assert got["--graceful-timeout"] == "5"
    assert "--workers" not in got  # the node reads the same environment and file itself


def test_the_users_flags_reach_the_node_but_not_the_real_api_nor_the_database() -> None:
    flags = flags_for(
        "--workers", "3", "--lease", "20", "--plans", "free=2:0,start=30:1,pro=70:2",
        "--no-fetch-urls", "--api-url", "https://api.example", "--api-key", "sk-secret",
        "--database-url", "postgresql://u:pw@h/db",
    )  # fmt: skip
    got = pairs(flags)
    assert got["--workers"] == "3"
    assert got["--lease"] == "20"
    assert got["--plans"] == "free=2:0,start=30:1,pro=70:2"
    assert "--no-fetch-urls" in flags
    assert got["--api-url"] == "http://127.0.0.1:9"
    assert not any("secret" in f or "pw@" in f or "api.example" in f for f in flags)
