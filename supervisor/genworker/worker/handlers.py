"""The handler registry: which async function runs a job of each kind.

A handler is `async def handler(job: Job, session: aiohttp.ClientSession) -> dict`.
It returns a JSON-able result dict, or raises a `JobError` (TransientError,
RateLimited, PermanentError) to say how the job ended. Built in: "image" (the
provider client) and "noop" (returns {} at once, for benchmarks). More come
from settings.handlers as "kind=pkg.module:func" (func may be a dotted path
inside the module, e.g. "pkg.mod:Class.method"); an entry may replace a
built-in kind.

A handler that paces its own calls (the image handler, under --api-rps) has an
`async def pace(self)`: the worker awaits it before the call, outside the call's time.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import aiohttp

from genworker.config import ConfigError, Settings
from genworker.config_values import parse_handler_entry as parse_entry
from genworker.model import Job, PermanentError, unstorable

if TYPE_CHECKING:
    from genworker.api.limiter import SharedTokenBucket

log = logging.getLogger("genworker.worker")

Handler = Callable[[Job, aiohttp.ClientSession], Awaitable[dict[str, Any]]]
Pace = Callable[[], Awaitable[None]]


@runtime_checkable
class Paced(Protocol):
    """A handler that owns a rate limit: `pace` returns when its next call may start."""

    async def pace(self) -> None: ...


async def noop(job: Job, session: aiohttp.ClientSession) -> dict[str, Any]:
    """Does nothing: measures the machinery without an API."""
    return {}


async def _no_api(job: Job, session: aiohttp.ClientSession) -> dict[str, Any]:
    raise PermanentError("image jobs need --api-url (or the simulated API)", alarm="no_api_url")


def _is_async_callable(obj: Any) -> bool:
    if inspect.iscoroutinefunction(obj):
        return True
    if inspect.isclass(obj) or not callable(obj):
        return False
    return inspect.iscoroutinefunction(type(obj).__call__)  # an instance with an async __call__


class Checked:
    """A handler wrapped so a result that is not a storable JSON dict fails that job, not
    the worker (nor the node's write of the other jobs' outcomes)."""

    def __init__(self, kind: str, handler: Handler) -> None:
        self.kind = kind
        self.__wrapped__ = handler
        self.pace: Pace | None = handler.pace if isinstance(handler, Paced) else None

    async def __call__(self, job: Job, session: aiohttp.ClientSession) -> dict[str, Any]:
        kind = self.kind
        result = await self.__wrapped__(job, session)
        if not isinstance(result, dict):
            raise PermanentError(f"handler {kind} returned {type(result).__name__}, not a dict")
        why = unstorable(result)
        if why is not None:
            raise PermanentError(f"handler {kind} returned a result that cannot be stored: {why}")
        return result


async def close_handlers(handlers: dict[str, Handler]) -> None:
    """Let handlers that opened something of their own (a session) close it."""
    for h in handlers.values():
        close = getattr(getattr(h, "__wrapped__", h), "close", None)
        if close is not None and _is_async_callable(close):
            try:
                await close()
            except Exception as e:  # the worker is ending anyway: say so, end the others too
                log.warning("closing a handler failed: %s: %s", type(e).__name__, e)


def paces(handlers: dict[str, Handler]) -> dict[str, Pace]:
    """The kinds whose handler paces its own calls, and how."""
    return {k: h.pace for k, h in handlers.items() if isinstance(h, Checked) and h.pace}


def import_handler(kind: str, target: str) -> Handler:
    """The async callable named by "pkg.module:attr.path"; ConfigError saying why otherwise."""
    module_name, _, attr_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"handler {kind}: cannot import {module_name}: {e}") from None
    except Exception as e:  # an import runs user code: report any failure in one line
        raise ConfigError(
            f"handler {kind}: importing {module_name} failed: {type(e).__name__}: {e}"
        ) from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"handler {kind}: {module_name} has no {attr_path}") from None
    if not _is_async_callable(obj):
        raise ConfigError(f"handler {kind}: {target} is not an async function")
    return obj  # type: ignore[no-any-return]


def load_handlers(
    settings: Settings, bucket: SharedTokenBucket | None = None
) -> dict[str, Handler]:
    """Every job kind this worker can run, each wrapped in `Checked`; the image handler
    draws from `bucket`, the host's request budget, when there is one."""
    from genworker.api.openai import ImageHandler  # aiohttp client code: only where a handler runs

    image: Handler = ImageHandler(settings, bucket) if settings.api_url else _no_api
    found: dict[str, Handler] = {"image": image, "noop": noop}
    seen: set[str] = set()
    for entry in settings.handlers:
        kind, target = parse_entry(entry)
        if kind in seen:
            raise ConfigError(f"handler {kind} is defined twice")
        seen.add(kind)
        found[kind] = import_handler(kind, target)
    return {kind: Checked(kind, fn) for kind, fn in found.items()}
