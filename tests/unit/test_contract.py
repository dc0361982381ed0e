"""The provider contract per model: what a worker sends, and what the provider refuses
(with OpenAI's error shape). The simulator and submit-time checks read the same table."""

from __future__ import annotations

from typing import Any

import pytest
from contract_cases import REFUSED_OPTIONS
from genworker.contract import MODELS, option_problem, refusal, request_body


def body(model: str, **params: Any) -> dict[str, Any]:
    return request_body(
        model, "a lighthouse", params, default_size="1024x1024", response_format="b64_json"
    )


def test_gpt_image_1_gets_no_response_format_and_no_style() -> None:
    sent = body(
        "gpt-image-1",
        quality="high",
        background="transparent",
        output_format="webp",
        output_compression=80,
        moderation="low",
        style="vivid",
    )
    assert sent == {
        "model": "gpt-image-1",
        "prompt": "a lighthouse",
        "n": 1,
        "size": "1024x1024",
        "quality": "high",
        "background": "transparent",
        "output_format": "webp",
        "output_compression": 80,
        "moderation": "low",
    }
    assert refusal(sent) is None


def test_dall_e_3_gets_its_own_options_and_a_response_format() -> None:
    sent = body("dall-e-3", size="1792x1024", quality="hd", style="natural", background="x")
    assert sent == {
        "model": "dall-e-3",
        "prompt": "a lighthouse",
        "n": 1,
        "size": "1792x1024",
        "quality": "hd",
        "style": "natural",
        "response_format": "b64_json",
    }
    assert refusal(sent) is None


def test_dall_e_2_gets_the_common_fields_and_a_response_format() -> None:
    sent = body("dall-e-2", size="512x512", style="vivid")
    assert sent == {
        "model": "dall-e-2",
        "prompt": "a lighthouse",
        "n": 1,
        "size": "512x512",
        "response_format": "b64_json",
    }
    assert refusal(sent) is None


def test_an_unknown_model_gets_only_the_common_fields() -> None:
    sent = body("flux-pro", quality="high", style="vivid")
    assert sent == {"model": "flux-pro", "prompt": "a lighthouse", "n": 1, "size": "1024x1024"}
    assert refusal(sent) is None
    assert refusal({**sent, "response_format": "url"}) is not None


def test_a_default_size_the_model_does_not_take_is_left_out() -> None:
    sent = request_body("dall-e-2", "p", {}, default_size="1536x1024", response_format="url")
    assert "size" not in sent
    assert refusal(sent) is None


@pytest.mark.parametrize(
    ("sent", "param", "code"),
    [
        (
            {"model": "gpt-image-1", "response_format": "b64_json"},
            "response_format",
            "unknown_parameter",
        ),
        ({"model": "gpt-image-1", "style": "vivid"}, "style", "unknown_parameter"),
        ({"model": "gpt-image-1", "size": "1792x1024"}, "size", "invalid_value"),
        ({"model": "gpt-image-1", "quality": "hd"}, "quality", "invalid_value"),
        (
            {"model": "gpt-image-1", "output_compression": 101},
            "output_compression",
            "invalid_value",
        ),
        ({"model": "gpt-image-1", "n": 11}, "n", "invalid_value"),
        ({"model": "gpt-image-1", "prompt": "x" * 32_001}, "prompt", "string_above_max_length"),
        ({"model": "dall-e-3", "n": 2}, "n", "invalid_value"),
        ({"model": "dall-e-3", "size": "512x512"}, "size", "invalid_value"),
        ({"model": "dall-e-3", "quality": "high"}, "quality", "invalid_value"),
        ({"model": "dall-e-3", "background": "transparent"}, "background", "unknown_parameter"),
        ({"model": "dall-e-3", "prompt": "x" * 4_001}, "prompt", "string_above_max_length"),
        ({"model": "dall-e-2", "size": "1024x1792"}, "size", "invalid_value"),
        ({"model": "dall-e-2", "style": "vivid"}, "style", "unknown_parameter"),
        ({"model": "dall-e-2", "prompt": "x" * 1_001}, "prompt", "string_above_max_length"),
        ({"model": "dall-e-2", "response_format": "png"}, "response_format", "invalid_value"),
        ({"model": "flux-pro", "quality": "high"}, "quality", "unknown_parameter"),
    ],
)
def test_the_provider_refuses_each_forbidden_field(
    sent: dict[str, Any], param: str, code: str
) -> None:
    got = refusal({"prompt": "a lighthouse", **sent})
    assert got is not None
    assert (got.param, got.code) == (param, code)
    error = got.body()["error"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_the_error_names_the_parameter_as_the_real_api_does() -> None:
    got = refusal({"model": "gpt-image-1", "prompt": "p", "response_format": "url"})
    assert got is not None
    assert got.message == "Unknown parameter: 'response_format'."


@pytest.mark.parametrize(("model", "params", "words"), REFUSED_OPTIONS)
def test_options_a_model_does_not_take_are_named_at_submit(
    model: str, params: dict[str, Any], words: str
) -> None:
    problem = option_problem(model, params)
    assert problem is not None
    assert words in problem


def test_options_a_model_takes_pass() -> None:
    assert option_problem("gpt-image-1", {"quality": "low", "size": "auto"}) is None
    assert option_problem("flux-pro", {"size": "777x333"}) is None  # unknown model: its business


def test_every_model_row_is_json_ready() -> None:
    for model in MODELS.values():
        row = model.as_row()
        assert row["name"] == model.name
        assert all(isinstance(v, (list, dict)) for v in row["options"].values())
