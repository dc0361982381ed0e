"""What the supervisor does on each signal, and the order of a shutdown.

The handlers (installed with `loop.add_signal_handler`) only enqueue the signal;
`signal_loop` takes them one at a time and acts:

  TERM, INT   stop claiming, give buffered jobs back, let in-flight jobs finish for up
              to --graceful-timeout, give the rest back, exit 0; a second one: now
  QUIT        give everything back and exit now
  HUP         re-read the settings and replace every worker, one at a time
  TTIN, TTOU  one worker more, one fewer

A shutdown (TERM, INT, QUIT, or a fatal error), in order:

1. STOPPING=1; every worker is asked to finish what it holds (spawning ones are stopped);
2. the claim loop ends, so nothing new arrives, and the buffer goes back to the queue;
3. the workers get until --graceful-timeout to finish (a second TERM or a QUIT cuts it
   short), then SIGKILL; their watchers give back whatever they still held;
4. the last outcomes are written, what no worker held is given back, the node is marked
   stopped and the pool closed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from genworker.background import TaskOwner
from genworker.config import Settings
from genworker.exits import EXIT_OK
from genworker.node.dbhealth import DB_ERRORS
from genworker.node.feeder import Feeder
from genworker.node.handles import BOOT_TIMEOUT_S, State, WorkerHandle

log = logging.getLogger("genworker.arbiter")

WATCHERS_S = 15.0  # at shutdown, how long dead workers' jobs may take to be given back
CLAIM_STOP_S = 2.0  # at shutdown, how long a claim in progress may take to come back
WRITE_STOP_S = 15.0  # at shutdown, how long the last outcomes may take to be written


class LifecycleHooks(Protocol):
    """The observability side's part in a reload and a shutdown (ops.service.Ops)."""

    def reloading(self) -> None: ...
    def reloaded(self) -> None: ...
    def stopping(self, node: Any) -> None: ...
    def draining(self, seconds_left: float) -> None: ...
    async def stopped(self) -> None: ...


class Supervised(Protocol):
    """What the lifecycle needs of the arbiter."""

    @property
    def node(self) -> str: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def target(self) -> int: ...
    @property
    def feeder(self) -> Feeder: ...
    @property
    def tasks(self) -> TaskOwner: ...
    @property
    def watchers(self) -> set[asyncio.Task[None]]: ...

    def finish(self, code: int) -> None: ...
    def live_handles(self) -> list[WorkerHandle]: ...
    def scale(self, delta: int) -> int: ...
    def apply_settings(self, settings: Settings) -> None: ...
    def begin_stop(self) -> None: ...
    def stop_workers(self) -> None: ...
    def kill_workers(self) -> None: ...
    def close_zygote(self) -> None: ...


class Lifecycle:
    def __init__(
        self,
        node: Supervised,
        settings: Settings,
        hooks: LifecycleHooks | None,
        reload_settings: Callable[[], Settings] | None,
    ) -> None:
        self.node = node
        self.settings = settings  # the graceful timeout of the shutdown
        self.hooks = hooks
        self.reload_settings = reload_settings
        self.signals: asyncio.Queue[int] = asyncio.Queue()
        self.immediate = asyncio.Event()  # a second TERM or a QUIT: no more waiting
        self.stop_event = asyncio.Event()  # the loops beside the work end
        self.reloading = False
        self.handlers: dict[int, Callable[[], Awaitable[None]]] = {
            signal.SIGTERM: self.on_term,
            signal.SIGINT: self.on_term,
            signal.SIGQUIT: self.on_quit,
            signal.SIGHUP: self.on_hup,
            signal.SIGTTIN: self.on_ttin,
            signal.SIGTTOU: self.on_ttou,
        }

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in self.handlers:
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)

    async def signal_loop(self) -> None:
        while True:
            sig = await self.signals.get()
            await self.handlers[sig]()

    # ============================================================ signals
    async def on_term(self) -> None:
        if self.node.stopping:
            log.warning("second stop signal: giving back in-flight jobs now")
            self.immediate.set()
            return
        log.info(
            "stop signal: finishing in-flight jobs (up to %.0fs)", self.settings.graceful_timeout_s
        )
        self.node.finish(EXIT_OK)

    async def on_quit(self) -> None:
        log.info("quit signal: giving back every job and exiting now")
        self.immediate.set()
        self.node.finish(EXIT_OK)

    async def on_ttin(self) -> None:
        log.info("TTIN: %d workers", self.node.scale(+1))

    async def on_ttou(self) -> None:
        log.info("TTOU: %d workers", self.node.scale(-1))

    async def on_hup(self) -> None:
        if self.reloading or self.node.stopping:
            return
        self.reloading = True
        # A task of its own: replacing workers takes a while, and a TERM meanwhile must not
        # wait in the signal queue until it is done.
        self.node.tasks.spawn(self._reload(), "reload", critical=False)

    async def _reload(self) -> None:
        try:
            await self._replace_all()
        finally:
            self.reloading = False

    async def _replace_all(self) -> None:
        n = self.node
        if self.reload_settings is not None:
            try:
                new = self.reload_settings()
            except Exception as e:  # a bad edit must not take the node down: keep the old
                log.error("HUP: settings not reloaded: %s", e)
                return
            self.settings = new
            n.apply_settings(new)
        if self.hooks is not None:
            self.hooks.reloading()
        # positions past a lowered worker count are not replaced: the monitor stops them
        replace = [h for h in n.live_handles() if h.state is State.READY and h.position < n.target]
        log.info("HUP: replacing %d workers one at a time", len(replace))
        for old in replace:
            if n.stopping:
                return
            old.ask_stop("reload")
            deadline = time.monotonic() + BOOT_TIMEOUT_S
            while time.monotonic() < deadline and not n.stopping:
                if self._replaced(old):
                    break
                await asyncio.sleep(0.05)
        if n.stopping:
            return
        log.info("HUP: every worker replaced")
        n.feeder.probe_if_paused()  # paused for a bad key, which the reload may have fixed
        if self.hooks is not None:
            self.hooks.reloaded()

    def _replaced(self, old: WorkerHandle) -> bool:
        return any(
            h.position == old.position and h.state is State.READY and h is not old
            for h in self.node.live_handles()
        )

    # =========================================================== shutdown
    async def shut_down(self) -> None:
        n, feeder = self.node, self.node.feeder
        n.begin_stop()
        if self.hooks is not None:
            self.hooks.stopping(n)
        # Workers first: they drain while the buffer goes back (which may take long
        # when the database is away).
        n.stop_workers()
        graceful_s = self.settings.graceful_timeout_s
        graceful_until = time.monotonic() + graceful_s
        await self._stop_claiming()
        try:
            released = await asyncio.wait_for(feeder.release_buffer(), max(1.0, graceful_s))
        except TimeoutError:
            released = 0
            log.warning("buffered jobs not given back in time; their leases will expire")
        if released:
            log.info("gave back %d buffered jobs", released)
        await self._wait_workers(graceful_until - time.monotonic())
        n.kill_workers()
        await self._wait_workers(WATCHERS_S, immediate_ok=False)
        if n.live_handles() or n.watchers:
            log.warning("some workers' jobs were not given back; their leases will expire")
        self.stop_event.set()
        await n.tasks.close(wait_for=("write",), timeout_s=WRITE_STOP_S)
        await self._release_leftovers()
        try:
            await feeder.queue.stop_node(n.node)
        except DB_ERRORS as e:
            log.warning("could not mark node %s stopped: %s", n.node, type(e).__name__)
        await feeder.close()
        n.close_zygote()
        st = feeder.stats
        log.info(
            "stopped: %d jobs succeeded, %d dead, %d retried on this run",
            st.succeeded,
            st.dead,
            st.retried,
        )
        if self.hooks is not None:
            await self.hooks.stopped()

    async def _stop_claiming(self) -> None:
        """End the claim loop before giving the buffer back: a claim that returned after the
        buffer was emptied would fill it again with jobs nobody runs."""
        self.node.feeder.stop_claiming()
        claim = self.node.tasks.named("claim")
        if claim:
            _, late = await asyncio.wait(claim, timeout=CLAIM_STOP_S)
            for t in late:  # stuck on the database: whatever it claimed, the sweep gives back
                t.cancel()

    async def _release_leftovers(self) -> None:
        """Every worker is gone and every outcome written: whatever this node still holds
        runs nowhere. Give it back now rather than when its lease expires."""
        feeder = self.node.feeder
        if feeder.holdings.pending:
            return  # unwritten outcomes: those jobs ran; let their leases decide
        try:
            n = await feeder.queue.release_node(self.node.node)
        except DB_ERRORS as e:
            log.warning("could not give back what is left: %s", type(e).__name__)
            return
        if n:
            log.warning("gave back %d jobs no worker held at shutdown", n)

    async def _wait_workers(self, timeout_s: float, immediate_ok: bool = True) -> None:
        """Until every worker has exited and its watcher has given its jobs back."""
        n = self.node
        deadline = time.monotonic() + timeout_s
        while (n.live_handles() or n.watchers) and time.monotonic() < deadline:
            if immediate_ok and self.immediate.is_set():
                return
            if self.hooks is not None:
                self.hooks.draining(deadline - time.monotonic())
            waits: set[asyncio.Future[Any]] = set(n.watchers)
            waits.update(h.exited for h in n.live_handles() if not h.exited.done())
            immediate = asyncio.ensure_future(self.immediate.wait())
            waits.add(immediate)
            try:
                await asyncio.wait(
                    waits,
                    timeout=min(0.5, max(0.01, deadline - time.monotonic())),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                immediate.cancel()
