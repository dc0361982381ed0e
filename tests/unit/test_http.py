"""The health and metrics endpoints, on a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from genworker.errors import UsageError
from genworker.ops.http import (
    HttpServeError,
    Readiness,
    assess_readiness,
    make_app,
    parse_address,
    serve,
)


class FakeSupervisor:
    def __init__(self) -> None:
        self.database_ok = True
        self.workers_up = 2
        self.alarms: dict[str, str] = {}
        self.fail = False

    def metrics_text(self) -> str:
        return "# TYPE genworker_nodes gauge\ngenworker_nodes 1\n"

    def readiness(self) -> Readiness:
        if self.fail:
            raise RuntimeError("postgresql://gw:hunter2@db/gw is down")
        return assess_readiness(
            database_ok=self.database_ok, workers_up=self.workers_up, workers=2, alarms=self.alarms
        )


class AsyncSupervisor:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    async def metrics_text(self) -> str:
        await asyncio.sleep(self.delay_s)
        return "genworker_nodes 2\n"

    async def readiness(self) -> Readiness:
        await asyncio.sleep(self.delay_s)
        return True, []


Check = Callable[[aiohttp.ClientSession, str], Awaitable[None]]


def with_server(provider: Any, check: Check, *, timeout_s: float = 5.0) -> None:
    async def main() -> None:
        runner = await serve(make_app(provider, timeout_s=timeout_s), "127.0.0.1:0")
        assert runner is not None
        host, port = runner.addresses[0][:2]
        assert host == "127.0.0.1"
        try:
            async with aiohttp.ClientSession() as session:
                await check(session, f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()

    asyncio.run(main())


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with session.get(url) as r:
        return r.status, r.headers["Content-Type"], await r.text()


def test_healthz_and_metrics() -> None:
    async def check(s: aiohttp.ClientSession, base: str) -> None:
        assert (await get(s, base + "/healthz"))[::2] == (200, "ok\n")
        status, ctype, body = await get(s, base + "/metrics")
        assert status == 200
        assert ctype == "text/plain; version=0.0.4; charset=utf-8"
        assert body.endswith("genworker_nodes 1\n")
        assert (await get(s, base + "/nope"))[0] == 404

    with_server(FakeSupervisor(), check)


def test_readyz_turns_503_with_the_reasons_and_back_to_200() -> None:
    sup = FakeSupervisor()

    async def check(s: aiohttp.ClientSession, base: str) -> None:
        async def readyz() -> tuple[int, Any]:
            async with s.get(base + "/readyz") as r:
                assert r.content_type == "application/json"
                return r.status, await r.json()

        assert await readyz() == (200, {"ready": True, "reasons": []})
        sup.database_ok, sup.workers_up = False, 1
        sup.alarms = {"queue_depth": "queue depth 63 > 50"}
        assert await readyz() == (
            503,
            {
                "ready": False,
                "reasons": [
                    "database unreachable",
                    "workers down: 1 of 2",
                    "alarm queue_depth: queue depth 63 > 50",
                ],
            },
        )
        sup.database_ok, sup.workers_up, sup.alarms = True, 2, {}
        assert (await readyz())[0] == 200

    with_server(sup, check)


def test_a_failing_readiness_check_is_a_503_that_leaks_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup = FakeSupervisor()
    sup.fail = True

    async def check(s: aiohttp.ClientSession, base: str) -> None:
        status, _, body = await get(s, base + "/readyz")
        assert status == 503
        assert "readiness check failed" in body
        assert "hunter2" not in body

    with_server(sup, check)
    assert "readiness check failed" in caplog.text


def test_async_providers_and_their_timeout() -> None:
    async def fast(s: aiohttp.ClientSession, base: str) -> None:
        assert (await get(s, base + "/metrics"))[2] == "genworker_nodes 2\n"
        assert (await get(s, base + "/readyz"))[0] == 200

    with_server(AsyncSupervisor(), fast)

    async def slow(s: aiohttp.ClientSession, base: str) -> None:
        status, _, body = await get(s, base + "/readyz")
        assert status == 503
        assert "timed out" in body
        assert (await get(s, base + "/metrics"))[0] == 503

    with_server(AsyncSupervisor(delay_s=1.0), slow, timeout_s=0.1)


def test_port_in_use_is_one_clear_line() -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(HttpServeError) as e:
                await serve(web.Application(), f"127.0.0.1:{port}")
        assert str(e.value).startswith(f"cannot serve metrics on 127.0.0.1:{port}: port in use")
        assert "\n" not in str(e.value)

    asyncio.run(main())


def test_empty_address_disables_the_server() -> None:
    assert asyncio.run(serve(web.Application(), "")) is None


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:0", ("localhost", 0)),
        ("", None),
        ("  ", None),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int] | None) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("9464", "host:port"),
        (":9464", "host:port"),  # in Go this means every interface: make that explicit
        ("localhost", "host:port"),
        ("localhost:http", "must be a number"),
        ("localhost:70000", "0..65535"),
        ("::1:9464", "brackets"),
    ],
)
def test_bad_addresses_are_usage_errors(address: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_address(address)
