"""A provider outage is a node condition, not a job failure: while nothing answers at the
API's address the node pauses, says so on /readyz, spends no attempt, and when the
provider comes back every task finishes."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

import psycopg
from genworker.queue.client import Client
from supervisor_harness import (
    Launcher,
    jobs,
    launch_fixture,  # noqa: F401  (the launch fixture)
    status_counts,
    wait_all_finished,
    wait_for,
)

OUTAGE_S = float(os.environ.get("GW_TEST_OUTAGE_S", "20"))  # the figure is 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readyz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_an_outage_loses_no_task_spends_no_attempt_and_shows_on_readyz(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    api_port, http_port = free_port(), free_port()

    class Nowhere:  # the provider's address, where nothing listens yet
        url = f"http://127.0.0.1:{api_port}"

    node = launch.node(Nowhere(), "test-outage", "--http", f"127.0.0.1:{http_port}",  # type: ignore[arg-type]
                       "--retry-base", "0.2", workers=2)  # fmt: skip
    node.wait_workers(2)
    t0 = time.monotonic()
    client.submit("start", "a lighthouse in fog", n=30)
    client.submit("free", "a buoy", n=2)

    def down() -> list[str] | None:
        code, body = readyz(http_port)
        reasons = [str(r) for r in body.get("reasons", [])]  # type: ignore[attr-defined]
        return reasons if code == 503 and any("provider_down" in r for r in reasons) else None

    reasons = wait_for(down, "/readyz to say the provider is down", 20)
    detected_s = time.monotonic() - t0
    assert any("claims paused" in r for r in reasons), reasons

    while time.monotonic() - t0 < OUTAGE_S:  # the outage: nothing may go dead meanwhile
        assert status_counts(conn).get("dead", 0) == 0, jobs(conn, "status = 'dead'")
        assert down(), readyz(http_port)
        time.sleep(1)
    back_at = time.monotonic()
    launch.sim("--port", str(api_port), latency_ms=50)  # the provider comes back

    wait_all_finished(conn, 32, timeout_s=60)
    finished_s = time.monotonic() - back_at
    assert status_counts(conn) == {"succeeded": 32}
    assert all(j["attempts"] == 1 for j in jobs(conn)), [j["attempts"] for j in jobs(conn)]
    # paused and given back, not snoozing round and round: only the calls that found the
    # outage (5 in a row) spent snooze budget; a job that
    # kept snoozing through a long outage would pass --snooze-max and die
    rows = conn.execute("SELECT snoozed_s FROM genworker.jobs WHERE snoozed_s > 0").fetchall()
    assert len(rows) <= 5, rows
    tasks = conn.execute("SELECT status FROM genworker.tasks").fetchall()
    assert [s for (s,) in tasks] == ["succeeded", "succeeded"]
    wait_for(lambda: readyz(http_port)[0] == 200, "/readyz ready again", 10)
    log = node.log()
    assert log.count("alarm provider_down raised") == 1, log[-3000:]
    assert log.count("alarm provider_down cleared") == 1, log[-3000:]
    print(
        f"outage {back_at - t0:.1f}s: detected after {detected_s:.1f}s, "
        f"every task done {finished_s:.1f}s after the provider came back"
    )
