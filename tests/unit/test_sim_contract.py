"""The simulator keeps the provider's contract (issue 13): it refuses what the real API
refuses, with OpenAI's error body, and answers in each model's own form. A client that
drifts from genworker.contract fails here, not in production."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import test_contract
from genworker.api.openai import ImageHandler, make_session
from genworker.config import Settings
from genworker.contract import MODELS, refusal, request_body
from genworker.model import Job
from genworker.sim.server import SimConfig, config_from_args, parser, sim_of, start_sim
from test_api_sim import GEN, png_ok, with_sim

PROMPT = "a lighthouse at dawn"
STRICT = SimConfig(latency_ms=0, jitter_ms=0)


async def answer(http: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(GEN, json=body) as resp:
        return resp.status, await resp.json()


def answers(config: SimConfig, bodies: list[dict[str, Any]]) -> tuple[list[Any], Any]:
    """Each body's (status, JSON answer) from one simulator, and its /stats after."""

    async def scenario(http: aiohttp.ClientSession) -> tuple[list[Any], Any]:
        got = [await answer(http, body) for body in bodies]
        async with http.get("/stats") as resp:
            return got, await resp.json()

    return with_sim(config, scenario)


def sent(model: str, response_format: str = "b64_json", **params: Any) -> dict[str, Any]:
    """What our client sends for a job of `model` (the contract's request body)."""
    return request_body(
        model, PROMPT, params, default_size="1024x1024", response_format=response_format
    )


# ---------------------------------------------------------------- valid requests


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_gpt_image_1_always_answers_b64_with_token_usage(response_format: str) -> None:
    bodies = [
        sent("gpt-image-1", response_format),  # quality auto: as medium
        sent("gpt-image-1", response_format, quality="high"),
        sent("gpt-image-1", response_format, quality="low", size="1536x1024"),
    ]
    got, stats = answers(STRICT, bodies)
    assert [status for status, _ in got] == [200, 200, 200]
    words = len(PROMPT.split())
    for (_, doc), image_tokens in zip(got, (1056, 4160, 408), strict=True):
        (item,) = doc["data"]
        assert set(item) == {"b64_json"}
        assert png_ok(base64.b64decode(item["b64_json"]))
        assert doc["usage"] == {
            "input_tokens": words,
            "output_tokens": image_tokens,
            "total_tokens": words + image_tokens,
            "input_tokens_details": {"text_tokens": words, "image_tokens": 0},
        }
    assert stats["refused"] == {}


@pytest.mark.parametrize("model", ["dall-e-3", "dall-e-2"])
def test_dall_e_answers_a_url_by_default_or_b64_when_asked(model: str) -> None:
    async def scenario(http: aiohttp.ClientSession) -> tuple[Any, Any, bytes]:
        by_default = await answer(http, {"model": model, "prompt": PROMPT})
        as_b64 = await answer(http, sent(model, "b64_json"))
        async with http.get(by_default[1]["data"][0]["url"]) as resp:
            return by_default, as_b64, await resp.read()

    (status, doc), (b64_status, b64_doc), served = with_sim(STRICT, scenario)
    assert (status, b64_status) == (200, 200)
    assert png_ok(served)
    assert "b64_json" not in doc["data"][0]
    assert "url" not in b64_doc["data"][0]
    assert png_ok(base64.b64decode(b64_doc["data"][0]["b64_json"]))
    assert "usage" not in doc
    assert "usage" not in b64_doc
    if model == "dall-e-3":
        assert b64_doc["data"][0]["revised_prompt"] == PROMPT


def test_a_model_it_does_not_know_gets_b64_for_the_common_fields() -> None:
    got, _ = answers(STRICT, [sent("flux-pro"), {"prompt": PROMPT}])
    for status, doc in got:
        assert status == 200
        assert set(doc["data"][0]) == {"b64_json"}
        assert "usage" not in doc


# ---------------------------------------------------------------- refusals


FORBIDDEN = [
    (sent("gpt-image-1") | {"response_format": "b64_json"}, "response_format", "unknown_parameter"),
    (sent("gpt-image-1") | {"response_format": "url"}, "response_format", "unknown_parameter"),
    (sent("gpt-image-1") | {"style": "vivid"}, "style", "unknown_parameter"),
    (sent("gpt-image-1") | {"size": "1792x1024"}, "size", "invalid_value"),
    (sent("gpt-image-1") | {"size": "512x512"}, "size", "invalid_value"),
    (sent("gpt-image-1", quality="hd"), "quality", "invalid_value"),
    (sent("gpt-image-1", output_compression=101), "output_compression", "invalid_value"),
    (sent("gpt-image-1") | {"prompt": "x" * 32_001}, "prompt", "string_above_max_length"),
    (sent("dall-e-3") | {"background": "transparent"}, "background", "unknown_parameter"),
    (sent("dall-e-3") | {"n": 2}, "n", "invalid_value"),
    (sent("dall-e-3") | {"size": "512x512"}, "size", "invalid_value"),
    (sent("dall-e-3", style="cartoon"), "style", "invalid_value"),
    (sent("dall-e-3") | {"prompt": "x" * 4_001}, "prompt", "string_above_max_length"),
    (sent("dall-e-2") | {"style": "vivid"}, "style", "unknown_parameter"),
    (sent("dall-e-2") | {"background": "opaque"}, "background", "unknown_parameter"),
    (sent("dall-e-2") | {"size": "1024x1792"}, "size", "invalid_value"),
    (sent("dall-e-2") | {"n": 11}, "n", "invalid_value"),
    (sent("dall-e-2") | {"prompt": "x" * 1_001}, "prompt", "string_above_max_length"),
    (sent("dall-e-2", "jpeg"), "response_format", "invalid_value"),
    (sent("flux-pro") | {"response_format": "url"}, "response_format", "unknown_parameter"),
    ({"model": "dall-e-3", "prompt": ""}, "prompt", "missing_required_parameter"),
]


def test_each_forbidden_field_is_refused_with_the_real_error_body() -> None:
    got, stats = answers(STRICT, [body for body, _, _ in FORBIDDEN])
    codes: dict[str, int] = {}
    for (status, doc), (body, param, code) in zip(got, FORBIDDEN, strict=True):
        assert status == 400, body
        error = doc["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error",
            param,
            code,
        ), body
        assert "data" not in doc
        codes[code] = codes.get(code, 0) + 1
    assert stats["refused"] == codes
    assert stats["by_status"] == {"400": len(FORBIDDEN)}


def test_issue_13s_refusal_word_for_word() -> None:
    body = {"model": "gpt-image-1", "prompt": PROMPT, "response_format": "b64_json"}
    [(status, doc)], _ = answers(STRICT, [body])
    assert status == 400
    assert doc["error"] == {
        "message": "Unknown parameter: 'response_format'.",
        "type": "invalid_request_error",
        "param": "response_format",
        "code": "unknown_parameter",
    }


def _contract_cases() -> list[dict[str, Any]]:
    # the parametrised list of test_contract.py, read from its mark so the two stay one list
    mark = test_contract.test_the_provider_refuses_each_forbidden_field.pytestmark[0]
    return [{"prompt": "a lighthouse", **case[0]} for case in mark.args[1]]


def test_the_sim_refuses_exactly_as_the_contract_does() -> None:
    bodies = _contract_cases()
    bodies += [{**body} for body, _, _ in FORBIDDEN]
    bodies += [sent(model, rf) for model in MODELS for rf in ("b64_json", "url")]
    got, _ = answers(STRICT, bodies)
    for (status, doc), body in zip(got, bodies, strict=True):
        expected = refusal(body)
        if expected is None:
            assert status == 200, (body, doc)
        else:
            assert (status, doc["error"]) == (400, expected.body()["error"]), body


def test_n_above_one_is_refused_by_the_simulator_even_where_the_model_takes_it() -> None:
    body = sent("gpt-image-1") | {"n": 2}
    assert refusal(body) is None  # the real API would make two
    [(status, doc)], stats = answers(STRICT, [body])
    assert status == 400
    assert (doc["error"]["param"], doc["error"]["code"]) == ("n", "invalid_value")
    assert "simulator makes one image per request" in doc["error"]["message"]
    assert stats["refused"] == {"invalid_value": 1}


# ---------------------------------------------------------------- lenient, and the client


def test_lenient_is_the_simulator_before_the_contract() -> None:
    lenient = SimConfig(latency_ms=0, jitter_ms=0, lenient=True)
    bodies = [
        {"model": "gpt-image-1", "prompt": PROMPT, "response_format": "url", "style": "x"},
        {"model": "dall-e-3", "prompt": PROMPT, "background": "transparent", "size": "64x64"},
        {"model": "gpt-image-1", "prompt": PROMPT, "n": 2},
    ]
    got, stats = answers(lenient, bodies)
    assert [status for status, _ in got] == [200, 200, 400]
    assert set(got[0][1]["data"][0]) == {"url"}
    assert set(got[1][1]["data"][0]) == {"b64_json"}
    assert "usage" not in got[0][1]
    assert stats["refused"] == {"invalid_value": 1}


def test_strict_is_the_default_and_lenient_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert SimConfig().lenient is False
    assert config_from_args(parser().parse_args([])).lenient is False
    assert config_from_args(parser().parse_args(["--lenient"])).lenient is True
    monkeypatch.setenv("GENWORKER_SIM_LENIENT", "1")
    assert config_from_args(parser().parse_args([])).lenient is True


@pytest.mark.parametrize("model", [*MODELS, "flux-pro"])
@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_our_client_is_never_refused(model: str, response_format: str, tmp_path: Path) -> None:
    job = Job(1, 1, 1, 0, "image", {"prompt": PROMPT}, 1)

    async def scenario() -> tuple[dict[str, Any], Any]:
        runner, port = await start_sim(STRICT)
        try:
            settings = Settings(
                api_url=f"http://127.0.0.1:{port}",
                model=model,
                response_format=response_format,
                output_dir=tmp_path,
                request_timeout_s=5.0,
            )
            async with make_session(settings) as session:
                result = await ImageHandler(settings)(job, session)
            return result, sim_of(runner).stats()
        finally:
            await runner.cleanup()

    result, stats = asyncio.run(scenario())
    assert stats["refused"] == {}
    takes_url = model in MODELS and bool(MODELS[model].response_formats)
    by_url = response_format == "url" and takes_url
    reported = {"usage"} if model in MODELS and MODELS[model].usage else set()
    assert set(result) == ({"url"} if by_url else {"path", "bytes", "sha256", "mime"}) | reported
