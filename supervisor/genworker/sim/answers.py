"""What the simulator answers: images, OpenAI-shaped errors, and the injected faults."""

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


async def parse_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return error(
            400, "We could not parse the JSON body of your request.", "invalid_request_error", None
        )
    if not isinstance(body, dict):
        return error(400, "The request body must be a JSON object.", "invalid_request_error", None)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return error(400, "prompt is required.", "invalid_request_error", "invalid_value")
    if body.get("n", 1) != 1:
        return error(400, "The simulator only makes n=1.", "invalid_request_error", "invalid_value")
    if not _SIZE.match(str(body.get("size", "1024x1024"))):
        return error(
            400, f"Invalid size: {body.get('size')!r}.", "invalid_request_error", "invalid_value"
        )
    if body.get("response_format", "b64_json") not in ("b64_json", "url"):
        return error(400, "response_format must be b64_json or url.", "invalid_request_error", None)
    return body


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
