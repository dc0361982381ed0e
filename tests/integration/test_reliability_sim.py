"""The simulated API's counters the reliability audit relies on: injected 429s carry the
wait they ask for, images are counted per request id apart from 200s that are not images,
and the most requests held at once is kept (a hung one until its client leaves)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from genworker.sim.server import SimConfig, start_sim

GEN = "/v1/images/generations"


async def _scenario(config: SimConfig, calls: int, concurrent: bool) -> tuple[list[Any], Any]:
    runner, port = await start_sim(config)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:

            async def call(i: int) -> tuple[int, str | None]:
                headers = {"X-Client-Request-Id": f"gw-{i}-1"}
                async with http.post(GEN, json={"prompt": "a kite"}, headers=headers) as r:
                    await r.read()
                    return r.status, r.headers.get("retry-after-ms")

            if concurrent:
                answers = list(await asyncio.gather(*(call(i) for i in range(calls))))
            else:
                answers = [await call(i) for i in range(calls)]
            async with http.get("/stats") as r:
                return answers, await r.json()
    finally:
        await runner.cleanup()


def test_injected_429s_ask_for_their_wait_and_are_counted_as_faults() -> None:
    config = SimConfig(latency_ms=0, jitter_ms=0, fail_429=0.5, fault_retry_after_ms=250, seed=4)
    answers, stats = asyncio.run(_scenario(config, 40, concurrent=False))
    limited = [a for a in answers if a[0] == 429]
    assert 5 < len(limited) < 35
    assert {ms for _, ms in limited} == {"250"}
    assert stats["by_fault"] == {"429": len(limited)}
    assert stats["by_status"] == {"200": 40 - len(limited), "429": len(limited)}


def test_images_are_counted_per_request_id_and_other_200s_are_not() -> None:
    config = SimConfig(latency_ms=0, jitter_ms=0, fail_malformed=0.3, fail_empty=0.2, seed=5)
    answers, stats = asyncio.run(_scenario(config, 40, concurrent=False))
    assert {a[0] for a in answers} == {200}  # every answer is a 200 ...
    images = stats["images_by_request_id"]
    faulted = stats["by_fault"]["malformed"] + stats["by_fault"]["empty"]
    assert len(images) == 40 - faulted > 0  # ... but only these carried an image
    assert set(images.values()) == {1}
    assert set(images) <= set(stats["by_request_id"])


def test_the_most_requests_held_at_once_is_kept() -> None:
    answers, stats = asyncio.run(_scenario(SimConfig(latency_ms=300, jitter_ms=0), 12, True))
    assert [a[0] for a in answers] == [200] * 12
    assert stats["max_inflight"] == 12
    assert stats["inflight"] == 0
    answers, stats = asyncio.run(_scenario(SimConfig(latency_ms=0, jitter_ms=0), 12, False))
    assert stats["max_inflight"] == 1  # one after the other
