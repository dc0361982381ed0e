"""What `ps` shows: every process of a node says what it is, and no secret (API key, DB
password) appears in any title, log line or the node's published info."""

from __future__ import annotations

import re
import signal

import psycopg
from genworker.queue.client import Client
from psycopg.conninfo import make_conninfo
from supervisor_harness import (
    Launcher,
    cmdline_bytes,
    launch_fixture,  # noqa: F401  (the launch fixture)
    node_info,
    status_counts,
    wait_all_finished,
    wait_for,
)

API_KEY = "sk-test-SECRET-7f3a9c2e1b"
DB_PASSWORD = "hunter2secret"


def test_titles_say_what_each_process_is_and_never_show_a_secret(
    launch: Launcher, client: Client, conn: psycopg.Connection, dsn: str
) -> None:
    # the simulated API accepts only this key: the jobs succeed only if the workers send it
    sim = launch.sim(latency_ms=200, env={"GENWORKER_SIM_API_KEY": API_KEY})
    dsn_with_password = make_conninfo(dsn, password=DB_PASSWORD)  # trust auth ignores it
    node = launch.node(
        sim,
        "test-titles",
        "--api-key",
        API_KEY,
        "--database-url",
        dsn_with_password,
        workers=2,
        dsn=dsn_with_password,
    )
    client.submit("start", "a kingfisher", n=10)
    node.wait_workers(2)
    wait_all_finished(conn, 10, timeout_s=20)
    assert status_counts(conn) == {"succeeded": 10}

    tree = node.tree()
    titles = sorted(p.title for p in tree)
    assert len(tree) == 4, titles
    assert re.match(r"^genworker: supervisor node=test-titles workers=2/2 ", node.title()), titles
    assert sum(t == "genworker: zygote" for t in titles) == 1, titles
    workers = [t for t in titles if t.startswith("genworker: worker ")]
    assert len(workers) == 2, titles
    for t in workers:
        assert re.match(r"^genworker: worker [01] inflight=\d+/5 done=\d+", t), t

    for p in tree:
        raw = cmdline_bytes(p.pid)
        assert API_KEY.encode() not in raw, (p, raw)
        assert DB_PASSWORD.encode() not in raw, (p, raw)
    info = node_info(conn, "test-titles")
    assert info
    assert API_KEY not in str(info)
    assert DB_PASSWORD not in str(info)

    node.signal(signal.SIGTERM)
    assert node.wait(15) == 0
    log = node.log()
    assert "stopped:" in log
    assert API_KEY not in log
    assert DB_PASSWORD not in log


def test_no_title_ever_shows_a_secret_while_the_node_starts(launch: Launcher, dsn: str) -> None:
    """From the first moment the zygote exists, not only once the node is up."""
    sim = launch.sim(latency_ms=50)
    node = launch.node(sim, "test-early", "--api-key", API_KEY, workers=2)
    leaked: list[tuple[int, bytes]] = []

    def up() -> bool:
        tree = node.tree()
        # Until it forks, the supervisor's argv is the one it was started with (that is why
        # --help says to prefer GENWORKER_API_KEY); from the zygote on, nothing shows it.
        if len(tree) > 1:
            for p in tree:
                raw = cmdline_bytes(p.pid)
                if API_KEY.encode() in raw:
                    leaked.append((p.pid, raw))
        return len(node.workers()) == 2

    wait_for(up, "the node up", 30, every_s=0.002)
    assert not leaked, leaked


def test_worker_titles_keep_their_numbers_after_a_reload_under_load(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim(latency_ms=1000)
    node = launch.node(sim, "test-renumber", workers=2)
    node.wait_workers(2)
    client.submit("start", "a dipper", n=30)
    wait_for(lambda: status_counts(conn).get("running", 0) >= 10, "both workers busy", 10)
    node.signal(signal.SIGHUP)  # each replacement boots while the old worker still drains
    wait_for(lambda: "every worker replaced" in node.log(), "the reload", 30)
    assert sorted(node.wait_workers(2)) == [0, 1]
