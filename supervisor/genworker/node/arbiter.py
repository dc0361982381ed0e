"""The supervisor process: start workers (through the zygote), watch them, restart them.
The workers' processes are workers.py's; what each signal does and the order of a
shutdown are lifecycle.py's; claims and outcomes are the feeder's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import psycopg
from setproctitle import setproctitle

from genworker import channels as ch
from genworker.background import TaskOwner
from genworker.config import Settings
from genworker.errors import UsageError
from genworker.exits import EXIT_CRASH_LOOP, EXIT_FAILED
from genworker.model import Outcome
from genworker.node import upkeep
from genworker.node.feeder import Feeder
from genworker.node.handles import Position, State, WorkerHandle
from genworker.node.lifecycle import Lifecycle, LifecycleHooks
from genworker.node.restarts import Restarts
from genworker.node.workers import Workers
from genworker.node.zygote import ZygoteHandle
from genworker.ops.alarms import parse_limits
from genworker.ops.service import NodeView
from genworker.queue import sql
from genworker.queue.store import Queue

log = logging.getLogger("genworker.arbiter")

MONITOR_S = 0.25


class Hooks(LifecycleHooks, Protocol):
    """Observability (ops.service.Ops): metrics, alarms, sd_notify, the HTTP endpoints."""

    address: str | None

    async def starting(self, node: NodeView) -> None: ...
    async def started(self, node: NodeView) -> None: ...
    def alarm(self, name: str, detail: str) -> None: ...
    def clear_alarm(self, name: str) -> None: ...
    def active_alarms(self) -> dict[str, str]: ...


class Arbiter:
    def __init__(
        self,
        settings: Settings,
        *,
        dsn: str,
        zygote: ZygoteHandle,
        block: ch.SharedBlock,
        reload_settings: Callable[[], Settings] | None = None,
        hooks: Hooks | None = None,
        set_api_rate: upkeep.SetRate | None = None,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.node = settings.resolved_node_id
        self.block = block
        self.hooks = hooks  # observability (metrics, sd_notify); optional
        self.set_api_rate = set_api_rate  # this host's share of --api-rps, as the nodes change
        self.target = settings.workers
        self.alarms: dict[str, str] = {}  # without hooks; with them, the hooks keep the alarms
        self.exit_code: asyncio.Future[int] | None = None
        self.tasks = TaskOwner(on_crash=self._task_crashed)
        self.workers = Workers(settings, zygote, block, self.tasks, self)
        self.life = Lifecycle(self, settings, hooks, reload_settings)
        self.started_at = time.monotonic()
        # a rejected API key pauses claims this long, then one job probes it
        self.key_pause_s = parse_limits(settings.alarms).bad_api_key_pause_s
        self.monitored_at = time.monotonic()  # the monitor's last round (the watchdog's health)

    # ================================================================= run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.exit_code = loop.create_future()
        self.feeder = Feeder(
            self.settings,
            self.dsn,
            self.node,
            self.live_handles,
            self.raise_alarm,
            self.clear_alarm,
        )
        self.restarts = Restarts(self.workers, self.feeder, self.tasks, self.finish)
        if self.hooks is not None:
            await self.hooks.starting(self)  # binds --http: a port in use fails here, cleanly
        try:
            await self.feeder.open()
            await claim_node_id(self.feeder.queue, self.node, self.settings.lease_s)
        except BaseException:
            if self.hooks is not None:
                await self.hooks.stopped()  # close the HTTP server before the error goes up
            await self.feeder.close()
            raise
        queue = self.feeder.queue
        given_back = await queue.release_node(self.node)
        if given_back:
            log.info("gave back %d jobs held by a previous run of node %s", given_back, self.node)
        await queue.register_node(
            self.node,
            socket.gethostname(),
            os.getpid(),
            self.target,
            self.node_info(),
            kinds=self.settings.kinds,
        )
        self.workers.watch_zygote()
        self.life.install(loop)
        log.info(
            "node %s starting %d workers x %d slots",
            self.node,
            self.target,
            self.settings.concurrency,
        )
        for p in range(self.target):
            self.restarts.positions[p] = Position(p)
        self._start_loops()
        if self.hooks is not None:
            await self.hooks.started(self)
        code = await self.exit_code
        await self.life.shut_down()
        return code

    def _start_loops(self) -> None:
        f, stop, spawn = self.feeder, self.life.stop_event, self.tasks.spawn
        spawn(self.life.signal_loop(), "signals")
        spawn(self.monitor_loop(), "monitor")
        spawn(f.claim_loop(), "claim")
        spawn(f.writer.write_loop(stop), "write")
        spawn(upkeep.lease_loop(f, stop, self.node_info, self.set_api_rate), "lease")
        spawn(upkeep.reap_loop(f, stop), "reaper")
        spawn(f.listener.run(stop), "listen")

    def finish(self, code: int) -> None:
        if self.exit_code is not None and not self.exit_code.done():
            self.exit_code.set_result(code)

    def _task_crashed(self, name: str, exc: BaseException) -> None:
        log.error("supervisor task %s failed: %s: %s; shutting down", name, type(exc).__name__, exc)
        self.finish(EXIT_FAILED)

    # ========================================== what the lifecycle drives
    @property
    def stopping(self) -> bool:
        return self.workers.stopping

    @property
    def reloading(self) -> bool:
        return self.life.reloading

    @property
    def watchers(self) -> set[asyncio.Task[None]]:
        return self.workers.watchers

    def scale(self, delta: int) -> int:
        """TTIN, TTOU: one worker more (up to the shared block's room) or fewer (down to 1)."""
        if delta > 0:
            self.target = min(self.target + delta, self.block.max_workers)
        else:
            self.target = max(1, self.target + delta)
        return self.target

    def apply_settings(self, settings: Settings) -> None:
        """A HUP's settings: the next claims and writes, the next workers, the worker count."""
        self.settings = settings
        self.feeder.apply_settings(settings)
        self.target = settings.workers
        self.workers.apply_settings(settings)

    def begin_stop(self) -> None:
        self.workers.mark_stopping()

    def stop_workers(self) -> None:
        self.workers.stop_all()

    def kill_workers(self) -> None:
        self.workers.kill_all()

    def close_zygote(self) -> None:
        self.workers.close_zygote()

    # ==================================================== what workers say
    def live_handles(self) -> list[WorkerHandle]:
        return self.workers.live()

    def on_outcomes(self, h: WorkerHandle, outcomes: list[Outcome]) -> None:
        if log.isEnabledFor(logging.DEBUG):
            for o in outcomes:
                log.debug("job %d %s on worker %d%s", o.job_id, o.kind, h.position,
                          f": {o.error}" if o.error else "")  # fmt: skip
        self.feeder.on_outcomes(h, outcomes)
        if h.recycle_after and h.state is State.READY and h.jobs_finished() >= h.recycle_after:
            self.workers.recycle(h, f"served {h.jobs_finished()} jobs")

    def on_ready(self, h: WorkerHandle) -> None:
        self.feeder.slots_freed()
        self.feeder.publish.set()  # status shows the worker now, not at the next heartbeat

    async def on_exit(self, h: WorkerHandle, status: int) -> None:
        await self.restarts.settle(h, status)

    def on_zygote_lost(self) -> None:
        log.error("the zygote died: cannot fork workers any more; shutting down")
        self.finish(EXIT_FAILED)

    # ============================================================ monitor
    async def monitor_loop(self) -> None:
        last_title = 0.0
        while not self.stopping:
            now = self.monitored_at = time.monotonic()
            self.workers.check(now, self.restarts.progressed)
            self.restarts.keep(now, self.target)
            if now - last_title >= 1.0:
                last_title = now
                setproctitle(self.title())
            if self.restarts.crash_looping(self.target):
                log.error(
                    "every worker keeps crashing; giving up so the service manager can restart us"
                )
                self.finish(EXIT_CRASH_LOOP)
                return
            await asyncio.sleep(MONITOR_S)

    # ======================================================== what we show
    @property
    def degraded(self) -> bool:
        return self.restarts.degraded(self.target)

    @property
    def positions(self) -> dict[int, Position]:
        return self.restarts.positions

    @property
    def restarts_by_reason(self) -> dict[str, int]:
        return self.restarts.restarts_by_reason

    @property
    def stops_by_reason(self) -> dict[str, int]:
        return self.restarts.stops_by_reason

    def title(self) -> str:
        live = [h for h in self.live_handles() if h.state is State.READY]
        holdings = self.feeder.holdings
        flags = (" degraded" if self.degraded else "") + (" stopping" if self.stopping else "")
        flags += "" if self.feeder.db.ok else " db-down"
        return (
            f"genworker: supervisor node={self.node} workers={len(live)}/{self.target} "
            f"inflight={holdings.with_workers()} buffered={len(holdings.buffer)} "
            f"done={self.feeder.stats.succeeded}{flags}"
        )

    def raise_alarm(self, name: str, detail: str) -> None:
        """A worker's outcome says something is wrong with the node (bad key, no quota):
        pause claims, and let the alarms say so (one line when it starts)."""
        if name in ("bad_api_key", "insufficient_quota"):
            self.feeder.pause_claims(self.key_pause_s)
        if self.hooks is not None:
            self.hooks.alarm(name, detail)
            return
        if name not in self.alarms:
            log.error("API says %s (%s): pausing claims", name.replace("_", " "), detail[:200])
        self.alarms[name] = detail[:200]

    def clear_alarm(self, name: str) -> None:
        """The condition is over (the provider answers again)."""
        if self.hooks is not None:
            self.hooks.clear_alarm(name)
        elif self.alarms.pop(name, None) is not None:
            log.info("%s is over", name.replace("_", " "))

    def active_alarms(self) -> dict[str, str]:
        return self.hooks.active_alarms() if self.hooks is not None else dict(self.alarms)

    def node_info(self) -> dict[str, Any]:
        """What this node publishes in the nodes table (read by `genworker status`)."""
        return {
            "workers": [
                {
                    "position": h.position,
                    "pid": h.pid,
                    "state": str(h.state),
                    "inflight": len(h.jobs),
                    "limit": int(h.counter(ch.LIMIT)),
                }
                for h in self.live_handles()
            ],
            "target": self.target,
            "degraded": self.degraded,
            "alarms": self.active_alarms(),
            "http": None if self.hooks is None else self.hooks.address,
            "db_ok": self.feeder.db.ok,
            "totals": self.totals(),
            "restarts": dict(self.restarts_by_reason),
        }

    @property
    def retired(self) -> list[float]:
        return self.workers.retired

    def totals(self) -> dict[str, float]:
        """Counters of every worker this node ran, live and gone."""
        return self.workers.totals()


async def claim_node_id(queue: Queue, node: str, lease_s: float) -> None:
    """Refuse a node id another live supervisor runs under: both would renew (and give
    back) each other's jobs. A previous life of this node id that died is fine: its
    jobs come back at once."""
    why = node_id_in_use(node, await queue.node_row(node), lease_s)
    if why:
        raise UsageError(why)


def check_node_id(conn: psycopg.Connection[Any], node: str, lease_s: float) -> None:
    """claim_node_id before the node launches anything (boot): the same verdict, on the
    connection that migrated. The arbiter asks again: two starts may race."""
    row = conn.execute(sql.query("node_row"), {"node": node}).fetchone()
    parsed = None if row is None else (row[0], row[1], row[2], float(row[3]))
    why = node_id_in_use(node, parsed, lease_s)
    if why:
        raise UsageError(why)


def node_id_in_use(
    node: str, row: tuple[str, int, str, float] | None, lease_s: float
) -> str | None:
    """Why another live supervisor holds this node id, given its nodes row; None if free."""
    if row is None or row[2] != "alive":
        return None
    host, pid, _, silent_s = row
    here = socket.gethostname()
    if host == here and pid != os.getpid() and _is_supervisor(pid):
        return (
            f"node id {node!r} is in use by the supervisor with pid {pid} on this "
            "host (a node already runs here): give each supervisor its own --node-id"
        )
    if host != here and silent_s < lease_s:
        return (
            f"node id {node!r} is alive on host {host} (heard of {silent_s:.0f}s ago): "
            "give each supervisor its own --node-id"
        )
    return None


def run_coroutine(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop

    return uvloop.run(coro)


def _is_supervisor(pid: int) -> bool:
    """Is pid a live genworker supervisor (not a recycled pid of something else)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().startswith(b"genworker: supervisor")
    except OSError:
        return False
