"""The real CLI, as a user runs it: submit --wait on a running node, status counts,
one-line errors with the documented exit codes, config with secrets masked."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from cli_support import env_for, node, ready_node, run, run_json, sim_api, until


def test_submit_wait_succeeds_on_a_node_running_the_simulated_api(dsn: str, tmp_path: Path) -> None:
    env = env_for(dsn)
    with node(env, tmp_path) as n:  # no --api-url: the node runs the simulated API itself
        done = run(["submit", "--plan", "start", "--prompt", "a lighthouse", "--wait"], env)
        assert done.returncode == 0, done.stderr + n.output()
        assert "succeeded" in done.stdout
        assert "30/30 succeeded" in done.stdout
        as_json = run(
            [
                "submit",
                "--plan",
                "free",
                "--prompt",
                "a cat",
                "--wait",
                "--json",
                "--timeout",
                "120",
            ],
            env,
        )
        assert as_json.returncode == 0, as_json.stderr
        doc = json.loads(as_json.stdout)
        assert doc["status"] == "succeeded"
        assert doc["remaining"] == 0
    placeholders = [line for line in n.output().splitlines() if "simulated image API" in line]
    assert len(placeholders) == 1
    assert "results are placeholders" in placeholders[0]


def test_show_prints_result_paths_whole_and_escapes_what_a_submitter_wrote(
    dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / ("results-" + "x" * 150)
    env = {**env_for(dsn), "COLUMNS": "80"}
    key = "k\x1b]0;owned\x07\x1b[2J"
    with node(env, tmp_path, "--output-dir", str(out)):
        done = run(
            ["submit", "--plan", "free", "--prompt", "a wren", "--key", key, "--wait", "--json"],
            env,
        )
        assert done.returncode == 0, done.stderr
        task = json.loads(done.stdout)["id"]
    shown = run(["show", str(task)], env)
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout
    assert "\x07" not in shown.stdout
    assert "key k\\x1b]0;owned\\x07\\x1b[2J" in shown.stdout
    paths = [w for w in shown.stdout.split() if w.startswith(str(out))]
    assert len(paths) == 2
    assert all(Path(p).is_file() for p in paths)  # whole: each names the file itself
    # the task has finished: there is nothing to cancel, and the exit code says so
    late = run(["cancel", str(task)], env)
    assert late.returncode == 1
    assert late.stderr.strip() == f"task {task} had already succeeded: nothing to cancel"


def test_submit_wait_exits_1_when_the_task_fails(dsn: str, tmp_path: Path) -> None:
    env = env_for(dsn)
    with (
        sim_api(tmp_path, "--fail-400", "1.0", "--latency-ms", "5") as url,
        node(env, tmp_path, "--api-url", url),
    ):
        done = run(["submit", "--plan", "free", "--prompt", "refused", "--wait"], env)
    assert done.returncode == 1, done.stderr
    assert "failed" in done.stdout
    assert "2 dead" in done.stdout


def test_submit_wait_gives_up_at_its_timeout_with_one_line(dsn: str) -> None:
    env = env_for(dsn)
    done = run(["submit", "--plan", "free", "--prompt", "a", "--wait", "--timeout", "0.5"], env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert "no node is running" in lines[0]  # said at once, not after the wait
    assert "not finished after 0.5s" in lines[-1]
    assert "Traceback" not in done.stderr


def test_status_counts_queued_jobs_by_plan_then_the_node_and_its_workers(
    dsn: str, tmp_path: Path
) -> None:
    env = env_for(dsn)
    for plan in ("free", "free", "pro"):
        assert run(["submit", "--plan", plan, "--prompt", "x"], env).returncode == 0
    doc = run_json(["status"], env)
    assert doc["queue"] == {
        "free": {"queued": 4, "scheduled": 0, "running": 0},
        "pro": {"queued": 70, "scheduled": 0, "running": 0},
    }
    assert doc["tasks"] == {"queued": 3}
    assert doc["in_flight"] == 0
    assert doc["nodes"] == []
    human = run(["status"], env)
    assert human.returncode == 0
    assert "no live node" in human.stdout

    with sim_api(tmp_path, "--latency-ms", "5") as url, node(env, tmp_path, "--api-url", url):
        live = until(lambda: ready_node(env), what="a node with every worker ready")
        assert live["ready_workers"] == 2
        done = until(lambda: run_json(["status"], env)["tasks"] == {"succeeded": 3}, what="done")
        assert done
        after = run_json(["status"], env)
        assert after["queue"] == {}
        human = run(["status"], env).stdout
        assert live["id"] in human
        assert "2/2 ready" in human


def test_tasks_show_cancel_retry(dsn: str) -> None:
    env = env_for(dsn)
    first = run_json(["submit", "--plan", "free", "--prompt", "a", "--tenant", "acme"], env)
    run_json(["submit", "--plan", "pro", "--prompt", "b", "--tenant", "umbrella"], env)
    listed = run_json(["tasks", "--tenant", "acme"], env)["tasks"]
    assert [t["id"] for t in listed] == [first["id"]]
    assert run_json(["tasks", "--status", "succeeded"], env) == {"tasks": []}
    shown = run_json(["show", str(first["id"])], env)
    assert [j["index"] for j in shown["jobs"]] == [0, 1]
    assert run_json(["cancel", str(first["id"])], env) == {
        "task": first["id"],
        "status": "cancelled",
    }
    assert run(["tasks"], env).stdout.count("\n") == 3  # a header and two tasks
    refused = run(["retry", str(first["id"])], env)
    assert refused.returncode == 2  # a cancelled task has no dead jobs to requeue
    assert len(refused.stderr.strip().splitlines()) == 1


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


BAD_INPUT = [
    # (args, extra env, exit code, words the one line must contain)
    (["status", "--database-url", "postgresql://u:s3cret@127.0.0.1:1/x"], {}, 1, "cannot connect"),
    (["status", "--database-url", "nonsense=1 =="], {}, 2, "not a valid PostgreSQL DSN"),
    (["status"], {"DATABASE_URL": "postgresql://u:s3cret@[::1"}, 2, "not a valid PostgreSQL DSN"),
    (["start", "--workers", "0"], {}, 2, "--workers: must be at least 1"),
    (["start"], {"GENWORKER_WORKERS": "many"}, 2, "GENWORKER_WORKERS"),
    (["submit", "--plan", "free", "--n", "two"], {}, 2, "--n"),
    (["submit", "--plan", "free"], {"DATABASE_URL": "postgresql://u@127.0.0.1:1/x"}, 2, "--prompt"),
    (["tasks", "--status", "lost"], {}, 2, "--status"),
    (["status", "--config", "/nonexistent/genworker.toml"], {}, 2, "does not exist"),
    (["demo", "--latency-ms", "-5"], {}, 2, "--latency-ms"),
    (["demo", "--pro", "0", "--free", "0", "--start", "0"], {}, 2, "nothing to replay"),
    (["frobnicate"], {}, 2, "invalid choice"),
]


@pytest.mark.parametrize(("args", "extra", "code", "words"), BAD_INPUT)
def test_bad_input_gives_one_line_and_the_documented_exit_code(
    args: list[str], extra: dict[str, str], code: int, words: str
) -> None:
    done = run(args, env_for(None, **extra), timeout=60)
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert words in lines[0]
    assert lines[0].startswith("genworker")
    assert "s3cret" not in done.stderr


def test_errors_on_a_real_database_are_one_line_too(dsn: str, empty_dsn: str) -> None:
    plan = run(["submit", "--plan", "platinum", "--prompt", "x"], env_for(dsn))
    assert plan.returncode == 2
    assert "platinum" in plan.stderr
    missing = run(["show", "424242"], env_for(dsn))
    assert (missing.returncode, missing.stderr.strip()) == (2, "genworker: error: no task 424242")
    unmigrated = run(["status"], env_for(empty_dsn))
    assert unmigrated.returncode == 1
    assert "genworker migrate" in unmigrated.stderr
    for done in (plan, missing, unmigrated):
        assert len(done.stderr.strip().splitlines()) == 1
        assert "Traceback" not in done.stderr


def test_debug_shows_the_traceback() -> None:
    unreachable = ["--database-url", "postgresql://u@127.0.0.1:1/x"]
    # after the command or before it: the sub-command's own flag must not hide the other
    for args in (["status", "--debug", *unreachable], ["--debug", "status", *unreachable]):
        done = run(args, env_for(None))
        assert done.returncode != 0
        assert "Traceback" in done.stderr, args
    done = run(["status", *unreachable], env_for(None))
    assert "Traceback" not in done.stderr


def test_a_port_in_use_is_one_line() -> None:
    with _busy_port() as busy:
        port = busy.getsockname()[1]
        done = run(["sim-api", "--port", str(port)], env_for(None), timeout=60)
    assert done.returncode == 1
    out = (done.stdout + done.stderr).strip().splitlines()
    assert len(out) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out[0]


def test_config_masks_secrets_and_names_each_source(tmp_path: Path) -> None:
    toml = tmp_path / "genworker.toml"
    toml.write_text(
        'workers = 3\nconcurrency = 2\napi_key = "sk-file-s3cret"\n'
        'cache = "redis://:redis-s3cret@localhost:6379/0"\n'
    )
    env = env_for(
        "postgresql://app:db-s3cret@db.example/app",
        GENWORKER_API_KEY="sk-env-s3cret",
        GENWORKER_CONCURRENCY="4",
    )
    done = run(["config", "--config", str(toml), "--workers", "5"], env)
    assert done.returncode == 0, done.stderr
    assert "s3cret" not in done.stdout + done.stderr
    rows = {r["setting"]: r for r in run_json(["config", "--config", str(toml)], env)["settings"]}
    assert rows["api_key"]["value"] == "***"
    assert rows["api_key"]["source"] == "env GENWORKER_API_KEY"  # env beats the file
    assert rows["database_url"]["value"] == "postgresql://app:***@db.example/app"
    assert rows["cache"]["value"] == "redis://:***@localhost:6379/0"
    assert (rows["workers"]["value"], rows["workers"]["source"]) == ("3", f"file {toml}")
    assert (rows["concurrency"]["value"], rows["concurrency"]["source"]) == (
        "4",
        "env GENWORKER_CONCURRENCY",
    )
    assert "5" in next(line for line in done.stdout.splitlines() if line.startswith("workers"))
    assert "flag" in next(line for line in done.stdout.splitlines() if line.startswith("workers"))


def test_status_shows_the_api_error_rate_and_the_nodes_alarms(dsn: str, tmp_path: Path) -> None:
    env = env_for(dsn)
    with (
        sim_api(tmp_path, "--fail-401", "1.0", "--latency-ms", "5") as url,
        node(env, tmp_path, "--api-url", url, "--api-key", "sk-wrong"),
    ):
        assert run(["submit", "--plan", "free", "--prompt", "x"], env).returncode == 0

        def alarmed() -> dict | None:
            doc = run_json(["status"], env)
            return doc if doc["alarms"] and doc["rates"]["api_error_rate"] else None

        doc = until(alarmed, what="the node to publish its alarm")
        human = run(["status"], env).stdout
    assert doc["alarms"][0]["name"] == "bad_api_key"
    assert doc["rates"]["api_error_rate"] == 1.0
    assert "ALARM bad_api_key" in human
    assert "100.0%" in human
    assert "sk-wrong" not in human + json.dumps(doc)
