"""/metrics, /healthz and /readyz, served by aiohttp on the supervisor's loop.

The supervisor implements `StatusProvider`; this module only speaks HTTP. Bound to
loopback by default: serving other hosts is an explicit `--http 0.0.0.0:9464`.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import logging
import socket
from collections.abc import Awaitable, Mapping
from typing import Protocol, TypeVar

from aiohttp import web

from genworker.errors import GenworkerError, UsageError
from genworker.ops.metrics import CONTENT_TYPE

log = logging.getLogger("genworker.http")

DEFAULT_ADDRESS = "127.0.0.1:9464"

Readiness = tuple[bool, list[str]]
T = TypeVar("T")


class StatusProvider(Protocol):
    """What the supervisor gives the HTTP server; each method may also be async."""

    def metrics_text(self) -> str | Awaitable[str]: ...

    def readiness(self) -> Readiness | Awaitable[Readiness]:
        """(ready, reasons it is not): e.g. (False, ["database unreachable"])."""
        ...


class HttpServeError(GenworkerError):
    """The metrics/health server cannot start; the message is one line for the CLI."""


def assess_readiness(
    *,
    database_ok: bool,
    database_problem: str = "unreachable",
    workers_up: int,
    workers: int,
    degraded: str | None = None,
    alarms: Mapping[str, str] | None = None,
) -> Readiness:
    """The usual verdict, with reasons worded the same in /readyz and `genworker status`."""
    reasons = []
    if not database_ok:
        reasons.append(f"database {database_problem}")
    if workers_up < workers:
        reasons.append(f"workers down: {workers - workers_up} of {workers}")
    if degraded:
        reasons.append(f"degraded: {degraded}")
    reasons.extend(f"alarm {name}: {why}" for name, why in (alarms or {}).items())
    return not reasons, reasons


async def _resolve(value: T | Awaitable[T], timeout_s: float) -> T:
    if inspect.isawaitable(value):
        async with asyncio.timeout(timeout_s):
            return await value
    return value


def make_app(provider: StatusProvider, *, timeout_s: float = 5.0) -> web.Application:
    """The three endpoints; `timeout_s` bounds an async provider (a probe must answer)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(request: web.Request) -> web.Response:
        try:
            text = await _resolve(provider.metrics_text(), timeout_s)
        except TimeoutError:
            log.warning("building /metrics took longer than %gs", timeout_s)
            return web.Response(status=503, text="metrics timed out\n")
        except Exception:
            log.exception("building /metrics failed")
            return web.Response(status=500, text="metrics failed (see the log)\n")
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def readyz(request: web.Request) -> web.Response:
        try:
            ready, reasons = await _resolve(provider.readiness(), timeout_s)
        except TimeoutError:
            ready, reasons = False, [f"readiness check timed out after {timeout_s:g}s"]
        except Exception:
            # The exception text could carry a DSN; the body gets only the type.
            log.exception("readiness check failed")
            ready, reasons = False, ["readiness check failed (see the log)"]
        body = json.dumps({"ready": ready, "reasons": reasons}) + "\n"
        return web.Response(
            status=200 if ready else 503, text=body, content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/readyz", readyz)
    return app


def parse_address(address: str) -> tuple[str, int] | None:
    """'host:port' or '[v6]:port' -> (host, port); '' -> None (disabled)."""
    address = address.strip()
    if not address:
        return None
    hint = "write host:port, e.g. 127.0.0.1:9464 (0.0.0.0:9464 serves every interface)"
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"--http {address!r}: put an IPv6 address in brackets, [::1]:9464")
    if not sep or not host:
        raise UsageError(f"--http {address!r}: {hint}")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--http {address!r}: the port must be a number; {hint}") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--http {address!r}: the port must be 0..65535")
    return host, port


def _why(e: OSError) -> str:
    if isinstance(e, socket.gaierror):
        return "unknown host"
    return {
        errno.EADDRINUSE: "port in use",
        errno.EADDRNOTAVAIL: "no such address on this host",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
    }.get(e.errno or 0, e.strerror or type(e).__name__)


def _cannot_serve(address: str, e: OSError) -> HttpServeError:
    hint = " (another genworker? choose another --http, or '' to disable)"
    return HttpServeError(
        f"cannot serve metrics on {address}: {_why(e)}"
        + (hint if e.errno == errno.EADDRINUSE else "")
    )


def bind(address: str) -> socket.socket | None:
    """A listening socket on `address`, None when disabled (''): bound before a node
    launches anything, so a port in use stops it with one line and nothing to undo.
    Raises HttpServeError, UsageError."""
    where = parse_address(address)
    if where is None:
        return None
    host, port = where
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise _cannot_serve(address, e) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise _cannot_serve(address, e) from None
    sock.set_inheritable(False)
    return sock


async def serve(
    app: web.Application, address: str, sock: socket.socket | None = None
) -> web.AppRunner | None:
    """Start serving `app` on `sock` (from bind(address)), else on `address`; None when
    disabled (''). The caller awaits `runner.cleanup()` on shutdown. Raises
    HttpServeError, UsageError."""
    if sock is None:
        sock = bind(address)
    if sock is None:
        return None
    # access_log=None: a scrape every 15 s is not an event worth a log line.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except OSError as e:
        await runner.cleanup()
        raise _cannot_serve(address, e) from None
    bound = ", ".join(
        f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}" for a in runner.addresses
    )
    log.info("serving /metrics, /healthz, /readyz on %s", bound)
    return runner
