"""sd_notify over a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from genworker.ops import systemd
from notify_socket import NotifySocket


@pytest.fixture
def fake_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    path = str(tmp_path / "notify")
    server = NotifySocket(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield server
    server.close()


def test_each_message_arrives_as_one_datagram_in_order(fake_systemd: NotifySocket) -> None:
    assert systemd.ready("3 workers up")
    assert systemd.status("ok\nwith a newline")
    assert systemd.watchdog()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.ready()
    assert systemd.extend_timeout(12.5)
    assert systemd.stopping()

    got = fake_systemd.messages(settle_s=0.1)
    assert got[0] == {"READY": "1", "STATUS": "3 workers up"}
    assert got[1] == {"STATUS": "ok with a newline"}  # a newline cannot inject READY=1
    assert got[2] == {"WATCHDOG": "1"}
    assert got[3]["RELOADING"] == "1"
    assert before <= int(got[3]["MONOTONIC_USEC"]) <= after
    assert got[4:] == [{"READY": "1"}, {"EXTEND_TIMEOUT_USEC": "12500000"}, {"STOPPING": "1"}]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"genworker-test-{os.getpid()}-{time.monotonic_ns()}"
    server = NotifySocket("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert systemd.ready()
        assert server.messages(settle_s=0.1) == [{"READY": "1"}]
    finally:
        server.close()


def test_without_systemd_nothing_is_sent_and_nothing_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.stopping() is False


def test_a_newline_in_a_raw_line_is_refused(fake_systemd: NotifySocket) -> None:
    with pytest.raises(ValueError, match="newline"):
        systemd.notify("STATUS=a\nREADY=1")
    assert fake_systemd.messages(settle_s=0.1) == []


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_the_main_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval_s() is None


def _pings_between(server: NotifySocket, start: float, end: float) -> int:
    return sum(1 for t, m in server.received if "WATCHDOG" in m and start < t < end)


def test_notifier_pings_while_healthy_and_stops_when_the_loop_blocks(
    fake_systemd: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 50 ms
    marks: dict[str, float] = {}

    async def main() -> None:
        stop = asyncio.Event()
        notifier = systemd.Notifier(status_interval_s=0.1)
        assert notifier.ping_interval_s == 0.05
        task = asyncio.create_task(notifier.run(stop, lambda: "2/2 workers", lambda: True))
        await asyncio.sleep(0.4)
        marks["block"] = time.monotonic()
        time.sleep(0.6)  # noqa: ASYNC251 -- the loop is stuck: nobody may say it is alive
        marks["unblock"] = time.monotonic()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(task, 1)

    asyncio.run(main())
    time.sleep(0.1)
    # allow for a ping already in the socket when the block began
    assert _pings_between(fake_systemd, marks["block"] + 0.02, marks["unblock"]) == 0
    assert _pings_between(fake_systemd, 0, marks["block"]) >= 4
    assert _pings_between(fake_systemd, marks["unblock"], time.monotonic()) >= 2
    statuses = [m["STATUS"] for _, m in fake_systemd.received if "STATUS" in m]
    assert len(statuses) >= 4
    assert set(statuses) == {"2/2 workers"}


def test_notifier_withholds_pings_while_unhealthy_but_keeps_the_status(
    fake_systemd: NotifySocket,
) -> None:
    healthy = True

    async def main() -> None:
        nonlocal healthy
        stop = asyncio.Event()
        notifier = systemd.Notifier(status_interval_s=0.05, ping_interval_s=0.05)
        task = asyncio.create_task(notifier.run(stop, lambda: "degraded", lambda: healthy))
        await asyncio.sleep(0.2)
        healthy = False
        marks["sick"] = time.monotonic()
        await asyncio.sleep(0.4)
        stop.set()
        await asyncio.wait_for(task, 1)

    marks: dict[str, float] = {}
    asyncio.run(main())
    time.sleep(0.1)
    assert _pings_between(fake_systemd, 0, marks["sick"]) >= 2
    assert _pings_between(fake_systemd, marks["sick"] + 0.02, time.monotonic()) == 0
    late = [m for t, m in fake_systemd.received if t > marks["sick"] + 0.02 and "STATUS" in m]
    assert len(late) >= 4


def test_a_failing_status_function_does_not_stop_the_pings(
    fake_systemd: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> str:
        raise RuntimeError("bug")

    async def main() -> None:
        stop = asyncio.Event()
        notifier = systemd.Notifier(status_interval_s=0.05, ping_interval_s=0.05)
        task = asyncio.create_task(notifier.run(stop, broken, lambda: True))
        await asyncio.sleep(0.3)
        stop.set()
        await task

    asyncio.run(main())
    assert _pings_between(fake_systemd, 0, time.monotonic()) >= 3
    assert "building the STATUS line failed" in caplog.text


def test_notifier_returns_promptly_when_stopped(fake_systemd: NotifySocket) -> None:
    async def main() -> float:
        stop = asyncio.Event()
        notifier = systemd.Notifier(status_interval_s=60)
        task = asyncio.create_task(notifier.run(stop, lambda: "x", lambda: True))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        stop.set()
        await task
        return time.monotonic() - t0

    assert asyncio.run(main()) < 0.5
