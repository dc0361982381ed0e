"""`genworker start` on production day one: no simulator unless asked for, children that
import nothing from the directory it was started in and inherit no secret, and checks
made before anything is launched."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import psycopg
from genworker.queue.client import Client
from supervisor_harness import (
    GENWORKER,
    Launcher,
    launch_fixture,  # noqa: F401  (the launch fixture)
    processes,
    status_counts,
    wait_all_finished,
)

SECRETS = {
    "GENWORKER_API_KEY": "sk-env-SECRET-1b2c3d4e",
    "OPENAI_API_KEY": "sk-openai-SECRET-5f6a7b8c",
    "PGPASSWORD": "pg-SECRET-9d0e",
}


def start(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GENWORKER, "start", "--http", "", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def clean_env(dsn: str, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENWORKER_", "DATABASE_"))}
    return {**env, "DATABASE_URL": dsn, **extra}


def test_start_without_a_provider_or_with_two_refuses_in_one_line(dsn: str, tmp_path: Path) -> None:
    done = start("--output-dir", str(tmp_path / "out"), env=clean_env(dsn), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "--api-url" in lines[0], lines[0]
    assert "--simulate" in lines[0], lines[0]
    assert "simulated image API at" not in done.stdout + done.stderr  # nothing was launched

    both = start("--simulate", "--api-url", "http://127.0.0.1:9", env=clean_env(dsn), cwd=tmp_path)
    assert both.returncode == 2, both.stderr
    assert both.stderr.strip().splitlines() == [
        "genworker: error: give --api-url or --simulate, not both"
    ]


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(
        item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item
    )


def test_children_import_nothing_from_the_start_directory_and_inherit_no_secret(
    launch: Launcher, client: Client, conn: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    # root runs `start` in a directory that holds a `genworker/` package of its own
    here = tmp_path / "cwd"
    marker = tmp_path / "decoy-imported"
    (here / "genworker").mkdir(parents=True)
    (here / "genworker" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'a').write('imported\\n')\n"
        "raise ImportError('the decoy genworker package was imported')\n"
    )
    env = {**SECRETS, "GENWORKER_DATABASE_URL": dsn}
    handler = "environ=traps_handlers:environ"
    node = launch.node(None, "test-traps", "--handler", handler, workers=2, env=env, cwd=here)
    node.wait_workers(2)
    client.submit("start", "a decoy", n=6)
    client.submit("start", params={}, kind="environ", n=4)
    wait_all_finished(conn, 10, timeout_s=30)
    assert status_counts(conn) == {"succeeded": 10}
    assert not marker.exists(), marker.read_text()

    secret_names = {*SECRETS, "DATABASE_URL", "GENWORKER_DATABASE_URL"}
    seen = conn.execute("SELECT result FROM genworker.jobs WHERE kind = 'environ'").fetchall()
    for (result,) in seen:  # what the workers' own os.environ holds
        assert not secret_names & set(result["names"]), result["names"]
        assert "PYTHONPATH" in result["names"]  # the handler modules' path still reaches them
        assert result["path0"] != str(here), result
    # the simulator runs in a session of its own: it is the supervisor's other child
    zygote = node.zygote()
    sims = [p.pid for p in processes().values() if p.ppid == node.pid and p.pid != zygote]
    assert zygote is not None
    assert len(sims) == 1, sims
    for pid in [*node.workers().values(), zygote, *sims]:  # what /proc shows of each
        environ = environ_of(pid)
        assert not secret_names & set(environ), (pid, secret_names & set(environ))
        assert not any(v in str(environ) for v in SECRETS.values()), pid


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_second_start_is_refused_before_it_launches_anything(
    launch: Launcher, dsn: str, tmp_path: Path
) -> None:
    port = free_port()
    first = launch.node(None, "test-first", "--http", f"127.0.0.1:{port}", workers=1)
    first.wait_workers(1)
    log = first.log()
    assert f"results go to {first.output_dir.resolve()}" in log, log
    assert "database: " in log, log
    assert "unauthenticated" not in log, log

    env = clean_env(dsn)
    out = ["--output-dir", str(tmp_path / "out2"), "--workers", "1", "--simulate"]
    same_port = start(*out, "--node-id", "test-second", "--http", f"127.0.0.1:{port}",
                      env=env, cwd=tmp_path)  # fmt: skip
    assert same_port.returncode != 0
    assert (
        same_port.stderr.strip()
        .splitlines()[-1]
        .startswith(f"genworker: error: cannot serve metrics on 127.0.0.1:{port}: port in use")
    ), same_port.stderr
    assert "simulated image API at" not in same_port.stderr  # refused before it launched it

    same_id = start(*out, "--node-id", "test-first", env=env, cwd=tmp_path)
    assert same_id.returncode == 2, same_id.stderr
    assert "node id 'test-first' is in use by the supervisor" in same_id.stderr
    assert "a node already runs here" in same_id.stderr
    assert "simulated image API at" not in same_id.stderr


def test_start_refuses_an_output_dir_without_room_and_warns_of_a_missing_key(
    launch: Launcher, dsn: str, tmp_path: Path
) -> None:
    env = clean_env(dsn)
    full = start("--simulate", "--output-dir", str(tmp_path / "o"), "--min-free-disk",
                 str(2**40), env=env, cwd=tmp_path)  # fmt: skip
    assert full.returncode == 2, full.stderr
    assert full.stderr.strip().splitlines() == [
        f"genworker: error: --output-dir {tmp_path / 'o'} has "
        + full.stderr.split(" has ", 1)[1].split(" MB", 1)[0]
        + f" MB free, less than --min-free-disk {2**40} MB"
    ]
    # a provider with no key: one warning at start (nothing listens there; no job is run)
    nowhere = SimpleNamespace(url="http://127.0.0.1:9")
    keyless = launch.node(nowhere, "test-keyless", workers=1)  # type: ignore[arg-type]
    keyless.wait_workers(1)
    assert keyless.log().count("WARNING genworker.start: no API key: calls go unauthenticated") == 1


def test_status_shows_a_new_node_s_workers_as_soon_as_they_are_up(
    launch: Launcher, conn: psycopg.Connection
) -> None:
    import time

    from supervisor_harness import node_info, wait_for

    node = launch.node(None, "test-prompt", workers=2, lease_s=30)  # a heartbeat every 10 s
    node.wait_workers(2)
    up_at = time.monotonic()

    def published() -> bool:
        workers = node_info(conn, "test-prompt").get("workers") or []
        return len(workers) == 2 and all(w["state"] == "ready" for w in workers)

    wait_for(published, "the nodes row to list both workers ready", 10)
    assert time.monotonic() - up_at < 2.0
