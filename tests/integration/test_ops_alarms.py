"""Each alarm of a real node fires and clears with one log line each, and shows in
/readyz, in the node's info (`genworker status`) and in systemd's STATUS= line while
raised: queue depth (a submitted backlog), API error rate (a sim answering 500s),
worker restarts (killed workers), bad API key (a sim refusing the key, until a HUP
brings the right one). db_wait: see test_ops_health.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psycopg
from genworker.queue.client import Client
from notify_socket import NotifySocket
from ops_support import alarm_lines, http_address, readyz
from supervisor_harness import (
    Launcher,
    Node,
    alive,
    launch_fixture,  # noqa: F401  (the launch fixture)
    node_info,
    status_counts,
    wait_all_finished,
    wait_for,
)

RIGHT_KEY = "sk-right-ALARMKEY-0123456789"
WRONG_KEY = "sk-wrong-ALARMKEY-9876543210"


def kill_workers(node: Node, times: int) -> None:
    """SIGKILL a worker, wait for its replacement, `times` times (both positions in turn)."""
    for i in range(times):
        workers = node.wait_workers(2)
        pid = workers[i % 2]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: not alive(pid), "the worker gone", 10)
        wait_for(
            lambda pid=pid: len(w := node.workers()) == 2 and pid not in w.values(),
            "its replacement up",
            30,
        )


def test_queue_depth_error_rate_and_restarts_fire_and_clear_once_each(
    launch: Launcher, client: Client, conn: psycopg.Connection, tmp_path: Path
) -> None:
    systemd = NotifySocket(tmp_path / "notify")
    try:
        sim = launch.sim("--fail-500", "0.3", latency_ms=1000, jitter_ms=200)
        node = launch.node(
            sim, "test-alarms", "--http", "127.0.0.1:0", "--concurrency", "2",
            "--retry-base", "0.1", "--retry-max", "1",
            "--alarms", "queue_depth=5,queue_depth_hold_s=1,window_s=20",
            workers=2, lease_s=3, env={"NOTIFY_SOCKET": str(tmp_path / "notify")},
        )  # fmt: skip
        address = http_address(node)
        node.wait_workers(2)
        client.submit_many([{"plan": "free", "params": {"prompt": f"b{i}"}} for i in range(30)])
        kill_workers(node, 6)

        wanted = {"queue_depth", "api_error_rate", "worker_restarts"}

        def all_raised() -> bool:
            return wanted <= set(alarm_lines(node.log()))

        wait_for(all_raised, "three alarms raised", 60)
        status, doc = readyz(address)
        assert status == 503
        shown = {r.split(":")[0] for r in doc["reasons"]}
        assert {f"alarm {a}" for a in wanted} & shown, doc
        wait_for(
            lambda: wanted & set(node_info(conn, "test-alarms").get("alarms", {})),
            "the alarms in the node info",
            20,
        )
        wait_for(
            lambda: any("ALARM" in m.get("STATUS", "") for m in systemd.messages()),
            "ALARM in STATUS=",
            10,
        )

        wait_all_finished(conn, 60, timeout_s=120)

        def all_cleared() -> bool:
            lines = alarm_lines(node.log())
            return all(lines.get(a, [])[-1:] == ["cleared"] for a in wanted)

        wait_for(all_cleared, "the three alarms cleared", 60)
        wait_for(lambda: readyz(address)[0] == 200, "ready again", 20)
        wait_for(
            lambda: not node_info(conn, "test-alarms").get("alarms"),
            "no alarm in the node info",
            20,
        )
        node.signal(signal.SIGTERM)
        assert node.wait(30) == 0
        lines = alarm_lines(node.log())
        for a in wanted:
            assert lines[a] == ["raised", "cleared"], (a, lines)
        assert set(lines) == wanted, lines
        raised = [ln for ln in node.log().splitlines() if "alarm queue_depth raised" in ln]
        assert "WARNING" in raised[0]
        assert "queue depth (tasks)" in raised[0]
    finally:
        systemd.close()


def test_a_bad_key_pauses_then_probes_and_clears_when_a_hup_brings_the_right_key(
    launch: Launcher, client: Client, conn: psycopg.Connection, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(WRONG_KEY)
    sim = launch.sim(latency_ms=100, env={"GENWORKER_SIM_API_KEY": RIGHT_KEY})
    node = launch.node(
        sim, "test-keyalarm", "--http", "127.0.0.1:0", "--api-key-file", str(key_file),
        "--alarms", "bad_api_key_pause_s=2", workers=2, lease_s=3,
    )  # fmt: skip
    address = http_address(node)
    node.wait_workers(2)
    client.submit("pro", "a keyed heron", n=40)
    wait_for(lambda: "alarm bad_api_key raised" in node.log(), "the bad-key alarm", 30)
    status, doc = readyz(address)
    assert status == 503
    reason = next(r for r in doc["reasons"] if r.startswith("alarm bad_api_key"))
    assert "401" in reason
    assert "claims paused" in reason
    # after each pause one job probes the key: refused again, it changes nothing else
    refused = sim.stats()["total"]
    wait_for(lambda: sim.stats()["total"] >= refused + 2, "two probes, one per pause", 30)
    assert status_counts(conn).get("succeeded", 0) == 0
    assert alarm_lines(node.log())["bad_api_key"] == ["raised"]

    key_file.write_text(RIGHT_KEY)
    node.signal(signal.SIGHUP)  # new workers read the new key; the pause ends with a probe
    wait_for(lambda: "alarm bad_api_key cleared" in node.log(), "the alarm cleared", 60)
    counts: dict[str, Any] = {}

    def finished() -> bool:
        counts.update(status_counts(conn))
        return counts.get("succeeded", 0) + counts.get("dead", 0) == 40

    wait_for(finished, "every job finished", 60)
    assert counts.get("succeeded", 0) >= 28, counts  # only those in flight at the 401s died
    wait_for(lambda: readyz(address)[0] == 200, "ready again", 20)
    node.signal(signal.SIGTERM)
    assert node.wait(30) == 0
    assert alarm_lines(node.log()).get("bad_api_key") == ["raised", "cleared"]
    assert RIGHT_KEY not in node.log()
    assert WRONG_KEY not in node.log()
