"""How a provider's answer becomes a job outcome: classification, Retry-After, scrubbing.

Pure functions over a status, headers and a body, so every rule can be tested
without a network. The reasons they produce are short, one line, and never
contain the API key (providers echo keys, sometimes partly masked, in 401s).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from genworker.model import JobError, PermanentError, RateLimited, TransientError

RETRY_AFTER_CAP_S = 60.0  # one 429 never snoozes longer; the queue's snooze budget bounds the total
DEFAULT_RATE_LIMIT_WAIT_S = 1.0  # a 429 that names no wait
MAX_REASON_CHARS = 240

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # NUL cannot be stored; the rest break a line
_SK_TOKEN = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{3,}")
_BEARER = re.compile(r"(?i)\bbearer\s+\S+")
_MASKED = re.compile(r"\S*\*{3,}\S*")  # "abcd****wxyz": a masked key is still a key's shape
_WORDS = re.compile(r"[A-Za-z0-9_\-]{8,}")
_PLAIN_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+")  # "Incorrect", "provided", "API"
_LONG_PIECE = 16  # a piece this long is the key's even if it reads like a word
_SHORT_KEY = 6
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


class ApiTimeout(TransientError):
    """The provider did not answer in time (a TransientError the limiter counts apart)."""

    def __init__(self, reason: str, *, alarm: str | None = None) -> None:
        super().__init__(reason, alarm=alarm, cause="timeout")


def _key_piece(word: str, key: str) -> bool:
    """A long word that is a piece of the key, and not an ordinary word that happens to be
    in it: a provider's "Incorrect API key provided: sk-..." keeps its "Incorrect"."""
    return word in key and (len(word) >= _LONG_PIECE or not _PLAIN_WORD.fullmatch(word))


def _mask_key(line: str, key: str) -> str:
    if len(key) >= _SHORT_KEY:
        line = line.replace(key, "***")
    else:  # a very short key would shred ordinary words: only where it stands alone
        line = re.sub(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", "***", line)
    # a partial echo: a long word that is a piece of the key
    return _WORDS.sub(lambda m: "***" if _key_piece(m[0], key) else m[0], line)


class Overloaded(RateLimited):
    """A 429 about the provider's load, not our rate: the job snoozes, but the host's
    learned request rate stays (cutting it would slow every worker for nobody's quota)."""


_OVERLOAD_LABELS = frozenset(
    {"server_overloaded", "engine_overloaded", "overloaded", "server_error", "overloaded_error"}
)
_RATE_LABELS = frozenset({"rate_limit_exceeded", "requests", "tokens"})
_OVERLOAD_WORDS = re.compile(r"(?i)overload|over capacity|at capacity|too busy")


def _about_our_rate(headers: Mapping[str, str], message: str, etype: str, code: str) -> bool:
    """Whether a 429 is a rate limit on us. An explicit overload code or type says no (OpenAI
    sends x-ratelimit-* on every answer, so those headers cannot outrank it); a rate code,
    type or x-ratelimit-* header says yes; a bare 429 that talks of overload says no, and
    one that says nothing either way counts as a rate limit (the safe side of a quota)."""
    labels = {code, etype}
    if labels & _OVERLOAD_LABELS:
        return False
    if labels & _RATE_LABELS or any(k.lower().startswith("x-ratelimit-") for k in headers):
        return True
    return not _OVERLOAD_WORDS.search(message)


def scrub(text: str, key: str | None = None, *, max_chars: int = MAX_REASON_CHARS) -> str:
    """One short line of valid text (no control characters, no lone surrogate) with the
    key, any sk-... token, bearer token or masked key removed."""
    text = _CONTROL.sub(" ", text).encode("utf-8", "replace").decode()
    line = " ".join(text.split())
    if key:
        line = _mask_key(line, key)
    line = _SK_TOKEN.sub("sk-***", line)
    line = _BEARER.sub("Bearer ***", line)
    line = _MASKED.sub("***", line)
    if len(line) > max_chars:
        line = line[: max_chars - 1] + "…"
    return line


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration, as x-ratelimit-reset-* send it: "1s", "6m0s", "20ms"."""
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)  # some providers send plain seconds
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        value = float(m[1])
        total += {"ms": value / 1000, "s": value, "m": value * 60, "h": value * 3600}[m[2]]
        pos = m.end()
    return total if pos == len(text) and pos > 0 else None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # aiohttp's CIMultiDict is case-insensitive; a plain dict in tests may not be
    value = headers.get(name)
    if value is None:
        lowered = {k.lower(): v for k, v in headers.items()}
        value = lowered.get(name.lower())
    return value


def _retry_after_header(value: str, now: float) -> float | None:
    """Retry-After: delta-seconds or an HTTP-date."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return when.timestamp() - now


def _reset_headers(headers: Mapping[str, str]) -> float | None:
    """x-ratelimit-reset-requests/-tokens: the exhausted budget's reset, else the sooner one."""
    found: list[tuple[bool, float]] = []
    for budget in ("requests", "tokens"):
        raw = _header(headers, f"x-ratelimit-reset-{budget}")
        seconds = parse_duration(raw) if raw else None
        if seconds is not None:
            spent = (_header(headers, f"x-ratelimit-remaining-{budget}") or "").strip() == "0"
            found.append((spent, seconds))
    if not found:
        return None
    exhausted = [s for spent, s in found if spent]
    return max(exhausted) if exhausted else min(s for _, s in found)


def retry_after_s(
    headers: Mapping[str, str], *, now: float | None = None, cap_s: float = RETRY_AFTER_CAP_S
) -> float | None:
    """The provider's wait in seconds, capped: retry-after-ms, Retry-After, x-ratelimit-reset-*."""
    now = time.time() if now is None else now
    seconds: float | None = None
    raw_ms = _header(headers, "retry-after-ms")
    if raw_ms:
        try:
            seconds = float(raw_ms) / 1000
        except ValueError:
            seconds = None
    if seconds is None and (raw := _header(headers, "retry-after")):
        seconds = _retry_after_header(raw.strip(), now)
    if seconds is None:
        seconds = _reset_headers(headers)
    if seconds is None or seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), cap_s)


def error_fields(body: bytes) -> tuple[str, str, str]:
    """(message, type, code) of an OpenAI-style error body; empty strings when absent."""
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "", "", ""
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, str):
        return err, "", ""
    if not isinstance(err, dict):
        return "", "", ""

    def text(name: str) -> str:
        value = err.get(name)
        return value if isinstance(value, str) else ""

    return text("message"), text("type"), text("code")


def classify(
    status: int, headers: Mapping[str, str], body: bytes, key: str | None = None
) -> JobError:
    """The JobError for a non-2xx answer, with a short scrubbed reason."""
    message, etype, code = error_fields(body)
    label = code or etype
    reason = scrub(f"HTTP {status}{' ' + label if label else ''}: {message or 'no message'}", key)
    if status == 429:
        if "insufficient_quota" in (code, etype):
            return PermanentError(reason, alarm="insufficient_quota", status=status, cause="http")
        wait = retry_after_s(headers)
        if wait is None:
            wait = DEFAULT_RATE_LIMIT_WAIT_S
        limited = RateLimited if _about_our_rate(headers, message, etype, code) else Overloaded
        return limited(reason, retry_after_s=wait, status=status, cause="http")
    if status in (401, 403):
        return PermanentError(reason, alarm="bad_api_key", status=status, cause="http")
    if status in (408, 409) or status >= 500:
        # 408/409 are retried by OpenAI's own client too: the request may succeed next time
        return TransientError(
            reason, retry_after_s=retry_after_s(headers), status=status, cause="http"
        )
    return PermanentError(reason, status=status, cause="http")
