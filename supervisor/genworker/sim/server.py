"""The simulated image API: a real aiohttp server speaking OpenAI's /v1/images/generations.

For demos, tests and benchmarks. Every response says it is simulated (header
`X-Genworker-Simulator: 1`, and `"simulated": true` in JSON bodies). It has a
latency (mean +- jitter), its own rate limit (a sliding one-second window over
the requests it accepted; past it a 429 with Retry-After and retry-after-ms),
and faults injected at given rates. Faults and latencies are drawn from one
`random.Random(seed)` in arrival order, so a run with the same order of
requests sees the same faults. Every request is counted, by status and by
`X-Client-Request-Id`, at GET /stats, with the images served per request id and
the most requests it ever held at once.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import math
import os
import random
import re
import signal
import socket
import struct
import time
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Any

from aiohttp import web

SIM_HEADER = "X-Genworker-Simulator"
# New faults go last: the draw walks this order, so old seeds keep their faults.
FAULTS = (
    "500",
    "timeout",
    "reset",
    "malformed",
    "content_type",
    "400",
    "401",
    "quota",
    "empty",
    "429",
)
_SIZE = re.compile(r"^\d{2,5}x\d{2,5}$")


@dataclass
class SimConfig:
    latency_ms: float = 50.0
    jitter_ms: float = 10.0
    rps: float | None = None  # the sim's own rate limit (None: none)
    fail_500: float = 0.0
    fail_timeout: float = 0.0  # hold the request for hang_s (past the client's timeout)
    fail_reset: float = 0.0  # close the connection with a TCP reset
    fail_malformed: float = 0.0  # 200 with truncated JSON
    fail_content_type: float = 0.0  # 200 with an HTML page
    fail_400: float = 0.0  # content policy refusal
    fail_401: float = 0.0  # invalid key (echoing the key sent, as providers do)
    fail_quota: float = 0.0  # 429 insufficient_quota
    fail_empty: float = 0.0  # 200 with "data": []
    fail_429: float = 0.0  # 429 rate_limit_exceeded with Retry-After, whatever the rate
    fault_retry_after_ms: float = 100.0  # the wait an injected 429 asks for
    hang_s: float = 3600.0
    api_key: str | None = None  # when set, requests must carry "Bearer <key>"
    seed: int = 1
    image_px: int = 8
    max_files: int = 10_000  # url results kept for GET /files/<name>

    def fault_rates(self) -> list[tuple[str, float]]:
        return [(name, float(getattr(self, f"fail_{name}"))) for name in FAULTS]


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


def _error(status: int, message: str, etype: str, code: str | None, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": etype, "code": code}, "simulated": True}
    return web.json_response(body, status=status, headers=headers)


TIMELINE_MAX = 20_000  # requests kept in the stats' timeline (bounded memory)


class SimApi:
    """The server's state: config, random stream, rate window, stored files, counters."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.window: collections.deque[float] = collections.deque()
        self.files: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.seq = 0
        self.inflight = 0
        self.reset_stats()

    def reset_stats(self) -> None:
        self.by_status: collections.Counter[str] = collections.Counter()
        self.by_request_id: collections.Counter[str] = collections.Counter()
        self.by_fault: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque[float] = collections.deque()  # arrivals in the last 1 s
        self.max_per_s = 0  # most arrivals (any status) seen in one sliding second
        # images served per request id: a job's result can only come from one of these
        self.images_by_request_id: collections.Counter[str] = collections.Counter()
        # most requests held at once (a hung one until its client leaves)
        self.max_inflight = self.inflight
        self.started = time.monotonic()
        # (arrived, answered, status) of each request, seconds since the stats began:
        # lets a test check that nothing came during a Retry-After it asked for
        self.timeline: list[tuple[float, float, int]] = []

    def arrived(self, now: float) -> None:
        while self.recent and self.recent[0] <= now - 1.0:
            self.recent.popleft()
        self.recent.append(now)
        self.max_per_s = max(self.max_per_s, len(self.recent))

    def stats(self) -> dict[str, Any]:
        config = {k: v for k, v in asdict(self.config).items() if k != "api_key"}
        return {
            "simulated": True,
            "total": sum(self.by_status.values()),
            "by_status": dict(self.by_status),
            "by_fault": dict(self.by_fault),
            "by_request_id": dict(self.by_request_id),
            "images_by_request_id": dict(self.images_by_request_id),
            "max_in_any_second": self.max_per_s,
            "inflight": self.inflight,
            "max_inflight": self.max_inflight,
            "timeline": list(self.timeline),
            "elapsed_s": time.monotonic() - self.started,
            "config": config,
        }

    def rate_limited(self, now: float) -> float | None:
        """Seconds until the window has room, or None when this request is admitted."""
        rps = self.config.rps
        while self.window and self.window[0] <= now - 1.0:
            self.window.popleft()
        if rps and len(self.window) >= rps:
            return max(0.001, self.window[0] + 1.0 - now)
        self.window.append(now)
        return None

    def draw(self) -> tuple[str | None, float]:
        """The fault (or None) and the latency in seconds of the next request."""
        r = self.rng.random()
        jitter = self.rng.uniform(-self.config.jitter_ms, self.config.jitter_ms)
        latency = max(0.0, self.config.latency_ms + jitter) / 1000
        for name, rate in self.config.fault_rates():
            if r < rate:
                return name, latency
            r -= rate
        return None, latency

    def keep_file(self, name: str, data: bytes) -> None:
        self.files[name] = data
        while len(self.files) > self.config.max_files:
            self.files.popitem(last=False)


SIM_KEY = web.AppKey("sim", SimApi)


@web.middleware
async def _label(request: web.Request, handler: Any) -> web.StreamResponse:
    response: web.StreamResponse = await handler(request)
    response.headers[SIM_HEADER] = "1"
    return response


def _counted(sim: SimApi, request: web.Request, status: str) -> None:
    sim.by_status[status] += 1
    rid = request.headers.get("X-Client-Request-Id")
    if rid:
        sim.by_request_id[rid[:200]] += 1


def _check_key(sim: SimApi, request: web.Request) -> web.Response | None:
    key = sim.config.api_key
    if key is None:
        return None
    auth = request.headers.get("Authorization", "")
    if auth == f"Bearer {key}":
        return None
    given = auth.removeprefix("Bearer ").strip() or "(none)"
    return _error(
        401, f"Incorrect API key provided: {given}.", "invalid_request_error", "invalid_api_key"
    )


def _too_many(retry_s: float, rps: float) -> web.Response:
    ms = max(1, math.ceil(retry_s * 1000))
    return _error(
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


async def _parse(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _error(
            400, "We could not parse the JSON body of your request.", "invalid_request_error", None
        )
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.", "invalid_request_error", None)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return _error(400, "prompt is required.", "invalid_request_error", "invalid_value")
    if body.get("n", 1) != 1:
        return _error(
            400, "The simulator only makes n=1.", "invalid_request_error", "invalid_value"
        )
    if not _SIZE.match(str(body.get("size", "1024x1024"))):
        return _error(
            400, f"Invalid size: {body.get('size')!r}.", "invalid_request_error", "invalid_value"
        )
    if body.get("response_format", "b64_json") not in ("b64_json", "url"):
        return _error(
            400, "response_format must be b64_json or url.", "invalid_request_error", None
        )
    return body


async def _fault(name: str, sim: SimApi, request: web.Request, key: str) -> web.StreamResponse:
    """The response for an injected fault (after the latency)."""
    if name == "500":
        return _error(
            500, "The server had an error while processing your request.", "server_error", None
        )
    if name == "400":
        return _error(
            400,
            "Your request was rejected as a result of our safety system.",
            "invalid_request_error",
            "content_policy_violation",
        )
    if name == "401":
        return _error(
            401, f"Incorrect API key provided: {key}.", "invalid_request_error", "invalid_api_key"
        )
    if name == "quota":
        return _error(
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
        return _error(
            429,
            f"Rate limit reached (simulated fault). Try again in {ms}ms.",
            "requests",
            "rate_limit_exceeded",
            **{"retry-after-ms": str(ms), "Retry-After": str(math.ceil(ms / 1000))},
        )
    raise AssertionError(name)


def _reset(request: web.Request) -> web.Response:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed proxy would."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # aiohttp finds the transport gone when it writes this, and drops it quietly
    return web.Response(status=500)


async def generations(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    sim.inflight += 1
    sim.max_inflight = max(sim.max_inflight, sim.inflight)
    arrived = time.monotonic() - sim.started
    status = 0
    try:
        response = await _generations(sim, request)
        status = response.status
        return response
    finally:
        sim.inflight -= 1
        if len(sim.timeline) < TIMELINE_MAX:
            sim.timeline.append(
                (round(arrived, 4), round(time.monotonic() - sim.started, 4), status)
            )


async def _generations(sim: SimApi, request: web.Request) -> web.StreamResponse:
    sim.arrived(time.monotonic())
    sim.seq += 1
    seq = sim.seq
    fault, latency = sim.draw()
    refused = _check_key(sim, request)
    if refused is None and (retry := sim.rate_limited(time.monotonic())) is not None:
        refused = _too_many(retry, sim.config.rps or 0)
    if refused is not None:
        _counted(sim, request, str(refused.status))
        return refused
    parsed = await _parse(request)
    if isinstance(parsed, web.Response):
        _counted(sim, request, str(parsed.status))
        return parsed
    if fault is not None:
        sim.by_fault[fault] += 1
    if fault in ("timeout", "reset"):
        _counted(sim, request, fault)
        if fault == "timeout":
            await asyncio.sleep(sim.config.hang_s)
        else:
            await asyncio.sleep(latency)
        return _reset(request)
    await asyncio.sleep(latency)
    if fault is not None:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        response = await _fault(fault, sim, request, given or "(none)")
        _counted(sim, request, str(response.status))
        return response
    return _image(sim, request, parsed, seq)


def _image(sim: SimApi, request: web.Request, body: dict[str, Any], seq: int) -> web.Response:
    png = tiny_png(f"{body['prompt']}|{seq}|{sim.config.seed}".encode(), sim.config.image_px)
    if body.get("response_format", "b64_json") == "url":
        name = hashlib.sha256(png).hexdigest()[:32] + ".png"
        sim.keep_file(name, png)
        item: dict[str, Any] = {"url": f"{request.url.origin()}/files/{name}"}
    else:
        item = {"b64_json": base64.b64encode(png).decode()}
    _counted(sim, request, "200")
    rid = request.headers.get("X-Client-Request-Id")
    if rid:
        sim.images_by_request_id[rid[:200]] += 1
    return web.json_response({"created": int(time.time()), "data": [item], "simulated": True})


async def get_file(request: web.Request) -> web.Response:
    data = request.app[SIM_KEY].files.get(request.match_info["name"])
    if data is None:
        return _error(404, "No such file (simulated store).", "invalid_request_error", "not_found")
    return web.Response(body=data, content_type="image/png")


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM_KEY].stats())


async def reset_stats(request: web.Request) -> web.Response:
    request.app[SIM_KEY].reset_stats()
    return web.json_response({"simulated": True, "reset": True})


def make_app(config: SimConfig) -> web.Application:
    app = web.Application(middlewares=[_label], client_max_size=1024 * 1024)
    app[SIM_KEY] = SimApi(config)
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/files/{name}", get_file)
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/stats/reset", reset_stats)
    return app


async def start_sim(
    config: SimConfig, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Serve the simulator in this loop; returns the runner (await runner.cleanup()) and port."""
    runner = web.AppRunner(
        make_app(config), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, int(bound)


def sim_of(runner: web.AppRunner) -> SimApi:
    """The running simulator's state (for in-process tests)."""
    return runner.app[SIM_KEY]


# ------------------------------------------------------------------ command line

_FLAGS: list[tuple[str, type, str]] = [
    ("latency_ms", float, "mean latency of an answer, ms"),
    ("jitter_ms", float, "latency varies uniformly by +- this, ms"),
    ("rps", float, "answer 429 past this many requests in any second (default: no limit)"),
    ("fail_500", float, "share of requests answered 500"),
    ("fail_timeout", float, "share held for --hang-s (past the client's timeout)"),
    ("fail_reset", float, "share whose connection is reset"),
    ("fail_malformed", float, "share answered with truncated JSON"),
    ("fail_content_type", float, "share answered with an HTML page"),
    ("fail_400", float, "share refused by the (simulated) content policy"),
    ("fail_401", float, "share refused as a bad key"),
    ("fail_quota", float, "share answered 429 insufficient_quota"),
    ("fail_empty", float, "share answered with no image"),
    ("fail_429", float, "share answered 429 rate_limit_exceeded (any rate)"),
    ("fault_retry_after_ms", float, "the Retry-After of those 429s, ms"),
    ("hang_s", float, "how long a timeout fault holds the request, s"),
    ("api_key", str, "require this bearer key (prefer GENWORKER_SIM_API_KEY)"),
    ("seed", int, "seed of the faults and latencies"),
    ("image_px", int, "width and height of the PNGs returned"),
]


def _env_default(name: str, kind: type, default: Any) -> Any:
    raw = os.environ.get(f"GENWORKER_SIM_{name.upper()}")
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(
            f"GENWORKER_SIM_{name.upper()}: expected {kind.__name__}, got {raw!r}"
        ) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genworker sim-api",
        description="Serve the SIMULATED image API (OpenAI-compatible) for demos and tests.",
    )
    p.add_argument(
        "--host",
        default=os.environ.get("GENWORKER_SIM_HOST", "127.0.0.1"),
        help="address to bind [GENWORKER_SIM_HOST] (default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=_env_default("port", int, 8000),
        help="port, 0 for any free one [GENWORKER_SIM_PORT] (default 8000)",
    )
    p.add_argument(
        "--announce",
        action="store_true",
        help="print only the base URL (http://host:port) as the first line, for scripts",
    )
    defaults = SimConfig()
    for name, kind, help_text in _FLAGS:
        env = f"GENWORKER_SIM_{name.upper()}"
        default = _env_default(name, kind, getattr(defaults, name))
        shown = "" if name == "api_key" or default is None else f" (default {default})"
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=default,
            help=f"{help_text} [{env}]{shown}",
        )
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    values = {f.name: getattr(args, f.name) for f in fields(SimConfig) if hasattr(args, f.name)}
    config = SimConfig(**values)
    rates = [rate for _, rate in config.fault_rates()]
    if any(not 0 <= r <= 1 for r in rates) or sum(rates) > 1:
        raise ValueError("fault rates must each be in [0, 1] and sum to at most 1")
    if min(config.latency_ms, config.jitter_ms, config.hang_s, config.fault_retry_after_ms) < 0:
        raise ValueError(
            "--latency-ms, --jitter-ms, --hang-s and --fault-retry-after-ms must not be negative"
        )
    if config.rps is not None and config.rps <= 0:
        raise ValueError("--rps must be positive")
    return config


async def _serve(config: SimConfig, host: str, port: int, announce: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner, bound = await start_sim(config, host, port)
    try:
        url = f"http://{host}:{bound}"
        print(url if announce else f"SIMULATED image API listening on {url}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        p.error(str(e))
    import uvloop  # the loop our nodes run on: the simulator costs the shared cores less

    try:
        uvloop.run(_serve(config, args.host, args.port, args.announce))
    except OSError as e:
        print(f"genworker sim-api: cannot listen on {args.host}:{args.port}: {e.strerror}")
        return 1
    return 0


def cmd_sim_api(args: argparse.Namespace, settings: object) -> int:
    """`genworker sim-api ...` through the CLI's command table: the sim parses its own flags."""
    return main(list(getattr(args, "sim_args", None) or []))
