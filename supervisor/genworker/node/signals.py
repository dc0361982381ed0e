"""What the supervisor does on each signal. The handlers (installed with
`loop.add_signal_handler`) only enqueue the signal; `signal_loop` takes them one at a time
and acts here:

  TERM, INT   stop claiming, give buffered jobs back, let in-flight jobs finish for up
              to --graceful-timeout, give the rest back, exit 0; a second one: now
  QUIT        give everything back and exit now
  HUP         re-read the settings and replace every worker, one at a time
  TTIN, TTOU  one worker more, one fewer
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from genworker.node.handles import BOOT_TIMEOUT_S, State

if TYPE_CHECKING:
    from genworker.node.arbiter import Arbiter

log = logging.getLogger("genworker.arbiter")


async def signal_loop(a: Arbiter) -> None:
    while True:
        sig = await a.signals.get()
        await HANDLERS[sig](a)


async def on_term(a: Arbiter) -> None:
    from genworker.node.arbiter import EXIT_OK

    if a.stopping:
        log.warning("second stop signal: giving back in-flight jobs now")
        a.immediate.set()
        return
    log.info("stop signal: finishing in-flight jobs (up to %.0fs)", a.settings.graceful_timeout_s)
    a.finish(EXIT_OK)


async def on_quit(a: Arbiter) -> None:
    from genworker.node.arbiter import EXIT_OK

    log.info("quit signal: giving back every job and exiting now")
    a.immediate.set()
    a.finish(EXIT_OK)


async def on_ttin(a: Arbiter) -> None:
    a.target = min(a.target + 1, a.block.max_workers)
    log.info("TTIN: %d workers", a.target)


async def on_ttou(a: Arbiter) -> None:
    a.target = max(1, a.target - 1)
    log.info("TTOU: %d workers", a.target)


async def on_hup(a: Arbiter) -> None:
    if a.reloading or a.stopping:
        return
    a.reloading = True
    # A task of its own: replacing workers takes a while, and a TERM meanwhile must not
    # wait in the signal queue until it is done.
    a.tasks.spawn(_reload(a), "reload", critical=False)


async def _reload(a: Arbiter) -> None:
    try:
        await _replace_all(a)
    finally:
        a.reloading = False


async def _replace_all(a: Arbiter) -> None:
    if a.reload_settings is not None:
        try:
            new = a.reload_settings()
        except Exception as e:  # a bad edit must not take the node down: keep the old settings
            log.error("HUP: settings not reloaded: %s", e)
            return
        a.settings = new
        a.feeder.settings = new
        a.target = new.workers
        a.zygote.send_settings(new)
    if a.hooks is not None:
        a.hooks.reloading()
    # positions past a lowered worker count are not replaced: _keep_positions stops them
    replace = [h for h in a.live_handles() if h.state is State.READY and h.position < a.target]
    log.info("HUP: replacing %d workers one at a time", len(replace))
    for old in replace:
        if a.stopping:
            return
        old.ask_stop("reload")
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline and not a.stopping:
            if any(
                h.position == old.position and h.state is State.READY and h is not old
                for h in a.handles
            ):
                break
            await asyncio.sleep(0.05)
    if a.stopping:
        return
    log.info("HUP: every worker replaced")
    if time.monotonic() < a.feeder.paused_until:
        # paused for a bad key, which the reload may have fixed: probe it now
        a.feeder.pause_claims(0.0)
    if a.hooks is not None:
        a.hooks.reloaded()


HANDLERS: dict[int, Callable[[Arbiter], Awaitable[None]]] = {
    signal.SIGTERM: on_term,
    signal.SIGINT: on_term,
    signal.SIGQUIT: on_quit,
    signal.SIGHUP: on_hup,
    signal.SIGTTIN: on_ttin,
    signal.SIGTTOU: on_ttou,
}
