"""The simulated API itself: labelled, counted, rate-limited, deterministic, and a real CLI."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from typing import Any

import aiohttp
from genworker.sim.server import SIM_HEADER, SimConfig, start_sim, tiny_png

GEN = "/v1/images/generations"


def png_ok(data: bytes) -> bool:
    """Walk the chunks and check every CRC and the pixel data's size."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        if kind == b"IHDR":
            width = struct.unpack(">I", body[:4])[0]
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    return len(zlib.decompress(idat)) == width * (1 + 3 * width)


def test_tiny_png_is_valid_and_differs_per_seed() -> None:
    assert png_ok(tiny_png(b"a"))
    assert png_ok(tiny_png(b"b", px=33))
    assert tiny_png(b"a") != tiny_png(b"b")


async def _with_sim(config: SimConfig, scenario: Any) -> Any:
    runner, port = await start_sim(config)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            return await scenario(http)
    finally:
        await runner.cleanup()


def with_sim(config: SimConfig, scenario: Any) -> Any:
    return asyncio.run(_with_sim(config, scenario))


async def post(http: aiohttp.ClientSession, rid: str = "r", **body: Any) -> aiohttp.ClientResponse:
    payload = {"prompt": "a cat", **body}
    async with http.post(GEN, json=payload, headers={"X-Client-Request-Id": rid}) as resp:
        await resp.read()
        return resp


def test_every_answer_says_it_is_simulated() -> None:
    async def scenario(http: aiohttp.ClientSession) -> None:
        async with http.post(GEN, json={"prompt": "a cat"}) as resp:
            doc = await resp.json()
            assert resp.headers[SIM_HEADER] == "1"
            assert doc["simulated"] is True
            assert png_ok(base64.b64decode(doc["data"][0]["b64_json"]))
        async with http.post(GEN, json={"prompt": ""}) as resp:
            assert resp.status == 400
            assert resp.headers[SIM_HEADER] == "1"
            assert (await resp.json())["simulated"] is True
        async with http.get("/files/nothing.png") as resp:
            assert resp.status == 404
            assert resp.headers[SIM_HEADER] == "1"
        async with http.get("/stats") as resp:
            assert resp.headers[SIM_HEADER] == "1"
            assert (await resp.json())["simulated"] is True

    with_sim(SimConfig(latency_ms=1), scenario)


def test_its_rate_limit_answers_429_with_waits_past_n_per_second() -> None:
    async def scenario(http: aiohttp.ClientSession) -> tuple[list[int], Any, dict[str, Any]]:
        statuses = []
        last = None
        for i in range(8):
            resp = await post(http, f"r{i}")
            statuses.append(resp.status)
            last = resp
        async with http.get("/stats") as resp:
            return statuses, last, await resp.json()

    statuses, last, stats = with_sim(SimConfig(latency_ms=1, rps=5), scenario)
    assert statuses == [200] * 5 + [429] * 3
    assert 0 < int(last.headers["retry-after-ms"]) <= 1000
    assert last.headers["Retry-After"] == "1"
    assert stats["by_status"] == {"200": 5, "429": 3}
    assert stats["by_request_id"]["r7"] == 1


def test_the_same_seed_gives_the_same_faults() -> None:
    async def scenario(http: aiohttp.ClientSession) -> list[int]:
        return [(await post(http, str(i))).status for i in range(30)]

    def run(seed: int) -> list[int]:
        return with_sim(SimConfig(latency_ms=0, jitter_ms=0, fail_500=0.5, seed=seed), scenario)

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    assert 5 < first.count(500) < 25


def test_it_counts_calls_per_request_id_and_resets() -> None:
    async def scenario(http: aiohttp.ClientSession) -> tuple[Any, Any]:
        for rid in ("gw-1-1", "gw-1-1", "gw-2-1"):
            await post(http, rid)
        async with http.get("/stats") as resp:
            before = await resp.json()
        async with http.post("/stats/reset") as resp:
            assert resp.status == 200
        async with http.get("/stats") as resp:
            return before, await resp.json()

    before, after = with_sim(SimConfig(latency_ms=0), scenario)
    assert before["by_request_id"] == {"gw-1-1": 2, "gw-2-1": 1}
    assert before["total"] == 3
    assert after["total"] == 0
    assert after["by_request_id"] == {}
    assert "api_key" not in after["config"]


def test_a_configured_key_is_required() -> None:
    async def scenario(http: aiohttp.ClientSession) -> tuple[int, int]:
        anon = (await post(http)).status
        async with http.post(
            GEN, json={"prompt": "x"}, headers={"Authorization": "Bearer k1"}
        ) as resp:
            return anon, resp.status

    assert with_sim(SimConfig(latency_ms=0, api_key="k1"), scenario) == (401, 200)


def test_latency_is_applied() -> None:
    async def scenario(http: aiohttp.ClientSession) -> float:
        start = time.monotonic()
        for _ in range(5):
            await post(http)
        return (time.monotonic() - start) / 5

    assert 0.03 <= with_sim(SimConfig(latency_ms=30, jitter_ms=0), scenario) < 0.5


def test_url_results_are_served_by_the_sim() -> None:
    async def scenario(http: aiohttp.ClientSession) -> bytes:
        async with http.post(
            GEN, json={"prompt": "x", "model": "dall-e-2", "response_format": "url"}
        ) as resp:
            url = (await resp.json())["data"][0]["url"]
        async with http.get(url) as resp:
            assert resp.content_type == "image/png"
            return await resp.read()

    assert png_ok(with_sim(SimConfig(latency_ms=0), scenario))


def test_the_command_line_serves_until_sigterm() -> None:
    env = {**os.environ, "GENWORKER_SIM_LATENCY_MS": "1", "GENWORKER_SIM_RPS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "genworker.sim", "--port", "0", "--seed", "3"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("SIMULATED image API listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])

        async def calls() -> list[int]:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
                return [(await post(http)).status for _ in range(3)]

        assert asyncio.run(calls()) == [200, 200, 429]  # the env var's limit is in force
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_announce_prints_only_the_url() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "genworker.sim", "--port", "0", "--announce"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip().startswith("http://127.0.0.1:")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_bad_flags_are_refused() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "genworker.sim", "--fail-500", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "fault rates" in out.stderr
