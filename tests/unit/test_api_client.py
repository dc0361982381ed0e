"""The image client against the real simulated API, and against a tiny fake provider
(labelled FAKE below) where a test needs exact headers or bodies the simulator never sends."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from genworker.api import openai
from genworker.api.errors import ApiTimeout
from genworker.api.openai import ImageHandler, generations_url, make_session
from genworker.config import Settings
from genworker.model import Job, JobError, PermanentError, RateLimited, TransientError
from genworker.sim.server import SimConfig, sim_of, start_sim, tiny_png

KEY = "sk-test-SECRET123"


def job(job_id: int = 41, prompt: Any = "a lighthouse at dawn", **params: Any) -> Job:
    return Job(job_id, 3, 1, 0, "image", {"prompt": prompt, **params}, 1)


def settings(url: str, out: Path, **changes: Any) -> Settings:
    base = {"api_url": url, "api_key": KEY, "output_dir": out, "request_timeout_s": 2.0}
    return Settings(**{**base, **changes})


async def call(s: Settings, j: Job | None = None) -> dict[str, Any]:
    handler = ImageHandler(s)
    async with make_session(s) as session:
        try:
            return await handler(j or job(), session)
        finally:
            await handler.close()


def run_against_sim(config: SimConfig, scenario: Callable[[str, Any], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        runner, port = await start_sim(config)
        try:
            return await scenario(f"http://127.0.0.1:{port}", sim_of(runner))
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.iterdir() if p.name.startswith(".gw-tmp")] if out.exists() else True


# ------------------------------------------------------------- real simulator


def test_b64_image_lands_on_disk_under_its_sha256(tmp_path: Path) -> None:
    async def scenario(url: str, sim: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return await call(settings(url, tmp_path)), sim.stats()

    result, stats = run_against_sim(SimConfig(latency_ms=1, api_key=KEY), scenario)
    data = Path(result["path"]).read_bytes()
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert Path(result["path"]).name == result["sha256"] + ".png"
    assert result["bytes"] == len(data)
    assert result["mime"] == "image/png"
    assert no_temp_files(tmp_path)
    assert stats["by_request_id"] == {"gw-41-3": 1}


FAULTS = [
    ("500", TransientError, "HTTP 500 server_error", None, (500, "http")),
    ("timeout", ApiTimeout, "no answer within", None, (None, "timeout")),
    ("reset", TransientError, "connection error", None, (None, "connection")),
    ("malformed", TransientError, "not valid JSON", None, (200, "answer")),
    ("content_type", TransientError, "text/html instead of JSON", None, (200, "answer")),
    ("400", PermanentError, "HTTP 400 content_policy_violation", None, (400, "http")),
    ("401", PermanentError, "HTTP 401 invalid_api_key", "bad_api_key", (401, "http")),
    ("quota", PermanentError, "HTTP 429 insufficient_quota", "insufficient_quota", (429, "http")),
    ("empty", TransientError, "no image", None, (200, "answer")),
]


@pytest.mark.parametrize(("fault", "cls", "reason", "alarm", "status_cause"), FAULTS)
def test_each_injected_fault_becomes_the_right_error(
    tmp_path: Path,
    fault: str,
    cls: type[JobError],
    reason: str,
    alarm: str | None,
    status_cause: tuple[int | None, str],
) -> None:
    config = SimConfig(latency_ms=1, jitter_ms=0, api_key=KEY, hang_s=30)
    setattr(config, f"fail_{fault}", 1.0)

    async def scenario(url: str, sim: Any) -> JobError:
        with pytest.raises(JobError) as caught:
            await call(settings(url, tmp_path, request_timeout_s=0.3))
        return caught.value

    err = run_against_sim(config, scenario)
    assert type(err) is cls
    assert reason in err.reason
    assert err.alarm == alarm
    assert (getattr(err, "status", None), getattr(err, "cause", None)) == status_cause
    assert "SECRET" not in err.reason
    assert no_temp_files(tmp_path)


def test_a_wrong_key_is_echoed_by_the_provider_but_never_by_us(tmp_path: Path) -> None:
    async def scenario(url: str, sim: Any) -> JobError:
        with pytest.raises(PermanentError) as caught:
            await call(settings(url, tmp_path))
        return caught.value

    err = run_against_sim(SimConfig(latency_ms=1, api_key="sk-the-right-one"), scenario)
    assert err.alarm == "bad_api_key"
    assert "Incorrect API key provided" in err.reason
    assert KEY not in err.reason
    assert "SECRET" not in err.reason


def test_the_sims_rate_limit_gives_a_snooze_with_its_wait(tmp_path: Path) -> None:
    async def scenario(url: str, sim: Any) -> JobError:
        s = settings(url, tmp_path)
        await call(s)
        with pytest.raises(RateLimited) as caught:
            await call(s, job(42))
        return caught.value

    err = run_against_sim(SimConfig(latency_ms=1, rps=1), scenario)
    assert err.retry_after_s is not None
    assert 0 < err.retry_after_s <= 1.0
    assert "rate_limit_exceeded" in err.reason


def test_url_results_are_kept_as_urls_or_fetched_and_stored(tmp_path: Path) -> None:
    async def scenario(url: str, sim: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
        # gpt-image-1 only answers b64_json: a url answer needs a dall-e model
        by_url = {"response_format": "url", "model": "dall-e-3"}
        plain = await call(settings(url, tmp_path, **by_url))
        here = url.removeprefix("http://")  # the sim serves its files on 127.0.0.1: allow it
        fetched = await call(settings(url, tmp_path, fetch_urls=True, fetch_allow=here, **by_url))
        return plain, fetched, url

    plain, fetched, url = run_against_sim(SimConfig(latency_ms=1), scenario)
    assert plain["url"].startswith(f"{url}/files/")
    assert set(fetched) == {"path", "bytes", "sha256", "mime"}
    assert hashlib.sha256(Path(fetched["path"]).read_bytes()).hexdigest() == fetched["sha256"]


def test_a_job_without_a_prompt_is_dead_before_any_call(tmp_path: Path) -> None:
    async def scenario(url: str, sim: Any) -> int:
        with pytest.raises(PermanentError, match="no prompt"):
            await call(settings(url, tmp_path), job(prompt=""))
        return int(sim.stats()["total"])

    assert run_against_sim(SimConfig(latency_ms=1), scenario) == 0


# ------------------------------------------------------------ FAKE provider

Responder = Callable[[web.Request], Awaitable[web.StreamResponse]]


def run_against_fake(
    responder: Responder, scenario: Callable[[str], Awaitable[Any]]
) -> tuple[Any, list[dict[str, Any]]]:
    """A FAKE provider answering every POST with `responder`; returns what it saw."""
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append({"headers": dict(request.headers), "body": await request.json()})
        return await responder(request)

    async def main() -> Any:
        app = web.Application()
        app.router.add_post("/v1/images/generations", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            return await scenario(f"http://127.0.0.1:{runner.addresses[0][1]}")
        finally:
            await runner.cleanup()

    return asyncio.run(main()), seen


def answer(status: int, body: Any = None, **headers: str) -> Responder:
    async def respond(request: web.Request) -> web.StreamResponse:
        if isinstance(body, bytes):
            return web.Response(status=status, body=body, headers=headers)
        return web.json_response(body, status=status, headers=headers)

    return respond


def failure(tmp_path: Path, responder: Responder) -> JobError:
    async def scenario(url: str) -> JobError:
        with pytest.raises(JobError) as caught:
            await call(settings(url, tmp_path))
        return caught.value

    return run_against_fake(responder, scenario)[0]


def err_body(message: str, etype: str = "", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": etype, "code": code}}


def test_the_request_has_the_openai_shape_and_our_headers(tmp_path: Path) -> None:
    png = tiny_png(b"x")
    ok = answer(200, {"data": [{"b64_json": base64.b64encode(png).decode()}]})

    async def scenario(url: str) -> dict[str, Any]:
        return await call(settings(url + "/v1/", tmp_path), job(7, size="1536x1024"))

    _, seen = run_against_fake(ok, scenario)
    assert seen[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert seen[0]["headers"]["X-Client-Request-Id"] == "gw-7-3"
    # gpt-image-1 refuses response_format (issue 13): the body is the model's contract
    assert seen[0]["body"] == {
        "model": "gpt-image-1",
        "prompt": "a lighthouse at dawn",
        "n": 1,
        "size": "1536x1024",
    }


def test_retry_after_as_an_http_date_is_honoured(tmp_path: Path) -> None:
    when = formatdate(time.time() + 20, usegmt=True)
    err = failure(
        tmp_path,
        answer(429, err_body("slow", "requests", "rate_limit_exceeded"), **{"Retry-After": when}),
    )
    assert isinstance(err, RateLimited)
    assert err.retry_after_s is not None
    assert 17 <= err.retry_after_s <= 20


def test_reset_headers_are_the_fallback_wait(tmp_path: Path) -> None:
    headers = {"x-ratelimit-reset-requests": "1m30s", "x-ratelimit-remaining-requests": "0"}
    err = failure(tmp_path, answer(429, err_body("slow", "", "rate_limit_exceeded"), **headers))
    assert isinstance(err, RateLimited)
    assert err.retry_after_s == 60  # capped


@pytest.mark.parametrize(
    ("status", "cls", "alarm"),
    [
        (403, PermanentError, "bad_api_key"),
        (404, PermanentError, None),
        (422, PermanentError, None),
        (502, TransientError, None),
        (503, TransientError, None),
        (504, TransientError, None),
    ],
)
def test_status_classes(tmp_path: Path, status: int, cls: type, alarm: str | None) -> None:
    err = failure(tmp_path, answer(status, err_body(f"echo {KEY} and sk-abcd****wxyz")))
    assert type(err) is cls
    assert err.alarm == alarm
    assert "SECRET" not in err.reason
    assert "abcd" not in err.reason


def test_an_oversized_answer_is_refused_without_buffering_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openai, "MAX_BODY_BYTES", 4096)

    async def streamed(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)  # chunked: no Content-Length to check up front
        for _ in range(10):
            await resp.write(b" " * 1024)
        await resp.write_eof()
        return resp

    err = failure(tmp_path, streamed)
    assert isinstance(err, TransientError)
    assert "too large" in err.reason
    err = failure(tmp_path, answer(200, b"x" * 8192, **{"Content-Type": "application/json"}))
    assert "too large" in err.reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"data": [{"b64_json": "not base64!!"}]}, "invalid base64"),
        ({"data": [{"b64_json": base64.b64encode(b"GIF but no").decode()}]}, "not PNG"),
        ({"data": [{"url": "ftp://example.invalid/x.png"}]}, "neither b64_json"),
        ({"data": "nope"}, "no image"),
        ([1, 2], "no image"),
    ],
)
def test_garbage_answers_fail_the_job(tmp_path: Path, payload: Any, reason: str) -> None:
    err = failure(tmp_path, answer(200, payload))
    assert isinstance(err, TransientError)
    assert reason in err.reason


def test_a_refused_connection_is_transient(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the call: nothing listens there

    async def scenario() -> JobError:
        with pytest.raises(TransientError) as caught:
            await call(settings(f"http://127.0.0.1:{port}", tmp_path))
        return caught.value

    assert "connection error" in asyncio.run(scenario()).reason


def test_session_has_the_configured_limits() -> None:
    async def scenario() -> tuple[int, aiohttp.ClientTimeout]:
        async with make_session(Settings(concurrency=7, connect_timeout_s=3)) as session:
            return session.connector.limit, session.timeout  # type: ignore[union-attr]

    limit, timeout = asyncio.run(scenario())
    assert limit == 7
    assert timeout.total == 180
    assert timeout.connect == 3


def test_generations_url_accepts_a_base_with_or_without_v1() -> None:
    assert generations_url("https://h/") == "https://h/v1/images/generations"
    assert generations_url("https://h/v1") == "https://h/v1/images/generations"
    assert generations_url("http://h:1/p") == "http://h:1/p/v1/images/generations"


class Bucket:
    """Stands in for the host's SharedTokenBucket: records what the handler tells it."""

    def __init__(self) -> None:
        self.cuts: list[float | None] = []

    async def acquire(self) -> None:
        return None

    def on_rate_limited(self, retry_after_s: float | None) -> None:
        self.cuts.append(retry_after_s)


@pytest.mark.parametrize(
    ("payload", "headers", "cuts"),
    [
        (err_body("The engine is currently overloaded", "server_error"), {}, 0),
        (
            err_body("Busy", "server_error", "server_overloaded"),
            {"x-ratelimit-limit-requests": "9"},
            0,
        ),
        (err_body("Rate limit reached", "requests", "rate_limit_exceeded"), {}, 1),
    ],
)
def test_only_a_rate_limit_cuts_the_hosts_rate_and_both_snooze_the_job(
    tmp_path: Path, payload: Any, headers: dict[str, str], cuts: int
) -> None:
    bucket = Bucket()

    async def scenario(url: str) -> JobError:
        s = settings(url, tmp_path)
        async with make_session(s) as session:
            with pytest.raises(RateLimited) as caught:
                await ImageHandler(s, bucket)(job(), session)  # type: ignore[arg-type]
        return caught.value

    err, _ = run_against_fake(answer(429, payload, **headers), scenario)
    assert err.outcome.value == "snooze"
    assert len(bucket.cuts) == cuts


def test_usage_is_kept_as_counts_only() -> None:
    from genworker.api.openai import usage_of

    assert usage_of(
        {
            "usage": {
                "input_tokens": 12,
                "output_tokens": 4160,
                "total_tokens": 4172,
                "input_tokens_details": {"text_tokens": 12},
            }
        }
    ) == {"usage": {"input_tokens": 12, "output_tokens": 4160}}
    assert usage_of({}) == {}
    assert usage_of({"usage": "lots"}) == {}
    assert usage_of({"usage": {"input_tokens": -1, "output_tokens": True}}) == {}
    assert usage_of({"usage": {"input_tokens": 2**40, "output_tokens": 7}}) == {
        "usage": {"output_tokens": 7}
    }
