"""A provider that answers garbage, through a real node: wrong content types, truncated
JSON, a body shorter than its Content-Length, 10 MB of non-image, 40 MB announced, an
endless stream, slow-loris bodies and headers, a bad gzip, a redirect loop, bytes that
are not HTTP. Each of those jobs ends dead with the reason stored; the workers and the
supervisor stay up (same processes, no restart) and the well-behaved jobs beside them
succeed.

The provider is a FAKE of this test's own (aiohttp on loopback, every answer labelled
X-Fake-Provider), not the simulated API: it misbehaves in ways no real one should.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator

import psycopg
import pytest
from aiohttp import web
from genworker.queue.client import Client
from genworker.sim.server import tiny_png
from supervisor_harness import (
    Launcher,
    jobs,
    launch_fixture,  # noqa: F401  (the launch fixture)
    node_info,
    wait_all_finished,
)

FAKE = {"X-Fake-Provider": "genworker-hostile-test"}
TIMEOUT_S = 3  # the node's --request-timeout

# prompt -> words the dead job's reason must hold (after "attempts spent (2): ")
HOSTILE = {
    "html": "answered text/html instead of JSON",
    "png as the body": "answered image/png instead of JSON",
    "json as text/plain": "answered text/plain instead of JSON",
    "truncated json": "not valid JSON",
    "short of its content-length": "connection error",
    "10 MB of non-image": "not PNG/JPEG/WebP/GIF",
    "40 MB announced": "provider answer too large: 41943040 bytes",
    "endless stream": "provider answer too large: over",
    "slow-loris body": f"no answer within {TIMEOUT_S}s",
    "slow-loris headers": f"no answer within {TIMEOUT_S}s",
    "bad gzip": "connection error",
    "redirect loop": "connection error",
    "not http": "connection error",
    "error object with 200": "no image",
}


async def _stream(request: web.Request, body: bytes, **headers: str) -> web.StreamResponse:
    resp = web.StreamResponse(headers={**FAKE, **headers})
    await resp.prepare(request)
    await resp.write(body)
    return resp


async def generations(request: web.Request) -> web.StreamResponse:
    if request.method != "POST":  # where the redirect loop leads (a client follows with GET)
        raise web.HTTPFound("/v1/images/generations", headers=FAKE)
    prompt = (await request.json()).get("prompt")
    if prompt == "ok":
        b64 = base64.b64encode(tiny_png(request.headers["X-Client-Request-Id"].encode())).decode()
        return web.json_response({"data": [{"b64_json": b64}]}, headers=FAKE)
    if prompt == "html":
        return web.Response(text="<html>Bad gateway</html>", content_type="text/html", headers=FAKE)
    if prompt == "png as the body":
        return web.Response(body=tiny_png(b"x"), content_type="image/png", headers=FAKE)
    if prompt == "json as text/plain":
        return web.Response(text='{"data": []}', content_type="text/plain", headers=FAKE)
    if prompt == "truncated json":
        body = b'{"data": [{"b64_json": "iVBO'
        return web.Response(body=body, content_type="application/json", headers=FAKE)
    if prompt == "short of its content-length":
        resp = await _stream(
            request, b'{"data": [', **{"Content-Type": "application/json", "Content-Length": "500"}
        )
        request.transport.close()  # type: ignore[union-attr]
        return resp
    if prompt == "10 MB of non-image":
        b64 = base64.b64encode(b"\0" * (7_500_000)).decode()  # 10 MB of base64
        return web.json_response({"data": [{"b64_json": b64}]}, headers=FAKE)
    if prompt == "40 MB announced":
        headers = {"Content-Type": "application/json", "Content-Length": str(40 * 2**20)}
        resp = await _stream(request, b'{"data": [{"b64_json": "', **headers)
        await asyncio.sleep(TIMEOUT_S * 2)  # never sends the rest: refused from the header
        return resp
    if prompt == "endless stream":
        resp = await _stream(
            request, b'{"data": [{"b64_json": "', **{"Content-Type": "application/json"}
        )
        chunk = b"A" * 2**20
        for _ in range(200):  # 200 MB, far past the 32 MB cap
            await resp.write(chunk)
        return resp
    if prompt == "slow-loris body":
        resp = await _stream(request, b"{", **{"Content-Type": "application/json"})
        for _ in range(TIMEOUT_S * 20):
            await asyncio.sleep(0.5)
            await resp.write(b" ")
        return resp
    if prompt == "slow-loris headers":
        await asyncio.sleep(TIMEOUT_S * 10)
        return web.Response(headers=FAKE)
    if prompt == "bad gzip":
        return web.Response(
            body=b"this is not gzip at all",
            headers={**FAKE, "Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
    if prompt == "redirect loop":
        raise web.HTTPFound("/v1/images/generations", headers=FAKE)
    if prompt == "error object with 200":
        return web.json_response({"error": {"message": "all good"}}, headers=FAKE)
    if prompt == "not http":  # raw bytes on the socket, as from a port that is not HTTP
        assert request.transport is not None
        request.transport.write(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff garbage\r\n\r\n")
        request.transport.close()
        return web.Response(headers=FAKE)
    return web.Response(status=404, headers=FAKE)


class FakeProvider:
    """The fake, served from a thread of its own for the duration of one test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> str:
        app = web.Application(client_max_size=2**20)
        app.router.add_route("*", "/v1/images/generations", generations)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _stop(self) -> None:
        await self.runner.cleanup()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider()
    try:
        yield provider
    finally:
        provider.stop()


def test_garbage_answers_fail_their_jobs_with_the_reason_and_nothing_else(
    launch: Launcher, client: Client, conn: psycopg.Connection, fake: FakeProvider
) -> None:
    args = (
        *("--max-attempts", "2", "--retry-base", "0", "--retry-max", "0.1"),
        *("--request-timeout", str(TIMEOUT_S), "--connect-timeout", str(TIMEOUT_S)),
    )
    node = launch.node(None, "test-hostile-api", *args, "--api-url", fake.url, workers=2)
    pids = node.wait_workers(2)
    good = client.submit("start", "ok", n=20)
    hostile = {prompt: client.submit("free", prompt, n=1) for prompt in HOSTILE}

    wait_all_finished(conn, 20 + len(HOSTILE), timeout_s=120)
    assert client.get(good).status == "succeeded"
    for prompt, words in HOSTILE.items():
        [job] = jobs(conn, "task_id = %s", (hostile[prompt],))
        assert job["status"] == "dead", (prompt, job)
        assert job["error"].startswith("attempts spent (2): "), (prompt, job["error"])
        assert words in job["error"], (prompt, job["error"])
        assert len(job["error"]) < 400
        assert "\n" not in job["error"]

    # the garbage failed those jobs, not the processes that ran them
    node.check_running()
    assert node.workers() == pids
    info = node_info(conn, node.node_id)
    assert info.get("restarts") == {}
    # the node says its provider misbehaves, and nothing more (no claim pause, no bad key)
    assert set(info.get("alarms", {})) <= {"api_error_rate"}, info.get("alarms")
