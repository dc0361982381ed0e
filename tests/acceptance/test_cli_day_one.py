"""The CLI side of issue 13: a refused option is one line with exit 2, submit warns about a
kind no running node runs, show and status report token usage, retry requeues what died
in a window, and config says which database commands will use."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
from cli_support import env_for, run, run_json


def _finish(dsn: str, result: dict[str, object] | None, *, dead: bool = False) -> None:
    """Play a node: claim every queued job and complete it (ok with `result`, or dead)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute("SELECT job_id, token FROM genworker.claim_jobs('n', 100, 30)").fetchall()
        kind = "dead" if dead else "ok"
        c.execute(
            "SELECT genworker.complete_jobs(%s, %s, %s, %s::jsonb[], %s, %s)",
            (
                [r[0] for r in rows],
                [r[1] for r in rows],
                [kind] * len(rows),
                [json.dumps(result)] * len(rows),
                ["outage"] * len(rows),
                [None] * len(rows),
            ),
        )


def test_an_option_the_model_refuses_is_one_line_and_exit_2(dsn: str) -> None:
    params = '{"model": "dall-e-3", "background": "transparent"}'
    done = run(["submit", "--plan", "free", "--prompt", "a", "--params", params], env_for(dsn))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "genworker: error: invalid option background: model dall-e-3 does not take it"
    )


def test_submit_warns_when_no_running_node_runs_the_kind(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            "INSERT INTO genworker.nodes (id, host, pid, kinds) VALUES ('n1', 'h', 1, %s)",
            (["image", "noop"],),
        )
    env = env_for(dsn)
    done = run(["submit", "--plan", "free", "--kind", "resize", "--params", "{}"], env)
    assert done.returncode == 0, done.stderr
    assert "no running node runs resize jobs" in done.stderr
    done = run(["submit", "--plan", "free", "--prompt", "a"], env)
    assert done.stderr == ""


def test_show_and_status_report_token_usage(dsn: str) -> None:
    env = env_for(dsn)
    task = run_json(["submit", "--plan", "free", "--prompt", "a", "--tenant", "acme"], env)
    _finish(dsn, {"path": "/r/a.png", "usage": {"input_tokens": 12, "output_tokens": 4160}})
    shown = run(["show", str(task["id"])], env)
    assert "  usage: 24 input, 8320 output tokens" in shown.stdout.splitlines()
    assert run_json(["show", str(task["id"])], env)["output_tokens"] == 8320
    tenants = run_json(["status"], env)["tenants"]
    assert tenants == {"acme": {"input_tokens": 24, "output_tokens": 8320}}
    assert "acme 24 in / 8320 out" in run(["status"], env).stdout


def test_retry_requeues_what_died_since_a_time(dsn: str) -> None:
    env = env_for(dsn)
    for prompt in ("a", "b"):
        run_json(["submit", "--plan", "free", "--prompt", prompt], env)
    _finish(dsn, None, dead=True)
    done = run_json(["retry", "--status", "dead", "--since", "1h"], env)
    assert done["requeued"] == 4
    assert run(["retry", "--since", "1h"], env).stdout.startswith("0 dead jobs requeued")
    assert run_json(["tasks", "--status", "running"], env)["tasks"][0]["dead"] == 0
    for args in (["retry"], ["retry", "--since", "yesterday"], ["retry", "1", "--since", "1h"]):
        refused = run(args, env)
        assert refused.returncode == 2, args
        assert len(refused.stderr.strip().splitlines()) == 1


def test_config_names_the_embedded_server_when_no_database_url(tmp_path: Path) -> None:
    env = env_for(None, GENWORKER_DATA_DIR=str(tmp_path))
    rows = {r["setting"]: r for r in run_json(["config"], env)["settings"]}
    assert rows["database_url"]["value"] == f"embedded server in {tmp_path / 'pg'} (not running)"
