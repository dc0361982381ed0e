"""Secrets stay secret: a run with a known API key (given as a flag, the worst place) and a
known DB password, two nodes (human and JSON logs, at debug), a sim that fails some calls.
Neither secret is in any log line, process title, /metrics, /readyz, node info, stored
error, `genworker status` or CLI error."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator

import psycopg
import pytest
from genworker.queue.client import Client
from ops_support import get, http_address
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from supervisor_harness import (
    GENWORKER,
    Launcher,
    cmdline_bytes,
    launch_fixture,  # noqa: F401  (the launch fixture)
    wait_all_finished,
    wait_for,
)

KEY = f"sk-test-KNOWNKEY{secrets.token_hex(8)}"
PASSWORD = f"pw-KNOWNPASS{secrets.token_hex(8)}"


@pytest.fixture
def secret_dsn(admin_dsn: str, dsn: str) -> Iterator[str]:
    """The test's database, reached as a role of its own with PASSWORD."""
    role = f"gwt_secret_{os.getpid()}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        admin.execute(f"CREATE ROLE \"{role}\" LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    try:
        yield make_conninfo(dsn, user=role, password=PASSWORD)
    finally:
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute(f'DROP OWNED BY "{role}"')
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def assert_clean(where: str, text: str | bytes) -> None:
    blob = text if isinstance(text, str) else text.decode(errors="replace")
    assert KEY not in blob, f"the API key in {where}"
    assert PASSWORD not in blob, f"the DB password in {where}"


def cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENWORKER_", "DATABASE"))}
    env["DATABASE_URL"] = dsn
    return subprocess.run(
        [GENWORKER, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_neither_secret_shows_anywhere(launch: Launcher, secret_dsn: str) -> None:
    assert conninfo_to_dict(secret_dsn)["password"] == PASSWORD
    sim = launch.sim(
        "--fail-400", "0.1", "--fail-500", "0.1", "--fail-malformed", "0.05",
        latency_ms=100, jitter_ms=50, env={"GENWORKER_SIM_API_KEY": KEY},
    )  # fmt: skip
    common = ("--api-key", KEY, "--http", "127.0.0.1:0", "--log-level", "debug")
    common += ("--retry-base", "0.05", "--max-attempts", "2")
    common += ("--handler", "chatty=ops_handlers:chatty")  # a worker logs the key
    env = {"GW_TEST_SECRET": KEY}
    human = launch.node(sim, "test-secret-h", *common, dsn=secret_dsn, workers=2, env=env)
    as_json = launch.node(
        sim, "test-secret-j", *common, "--log-format", "json", dsn=secret_dsn, env=env
    )
    addresses = [http_address(human), http_address(as_json)]
    human.wait_workers(2)
    as_json.wait_workers(2)

    with Client(secret_dsn) as client:
        client.submit_many([{"plan": "start", "params": {"prompt": f"s{i}"}} for i in range(4)])
        client.submit_many([{"plan": "free", "params": {}, "kind": "chatty"} for _ in range(6)])
    with psycopg.connect(secret_dsn, autocommit=True) as conn:
        seen_titles: set[str] = set()

        def sample() -> bool:  # titles, cmdlines and endpoints while the run goes on
            for node in (human, as_json):
                for p in node.tree():
                    seen_titles.add(p.title)
                    assert_clean(f"the cmdline of {p.title}", cmdline_bytes(p.pid))
            for address in addresses:
                for path in ("/metrics", "/readyz", "/healthz"):
                    assert_clean(path, get(address, path)[1])
            done = conn.execute(
                "SELECT count(*) FROM genworker.jobs WHERE finished_at IS NOT NULL"
            ).fetchone()
            return bool(done and done[0] == 132)

        wait_for(sample, "the run to finish while sampled", 120, every_s=0.3)
        wait_all_finished(conn, 132)
        assert any("worker" in t for t in seen_titles)
        for title in seen_titles:
            assert_clean(f"the title {title!r}", title)
        errors = conn.execute(
            "SELECT error FROM genworker.jobs WHERE error IS NOT NULL "
            "UNION ALL SELECT error FROM genworker.tasks WHERE error IS NOT NULL"
        ).fetchall()
        assert errors, "the sim's faults left no error to check"
        for (error,) in errors:
            assert_clean("a stored error", error)
        for (info,) in conn.execute("SELECT info::text FROM genworker.nodes").fetchall():
            assert_clean("the node info", info)
        ran = dict(
            conn.execute(
                "SELECT lease_owner, count(*) FROM genworker.jobs WHERE kind = 'chatty' "
                "GROUP BY lease_owner"
            ).fetchall()
        )
    assert sum(ran.values()) == 12

    status = cli("status", "--json", dsn=secret_dsn)
    assert status.returncode == 0, status.stderr
    assert_clean("genworker status --json", status.stdout + status.stderr)
    human_status = cli("status", dsn=secret_dsn)
    assert_clean("genworker status", human_status.stdout + human_status.stderr)
    config = cli("config", "--api-key", KEY, dsn=secret_dsn)
    assert_clean("genworker config", config.stdout + config.stderr)

    for node in (human, as_json):
        node.signal(15)
        assert node.wait(30) == 0
    assert "DEBUG genworker.arbiter: job " in human.log()  # job-level lines were on
    # the workers' own lines: formatted, one line each, the key masked
    workers_said = [ln for ln in human.log().splitlines() if "says the key is ***" in ln]
    assert len(workers_said) == ran.get("test-secret-h", 0)
    assert all("WARNING genworker.test_handler: job " in ln for ln in workers_said)
    for line in as_json.log().splitlines():
        doc = json.loads(line)  # one JSON document per line, every line
        assert {"ts", "level", "logger", "msg"} <= doc.keys(), line
    chatty = [json.loads(ln) for ln in as_json.log().splitlines() if "test_handler" in ln]
    assert len(chatty) == ran.get("test-secret-j", 0)
    assert all(d["msg"].endswith("says the key is ***") for d in chatty), chatty
    assert any(json.loads(ln)["level"] == "DEBUG" for ln in as_json.log().splitlines())
    assert_clean("the human log", human.log())
    assert_clean("the JSON log", as_json.log())


def test_the_cli_error_path_masks_secrets() -> None:
    dsn = f"postgresql://someone:{PASSWORD}@127.0.0.1:1/nowhere"
    for debug in ([], ["--debug"]):
        done = cli("status", *debug, "--database-url", dsn, dsn=dsn)
        assert done.returncode != 0
        assert_clean("a CLI error", done.stdout + done.stderr)
        assert "genworker: error" in done.stderr
        if debug:
            assert "Traceback" in done.stderr
    done = cli("start", "--api-key", KEY, "--alarms", "nonsense", dsn=dsn)
    assert done.returncode == 2
    assert done.stderr.startswith("genworker: error: --alarms: bad alarm setting 'nonsense'")
    assert_clean("a start error", done.stdout + done.stderr)
