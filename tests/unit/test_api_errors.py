"""How provider answers become outcomes: pure rules, no network."""

from __future__ import annotations

import json
from email.utils import formatdate

import pytest
from genworker.api.errors import (
    RETRY_AFTER_CAP_S,
    Overloaded,
    classify,
    parse_duration,
    retry_after_s,
    scrub,
)
from genworker.model import OutcomeKind, PermanentError, RateLimited, TransientError, unstorable

KEY = "sk-test-SECRET123"
NOW = 1_700_000_000.0


def body(message: str, etype: str = "", code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": etype, "code": code}}).encode()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2.5", 2.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "s1", "1s junk"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    assert parse_duration(text) is None


def test_retry_after_prefers_milliseconds_then_seconds_then_date_then_reset() -> None:
    assert retry_after_s({"retry-after-ms": "1500", "Retry-After": "9"}, now=NOW) == 1.5
    assert retry_after_s({"Retry-After": "7"}, now=NOW) == 7
    date = formatdate(NOW + 12, usegmt=True)
    assert retry_after_s({"Retry-After": date}, now=NOW) == pytest.approx(12)
    assert retry_after_s({"x-ratelimit-reset-requests": "20ms"}, now=NOW) == 0.02


def test_retry_after_reset_headers_take_the_exhausted_budget() -> None:
    headers = {
        "x-ratelimit-reset-requests": "6m0s",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-tokens": "1s",
        "x-ratelimit-remaining-tokens": "500",
    }
    assert retry_after_s(headers, now=NOW, cap_s=1000) == 360
    del headers["x-ratelimit-remaining-requests"]
    assert retry_after_s(headers, now=NOW) == 1  # neither known exhausted: the sooner


def test_retry_after_is_capped_and_never_negative() -> None:
    assert retry_after_s({"Retry-After": "86400"}, now=NOW) == RETRY_AFTER_CAP_S
    past = formatdate(NOW - 30, usegmt=True)
    assert retry_after_s({"Retry-After": past}, now=NOW) == 0
    assert retry_after_s({"Retry-After": "tomorrow-ish"}, now=NOW) is None
    assert retry_after_s({"retry-after-ms": "NaN"}, now=NOW) is None
    assert retry_after_s({}, now=NOW) is None


def test_header_names_are_case_insensitive() -> None:
    assert retry_after_s({"RETRY-AFTER-MS": "250"}, now=NOW) == 0.25


@pytest.mark.parametrize(
    "echo",
    [
        f"Incorrect API key provided: {KEY}.",
        "Incorrect API key provided: sk-test-*******T123.",
        "key SECRET123 is revoked",
        "Authorization: Bearer abc.def.ghi rejected",
        "Incorrect API key provided: sk-proj-abcdefgh1234.",
    ],
)
def test_scrub_removes_the_key_whole_partial_or_masked(echo: str) -> None:
    out = scrub(echo, KEY)
    assert "SECRET" not in out
    assert "T123" not in out
    assert "abc.def" not in out
    assert "abcdefgh1234" not in out


def test_scrub_makes_one_short_line() -> None:
    out = scrub("line one\nline two " + "x" * 1000)
    assert "\n" not in out
    assert len(out) <= 240


def test_scrub_leaves_text_postgresql_can_store() -> None:
    out = scrub("refused\x00 because\x1b[31m \ud800 of policy")
    assert out == "refused because [31m ? of policy"
    assert unstorable(out) is None


@pytest.mark.parametrize(
    ("status", "payload", "cls", "alarm"),
    [
        (429, body("Rate limit reached", "requests", "rate_limit_exceeded"), RateLimited, None),
        (429, body("quota", "insufficient_quota", "insufficient_quota"), PermanentError,
         "insufficient_quota"),
        (401, body(f"Incorrect API key provided: {KEY}", "invalid_request_error"),
         PermanentError, "bad_api_key"),
        (403, body("Country not supported"), PermanentError, "bad_api_key"),
        (400, body("rejected by safety system", "invalid_request_error",
                   "content_policy_violation"), PermanentError, None),
        (404, body("model not found"), PermanentError, None),
        (422, body("unprocessable"), PermanentError, None),
        (500, body("server had an error", "server_error"), TransientError, None),
        (502, b"<html>bad gateway</html>", TransientError, None),
        (503, b"", TransientError, None),
        (504, body("timeout"), TransientError, None),
    ],
)  # fmt: skip
def test_classify(status: int, payload: bytes, cls: type, alarm: str | None) -> None:
    err = classify(status, {"retry-after-ms": "250"}, payload, KEY)
    assert type(err) is cls
    assert err.alarm == alarm
    assert err.reason.startswith(f"HTTP {status}")
    assert "SECRET" not in err.reason


def test_classify_keeps_the_providers_message_and_code() -> None:
    err = classify(400, {}, body("Your prompt was rejected.", "x", "content_policy_violation"))
    assert err.reason == "HTTP 400 content_policy_violation: Your prompt was rejected."
    assert err.outcome is OutcomeKind.DEAD


def test_a_429_without_headers_still_waits() -> None:
    err = classify(429, {}, body("slow down", "requests", "rate_limit_exceeded"))
    assert isinstance(err, RateLimited)
    assert err.retry_after_s == 1.0
    assert err.outcome is OutcomeKind.SNOOZE


@pytest.mark.parametrize(
    "key", [KEY, "sk-IncorrectHorseBatteryStaple42", "sk-proj-providedAPIkeyXY", "Inc"]
)
def test_scrub_masks_the_key_but_keeps_the_providers_words(key: str) -> None:
    out = scrub(f"Incorrect API key provided: {key}. You can find your API key here.", key)
    assert out.startswith("Incorrect API key provided: ")
    assert key not in out.replace("Incorrect", "")
    assert "You can find your API key here." in out


RATE_HEADERS = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}


@pytest.mark.parametrize(
    ("payload", "headers"),
    [
        (body("Engine overloaded", "server_error", "engine_overloaded"), {}),
        (body("The server is overloaded", "server_error"), RATE_HEADERS),  # OpenAI's headers
        (body("Busy", "", "server_overloaded"), {"Retry-After": "2"}),
        (body("The model is currently overloaded. Please try again later."), {}),
    ],
)
def test_a_429_about_the_providers_load_snoozes_as_overloaded(
    payload: bytes, headers: dict[str, str]
) -> None:
    err = classify(429, headers, payload)
    assert type(err) is Overloaded
    assert err.outcome is OutcomeKind.SNOOZE
    assert err.retry_after_s is not None


@pytest.mark.parametrize(
    ("payload", "headers"),
    [
        (body("Rate limit reached", "requests", "rate_limit_exceeded"), {}),
        (body("Slow down", "tokens"), {}),
        (body("Too many requests, the server is overloaded"), RATE_HEADERS),
        (b"", {}),  # says nothing either way: the safe side of a shared quota
    ],
)
def test_a_429_with_rate_limit_signals_is_a_rate_limit(
    payload: bytes, headers: dict[str, str]
) -> None:
    assert type(classify(429, headers, payload)) is RateLimited
