"""sd_notify from a real `genworker start` to a real datagram socket standing in for
systemd: READY once the workers are up, STATUS and WATCHDOG while it runs, no ping while
the supervisor is frozen, RELOADING then READY around a HUP, STOPPING on TERM, and
EXTEND_TIMEOUT_USEC while a long drain runs."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from genworker.queue.client import Client
from notify_socket import NotifySocket
from supervisor_harness import (
    Launcher,
    launch_fixture,  # noqa: F401  (the launch fixture)
    status_counts,
    wait_for,
)

WATCHDOG_USEC = 1_000_000  # a ping every half second


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "notify"
    yield path
    path.unlink(missing_ok=True)


def test_notify_sequence_from_ready_to_stopping(
    launch: Launcher, client: Client, conn: psycopg.Connection, notify_path: Path
) -> None:
    workers_at_ready: list[int] = []
    holder: dict[str, object] = {}

    def seen(fields: dict[str, str]) -> None:  # in the receiving thread, as READY arrives
        if "READY" in fields and "node" in holder and not workers_at_ready:
            workers_at_ready.append(len(holder["node"].workers()))  # type: ignore[attr-defined]

    systemd = NotifySocket(notify_path, seen)
    try:
        sim = launch.sim(latency_ms=10_000)
        env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        node = launch.node(sim, "test-notify", workers=2, lease_s=10, env=env)
        holder["node"] = node

        # READY after the workers are up, then STATUS updates and pings
        wait_for(lambda: systemd.count("READY"), "READY=1", 30)
        assert workers_at_ready == [2], workers_at_ready
        ready = next(m for m in systemd.messages() if "READY" in m)
        assert ready["STATUS"].startswith("2/2 workers"), ready
        n_status = systemd.count("STATUS")
        wait_for(lambda: systemd.count("STATUS") >= n_status + 2, "two more STATUS=", 20)
        wait_for(lambda: systemd.count("WATCHDOG") >= 3, "WATCHDOG=1 pings", 10)

        # a frozen supervisor loop sends no ping; they resume when it runs again
        node.signal(signal.SIGSTOP)
        try:
            time.sleep(0.3)  # a datagram sent just before the stop may still be on its way
            frozen_at = systemd.count("WATCHDOG")
            time.sleep(3)  # six ping intervals
            assert systemd.count("WATCHDOG") == frozen_at
        finally:
            node.signal(signal.SIGCONT)
        wait_for(lambda: systemd.count("WATCHDOG") >= frozen_at + 2, "pings again", 10)

        # HUP: RELOADING=1 with the monotonic clock, then READY=1 once every worker is new
        before_hup = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        node.signal(signal.SIGHUP)
        wait_for(lambda: systemd.events().count("READY") == 2, "READY=1 after the reload", 30)
        reloading = next(m for m in systemd.messages() if "RELOADING" in m)
        assert before_hup <= int(reloading["MONOTONIC_USEC"])
        assert int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        assert "HUP: every worker replaced" in node.log()

        # TERM with jobs in flight for 10 s: STOPPING=1, and more time asked for the drain
        client.submit("start", "a slow heron", n=4)
        wait_for(lambda: status_counts(conn).get("running") == 4, "4 jobs in flight", 15)
        node.signal(signal.SIGTERM)
        assert node.wait(30) == 0, node.log()[-3000:]
        assert status_counts(conn) == {"succeeded": 4}
        assert systemd.events() == ["READY", "RELOADING", "READY", "STOPPING"]
        extends = [m for m in systemd.messages() if "EXTEND_TIMEOUT_USEC" in m]
        assert extends, "a drain past 5 s asks systemd for more time"
        assert all(int(m["EXTEND_TIMEOUT_USEC"]) >= 20_000_000 for m in extends)
        stopping = systemd.messages().index(next(m for m in systemd.messages() if "STOPPING" in m))
        assert all(systemd.messages().index(m) > stopping for m in extends)
    finally:
        systemd.close()


def test_no_watchdog_pings_without_watchdog_usec(launch: Launcher, notify_path: Path) -> None:
    systemd = NotifySocket(notify_path)
    try:
        node = launch.node(None, "test-nowatchdog", env={"NOTIFY_SOCKET": str(notify_path)})
        wait_for(lambda: systemd.count("READY"), "READY=1", 30)
        n_status = systemd.count("STATUS")
        wait_for(lambda: systemd.count("STATUS") >= n_status + 2, "two more STATUS=", 20)
        assert systemd.count("WATCHDOG") == 0
        node.signal(signal.SIGTERM)
        assert node.wait(30) == 0
        assert systemd.events() == ["READY", "STOPPING"]
    finally:
        systemd.close()
