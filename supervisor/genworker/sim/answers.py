"""What the simulator answers: the request check (the provider's contract, as the real API
refuses), images shaped per model, OpenAI-shaped errors, and the injected faults."""

from __future__ import annotations

import hashlib
import math
import re
import socket
import struct
import time
import zlib
from typing import Any

from aiohttp import web

from genworker.contract import MODELS, ModelContract, Refusal, refusal
from genworker.sim.state import SimApi

_SIZE = re.compile(r"^\d{2,5}x\d{2,5}$")


def tiny_png(seed: bytes, px: int = 8) -> bytes:
    """A valid px x px RGB PNG whose pixels come from sha256(seed): distinct per seed."""
    stream = hashlib.sha256(seed).digest()
    while len(stream) < px * px * 3:
        stream += hashlib.sha256(stream).digest()
    rows = b"".join(b"\x00" + stream[y * px * 3 : (y + 1) * px * 3] for y in range(px))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", struct.pack(">IIBBBBB", px, px, 8, 2, 0, 0, 0)),
            chunk(b"tEXt", b"Comment\x00simulated by genworker sim-api"),
            chunk(b"IDAT", zlib.compress(rows)),
            chunk(b"IEND", b""),
        ]
    )


def error(status: int, message: str, etype: str, code: str | None, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": etype, "code": code}, "simulated": True}
    return web.json_response(body, status=status, headers=headers)


def check_key(sim: SimApi, request: web.Request) -> web.Response | None:
    key = sim.config.api_key
    if key is None:
        return None
    auth = request.headers.get("Authorization", "")
    if auth == f"Bearer {key}":
        return None
    given = auth.removeprefix("Bearer ").strip() or "(none)"
    return error(
        401, f"Incorrect API key provided: {given}.", "invalid_request_error", "invalid_api_key"
    )


def too_many(retry_s: float, rps: float) -> web.Response:
    ms = max(1, math.ceil(retry_s * 1000))
    return error(
        429,
        f"Rate limit reached (simulated limit: {rps:g} requests/s). Try again in {ms}ms.",
        "requests",
        "rate_limit_exceeded",
        **{
            "retry-after-ms": str(ms),
            "Retry-After": str(math.ceil(retry_s)),
            "x-ratelimit-limit-requests": f"{rps:g}",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": f"{ms}ms",
        },
    )


async def read_body(request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the 400 for a body that is not one."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return error(
            400, "We could not parse the JSON body of your request.", "invalid_request_error", None
        )
    if not isinstance(body, dict):
        return error(400, "The request body must be a JSON object.", "invalid_request_error", None)
    return body


def check_body(body: dict[str, Any], lenient: bool) -> Refusal | None:
    """Why the simulator refuses this body: the provider's contract, then its own n=1."""
    if lenient:
        return _lenient_check(body)
    found = refusal(body)
    if found is not None:
        return found
    n = body.get("n", 1)
    if n != 1:
        # the model takes it, the simulator does not make it: a refusal, never a short answer
        return Refusal(
            f"The simulator makes one image per request: n={n} is valid for this model "
            "but not simulated; send n=1.",
            "n",
            "invalid_value",
        )
    return None


def _lenient_check(body: dict[str, Any]) -> Refusal | None:
    """The simulator before the contract (issue 13): any model, any size WxH, any field."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return Refusal("prompt is required.", "prompt", "invalid_value")
    if body.get("n", 1) != 1:
        return Refusal("The simulator only makes n=1.", "n", "invalid_value")
    if not _SIZE.match(str(body.get("size", "1024x1024"))):
        return Refusal(f"Invalid size: {body.get('size')!r}.", "size", "invalid_value")
    if body.get("response_format", "b64_json") not in ("b64_json", "url"):
        return Refusal(
            "response_format must be b64_json or url.", "response_format", "invalid_value"
        )
    return None


def refusal_answer(why: Refusal) -> web.Response:
    return web.json_response({**why.body(), "simulated": True}, status=400)


def _model(body: dict[str, Any], lenient: bool) -> ModelContract | None:
    return None if lenient else MODELS.get(str(body.get("model")))


def answer_form(body: dict[str, Any], lenient: bool) -> str:
    """b64_json or url: gpt-image-1 only answers b64_json, the dall-e models default to url
    as the real API does; an unknown model (or --lenient) answers b64_json unless asked."""
    model = _model(body, lenient)
    if model is None:
        return str(body.get("response_format", "b64_json"))
    if not model.response_formats:
        return "b64_json"
    return str(body.get("response_format", "url"))


# gpt-image-1's image tokens by quality, for a square and for an oblong image
_OUTPUT_TOKENS = {"low": (272, 408), "medium": (1056, 1584), "high": (4160, 6240)}


def answer_doc(body: dict[str, Any], item: dict[str, Any], lenient: bool) -> dict[str, Any]:
    """The JSON answer around one image `item`, shaped as the body's model answers."""
    model = _model(body, lenient)
    if model is not None and model.name == "dall-e-3":
        item = {**item, "revised_prompt": body["prompt"]}  # dall-e-3 rewrites the prompt
    doc: dict[str, Any] = {"created": int(time.time()), "data": [item], "simulated": True}
    if model is not None and model.usage:
        quality = body.get("quality", "auto")
        square = body.get("size", "auto") in ("auto", "1024x1024")
        text_tokens = max(1, len(body["prompt"].split()))  # about a token a word
        image_tokens = _OUTPUT_TOKENS.get(quality, _OUTPUT_TOKENS["medium"])[0 if square else 1]
        doc["usage"] = {
            "input_tokens": text_tokens,
            "output_tokens": image_tokens,
            "total_tokens": text_tokens + image_tokens,
            "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
        }
    return doc


async def fault_answer(
    name: str, sim: SimApi, request: web.Request, key: str
) -> web.StreamResponse:
    """The response for an injected fault (after the latency)."""
    if name == "500":
        return error(
            500, "The server had an error while processing your request.", "server_error", None
        )
    if name == "400":
        return error(
            400,
            "Your request was rejected as a result of our safety system.",
            "invalid_request_error",
            "content_policy_violation",
        )
    if name == "401":
        return error(
            401, f"Incorrect API key provided: {key}.", "invalid_request_error", "invalid_api_key"
        )
    if name == "quota":
        return error(
            429, "You exceeded your current quota.", "insufficient_quota", "insufficient_quota"
        )
    if name == "malformed":
        return web.Response(
            body=b'{"created": 1, "data": [{"b64_json": "iVBO', content_type="application/json"
        )
    if name == "content_type":
        return web.Response(
            text="<html><body>Bad gateway (simulated)</body></html>", content_type="text/html"
        )
    if name == "empty":
        return web.json_response({"created": int(time.time()), "data": [], "simulated": True})
    if name == "429":
        ms = max(1, math.ceil(sim.config.fault_retry_after_ms))
        return error(
            429,
            f"Rate limit reached (simulated fault). Try again in {ms}ms.",
            "requests",
            "rate_limit_exceeded",
            **{"retry-after-ms": str(ms), "Retry-After": str(math.ceil(ms / 1000))},
        )
    raise AssertionError(name)


def reset_connection(request: web.Request) -> web.Response:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed proxy would."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # aiohttp finds the transport gone when it writes this, and drops it quietly
    return web.Response(status=500)
