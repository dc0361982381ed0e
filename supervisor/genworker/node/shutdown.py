"""How a node stops (TERM, INT, QUIT, or a fatal error), in order:

1. STOPPING=1; every worker is asked to finish what it holds (spawning ones are stopped);
2. the claim loop ends, so nothing new arrives, and the buffer goes back to the queue;
3. the workers get until --graceful-timeout to finish (a second TERM or a QUIT cuts it
   short), then SIGKILL; their watchers give back whatever they still held;
4. the last outcomes are written, what no worker held is given back, the node is marked
   stopped and the pool closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from genworker.node.feeder import DB_ERRORS
from genworker.node.handles import State

if TYPE_CHECKING:
    from genworker.node.arbiter import Arbiter

log = logging.getLogger("genworker.arbiter")

WATCHERS_S = 15.0  # at shutdown, how long dead workers' jobs may take to be given back
CLAIM_STOP_S = 2.0  # at shutdown, how long a claim in progress may take to come back


async def shut_down(a: Arbiter) -> None:
    a.stopping = True
    if a.hooks is not None:
        a.hooks.stopping(a)
    # Workers first: they drain while the buffer goes back (which may take long
    # when the database is away).
    for h in a.live_handles():
        if h.state is State.SPAWNING:
            a.kill(h, signal.SIGTERM)  # holds no job: no need to wait for its boot
        h.ask_stop("shutdown")
    graceful_until = time.monotonic() + a.settings.graceful_timeout_s
    await stop_claiming(a)
    try:
        released = await asyncio.wait_for(
            a.feeder.release_buffer(), max(1.0, a.settings.graceful_timeout_s)
        )
    except TimeoutError:
        released = 0
        log.warning("buffered jobs not given back in time; their leases will expire")
    if released:
        log.info("gave back %d buffered jobs", released)
    await wait_workers(a, graceful_until - time.monotonic())
    for h in a.live_handles():
        a.kill(h, signal.SIGKILL)
    await wait_workers(a, WATCHERS_S, immediate_ok=False)
    if a.live_handles() or a.watchers:
        log.warning("some workers' jobs were not given back; their leases will expire")
    a.stop_event.set()
    await a.tasks.close(wait_for=("write",), timeout_s=15.0)
    await release_leftovers(a)
    try:
        await a.feeder.queue.stop_node(a.node)
    except DB_ERRORS as e:
        log.warning("could not mark node %s stopped: %s", a.node, type(e).__name__)
    await a.feeder.close()
    with contextlib.suppress(ValueError, OSError):  # gone already if the zygote died
        asyncio.get_running_loop().remove_reader(a.zygote.sock.fileno())
    a.zygote.close()
    log.info(
        "stopped: %d jobs succeeded, %d dead, %d retried on this run",
        a.feeder.stats.succeeded,
        a.feeder.stats.dead,
        a.feeder.stats.retried,
    )
    if a.hooks is not None:
        await a.hooks.stopped()


async def stop_claiming(a: Arbiter) -> None:
    """End the claim loop before giving the buffer back: a claim that returned after the
    buffer was emptied would fill it again with jobs nobody runs."""
    a.feeder.claiming = False
    a.feeder.wake.set()
    claim = a.tasks.named("claim")
    if claim:
        _, late = await asyncio.wait(claim, timeout=CLAIM_STOP_S)
        for t in late:  # stuck on the database: whatever it claimed, the sweep gives back
            t.cancel()


async def release_leftovers(a: Arbiter) -> None:
    """Every worker is gone and every outcome written: whatever this node still holds runs
    nowhere. Give it back now rather than when its lease expires."""
    if a.feeder.pending:
        return  # unwritten outcomes: those jobs ran; let their leases decide
    try:
        n = await a.feeder.queue.release_node(a.node)
    except DB_ERRORS as e:
        log.warning("could not give back what is left: %s", type(e).__name__)
        return
    if n:
        log.warning("gave back %d jobs no worker held at shutdown", n)


async def wait_workers(a: Arbiter, timeout_s: float, immediate_ok: bool = True) -> None:
    """Until every worker has exited and its watcher has given its jobs back."""
    deadline = time.monotonic() + timeout_s
    while (a.live_handles() or a.watchers) and time.monotonic() < deadline:
        if immediate_ok and a.immediate.is_set():
            return
        if a.hooks is not None:
            a.hooks.draining(deadline - time.monotonic())
        waits: set[asyncio.Future[Any]] = set(a.watchers)
        waits.update(h.exited for h in a.live_handles() if not h.exited.done())
        immediate = asyncio.ensure_future(a.immediate.wait())
        waits.add(immediate)
        try:
            await asyncio.wait(
                waits,
                timeout=min(0.5, max(0.01, deadline - time.monotonic())),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            immediate.cancel()
