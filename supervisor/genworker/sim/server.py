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

It refuses what the real provider refuses (genworker.contract: a field the model
does not take, a size or value it does not, a prompt too long), with HTTP 400 and
OpenAI's error body, and counts the refusals by code at /stats ("refused"); it
answers as the model does (gpt-image-1: b64_json with token usage; dall-e: url by
default). --lenient is the simulator before that: any model, size or field.

This module is the HTTP side and the command line; the state and the draw are in
state.py, the bodies of the answers and faults in answers.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import signal
import time
from dataclasses import fields
from typing import Any

from aiohttp import web

from genworker.sim.answers import (
    answer_doc,
    answer_form,
    check_body,
    check_key,
    error,
    fault_answer,
    read_body,
    refusal_answer,
    reset_connection,
    tiny_png,
    too_many,
)
from genworker.sim.state import FAULTS, TIMELINE_MAX, SimApi, SimConfig

__all__ = [  # the names callers import from here, wherever they are defined
    "FAULTS",
    "SIM_HEADER",
    "SIM_KEY",
    "TIMELINE_MAX",
    "SimApi",
    "SimConfig",
    "cmd_sim_api",
    "config_from_args",
    "main",
    "make_app",
    "parser",
    "sim_of",
    "start_sim",
    "tiny_png",
]

SIM_HEADER = "X-Genworker-Simulator"

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
    refused = check_key(sim, request)
    if refused is None and (retry := sim.rate_limited(time.monotonic())) is not None:
        refused = too_many(retry, sim.config.rps or 0)
    if refused is not None:
        _counted(sim, request, str(refused.status))
        return refused
    parsed = await read_body(request)
    if isinstance(parsed, web.Response):
        sim.refused["invalid_json"] += 1
        _counted(sim, request, str(parsed.status))
        return parsed
    why = check_body(parsed, sim.config.lenient)
    if why is not None:
        sim.refused[why.code] += 1
        _counted(sim, request, "400")
        return refusal_answer(why)
    if fault is not None:
        sim.by_fault[fault] += 1
    if fault in ("timeout", "reset"):
        _counted(sim, request, fault)
        if fault == "timeout":
            await asyncio.sleep(sim.config.hang_s)
        else:
            await asyncio.sleep(latency)
        return reset_connection(request)
    await asyncio.sleep(latency)
    if fault is not None:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        response = await fault_answer(fault, sim, request, given or "(none)")
        _counted(sim, request, str(response.status))
        return response
    return _image(sim, request, parsed, seq)


def _image(sim: SimApi, request: web.Request, body: dict[str, Any], seq: int) -> web.Response:
    png = tiny_png(f"{body['prompt']}|{seq}|{sim.config.seed}".encode(), sim.config.image_px)
    if answer_form(body, sim.config.lenient) == "url":
        name = hashlib.sha256(png).hexdigest()[:32] + ".png"
        sim.keep_file(name, png)
        item: dict[str, Any] = {"url": f"{request.url.origin()}/files/{name}"}
    else:
        item = {"b64_json": base64.b64encode(png).decode()}
    _counted(sim, request, "200")
    rid = request.headers.get("X-Client-Request-Id")
    if rid:
        sim.images_by_request_id[rid[:200]] += 1
    return web.json_response(answer_doc(body, item, sim.config.lenient))


async def get_file(request: web.Request) -> web.Response:
    data = request.app[SIM_KEY].files.get(request.match_info["name"])
    if data is None:
        return error(404, "No such file (simulated store).", "invalid_request_error", "not_found")
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
        "--lenient",
        action="store_true",
        default=os.environ.get("GENWORKER_SIM_LENIENT", "") in ("1", "true", "yes"),
        help="accept any model, size WxH and field, answering per response_format "
        "(the simulator before the per-model contract) [GENWORKER_SIM_LENIENT=1]",
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
