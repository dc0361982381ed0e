"""Operations of one node: /metrics, /healthz, /readyz, the alarms and sd_notify.

`Ops` is the Arbiter's `hooks` object; the Arbiter calls it at these points:

  starting(arbiter)      before the database is opened: bind --http (a port in use
                         ends the start with one line and a non-zero exit)
  started(arbiter)       its loops run: start the tick, the database figures, STATUS/WATCHDOG
  alarm(name, detail)    a worker's outcome says the key is bad or the quota spent, or
                         the node's calls stopped reaching the provider
  clear_alarm(name)      ... and the provider answers again
  reloading(), reloaded()  around the rolling restart of a HUP
  stopping(arbiter), draining(seconds_left), stopped()  shutdown

Every second the tick samples the counters, feeds the alarms, and sends READY=1 the
first time the database is reachable and every worker is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from aiohttp import web

from genworker.background import TaskOwner
from genworker.config import ConfigError, Settings
from genworker.logs import Redactor
from genworker.ops import systemd
from genworker.ops.alarms import (
    Alarms,
    ErrorRate,
    SlidingWindow,
    default_alarms,
    low_disk_alarm,
    parse_limits,
)
from genworker.ops.http import Readiness, assess_readiness, make_app, serve
from genworker.ops.metrics import DB_WAIT_BUCKETS_S, GenworkerMetrics
from genworker.ops.readings import (
    API_CALLS,
    API_OVERLOAD,
    CRASHES,
    READY,
    DbFigures,
    Feeding,
    Node,
    PoolWaits,
    Worker,
    collect_figures,
    collect_node,
    collect_pool,
)

log = logging.getLogger("genworker.ops")

TICK_S = 1.0
STATUS_S = 3.0  # systemd's STATUS= line
HEALTHY_S = 5.0  # the supervisor's monitor ran within this long: the watchdog may be pinged
EXTEND_EVERY_S = 5.0  # a drain longer than this asks systemd for more time, this often
STOP_TAIL_S = 20.0  # after the drain: workers killed (5 s), the last outcomes written (15 s)
KEY_ALARMS = ("bad_api_key", "insufficient_quota")


class HeldBack(Protocol):
    @property
    def held_back(self) -> bool: ...


class NodeView(Node, Protocol):
    """What ops reads of the supervisor (node.arbiter.Arbiter); it writes nothing there."""

    @property
    def settings(self) -> Settings: ...
    @property
    def tasks(self) -> TaskOwner: ...
    @property
    def feeder(self) -> Feeding: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def reloading(self) -> bool: ...
    @property
    def degraded(self) -> bool: ...
    @property
    def positions(self) -> Mapping[int, HeldBack]: ...
    @property
    def monitored_at(self) -> float: ...

    def live_handles(self) -> Sequence[Worker]: ...


class Ops:
    def __init__(
        self,
        settings: Settings,
        *,
        redactor: Redactor | None = None,
        http_socket: socket.socket | None = None,
    ) -> None:
        self.settings = settings
        self.http_socket = http_socket  # bound by boot before it launched anything
        limits = parse_limits(settings.alarms)
        self.metrics = GenworkerMetrics()
        self.alarms = Alarms([*default_alarms(limits), low_disk_alarm(settings.min_free_disk_mb)])
        self.errors = ErrorRate(limits.window_s)
        self.restarts = SlidingWindow(limits.window_s)
        self.db_waits = SlidingWindow(limits.db_window_s)
        self.pool_waits = PoolWaits.for_buckets(len(DB_WAIT_BUCKETS_S))
        self.figures = DbFigures()
        self.notifier = systemd.Notifier(STATUS_S)
        self.redactor = redactor or Redactor()
        self.arbiter: NodeView | None = None
        self.runner: web.AppRunner | None = None
        self.address: str | None = None
        self.stop = asyncio.Event()
        self.last: dict[str, float] = {}
        self.ready_sent = False
        self.drain_started: float | None = None
        self.last_extend = 0.0
        self.tick_failed = False

    # ========================================================== the hooks
    async def starting(self, arbiter: NodeView) -> None:
        self.arbiter = arbiter
        self.runner = await serve(make_app(self), self.settings.http, self.http_socket)
        if self.runner is not None:
            host, port = self.runner.addresses[0][:2]
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def started(self, arbiter: NodeView) -> None:
        arbiter.tasks.spawn(self.tick_loop(), "ops tick", critical=False)
        arbiter.tasks.spawn(self.figures.loop(arbiter.feeder.pool, self.stop), "ops figures",
                            critical=False)  # fmt: skip
        arbiter.tasks.spawn(
            self.notifier.run(self.stop, self.status_line, self.healthy),
            "sd_notify",
            critical=False,
        )

    def alarm(self, name: str, detail: str) -> None:
        """A worker's outcome raised a node-level alarm (bad key, spent quota)."""
        if name not in self.alarms.states():
            log.warning("unknown alarm %s from a worker: %s", name, self.redactor(detail[:200]))
            return
        why = self.redactor(" ".join(detail.split())[:200])
        self.alarms.update(name, 1.0, time.monotonic(), detail=f"{why} (claims paused)")

    def clear_alarm(self, name: str) -> None:
        """A node-level condition is over (the provider answers again)."""
        self.alarms.update(name, 0.0, time.monotonic())

    def reloading(self) -> None:
        with contextlib.suppress(ConfigError):  # a new key file: hide the new key too
            self.redactor.add(self._node().settings.resolved_api_key())
        systemd.reloading(self.status_line())

    def reloaded(self) -> None:
        if self.ready_sent:
            systemd.ready(self.status_line())

    def stopping(self, arbiter: object) -> None:
        self.drain_started = time.monotonic()
        systemd.stopping(self.status_line())

    def draining(self, seconds_left: float) -> None:
        now = time.monotonic()
        if self.drain_started is None or now - self.drain_started < EXTEND_EVERY_S:
            return  # a short drain needs nothing from systemd
        if now - self.last_extend >= EXTEND_EVERY_S:
            self.last_extend = now
            systemd.extend_timeout(max(0.0, seconds_left) + STOP_TAIL_S)

    async def stopped(self) -> None:
        self.stop.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def active_alarms(self) -> dict[str, str]:
        return self.alarms.active()

    # ============================================================ the tick
    async def tick_loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.tick(time.monotonic())
            except Exception:  # a bug here must not end the alarms for good: say it once
                if not self.tick_failed:
                    log.exception("the ops tick failed (alarms may be stale)")
                self.tick_failed = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), TICK_S)

    def tick(self, now: float) -> None:
        a = self._node()
        counts = dict(a.totals())
        counts["crashes"] = sum(a.restarts_by_reason.get(r, 0) for r in CRASHES)
        d = self._deltas(counts)
        self.errors.record_counts(
            now, sum(d[k] for k in API_CALLS), sum(d[k] for k in API_OVERLOAD)
        )
        if d["api_2xx"] > 0:
            for name in KEY_ALARMS:
                self.alarms.update(name, 0.0, now)
        if d["crashes"] > 0:
            self.restarts.add(now, d["crashes"])
        wait_s = self.pool_waits.sample(a.feeder.pool.get_stats(), now, DB_WAIT_BUCKETS_S)
        self.db_waits.add(now, wait_s)
        if self.figures.at is not None:
            self.alarms.update("queue_depth", self.figures.queued_tasks, now)
        self.alarms.update("api_error_rate", self.errors.ratio(now), now)
        self.alarms.update("db_wait", self.db_waits.max(now), now)
        self.alarms.update("worker_restarts", self.restarts.sum(now), now)
        self.check_disk(now)
        self.alarms.tick(now)
        if not self.ready_sent and self._all_up():
            self.ready_sent = True
            line = self.status_line()
            log.info("ready: %s", line)
            systemd.ready(line)

    def check_disk(self, now: float) -> None:
        """Feed low_disk with what --output-dir's free space lacks (statvfs: cheap)."""
        need = self.settings.min_free_disk_mb
        if not need:
            return
        out = self.settings.resolved_output_dir
        try:
            free_mb = shutil.disk_usage(out).free / 2**20
        except OSError:
            return  # a missing dir fails the writes, which say so
        why = f"{free_mb:.0f} MB free in {out}, under --min-free-disk {need} MB"
        self.alarms.update("low_disk", need - free_mb, now, detail=why)

    def _deltas(self, counts: dict[str, float]) -> dict[str, float]:
        """How much each counter grew since the last tick (0 at the first)."""
        out = {k: max(0.0, v - self.last.get(k, v)) for k, v in counts.items()}
        self.last = counts
        return out

    def _all_up(self) -> bool:
        a = self._node()
        return bool(
            a.feeder.db_ok and not a.stopping and not a.reloading and self.workers_up() >= a.target
        )

    def healthy(self) -> bool:
        """The watchdog may be pinged: the supervisor's monitor is going round."""
        a = self._node()
        return bool(a.stopping or time.monotonic() - a.monitored_at < HEALTHY_S)

    # ======================================================= what we show
    def _node(self) -> NodeView:
        assert self.arbiter is not None, "starting() gives ops its node first"
        return self.arbiter

    def workers_up(self) -> int:
        a = self._node()
        return sum(1 for h in a.live_handles() if h.state == READY and h.position < a.target)

    def readiness(self) -> Readiness:
        a = self.arbiter
        if a is None:
            return False, ["starting"]
        degraded = None
        if a.degraded:
            held = sum(1 for i, p in a.positions.items() if i < a.target and p.held_back)
            degraded = f"{held} crash-looping workers held back"
        ready, reasons = assess_readiness(
            database_ok=a.feeder.db_ok,
            database_problem=a.feeder.db_problem,
            workers_up=self.workers_up(),
            workers=a.target,
            degraded=degraded,
            alarms=self.alarms.active(),
        )
        if a.stopping:
            ready, reasons = False, ["stopping", *reasons]
        return ready, reasons

    def status_line(self) -> str:
        a = self._node()
        st = a.feeder.stats
        inflight = sum(len(h.jobs) for h in a.live_handles())
        parts = [
            f"{self.workers_up()}/{a.target} workers",
            f"{inflight} jobs in flight",
            f"{st.succeeded} done",
            f"{st.dead} dead",
        ]
        if not a.feeder.db_ok:
            parts.append(f"database {a.feeder.db_problem}")
        if a.degraded:
            parts.append("degraded")
        alarms = self.alarms.summary()
        if alarms:
            parts.append(alarms)
        state = "stopping: " if a.stopping else "reloading: " if a.reloading else ""
        return self.redactor(state + ", ".join(parts))

    def metrics_text(self) -> str:
        """The /metrics body: memory only (the database figures are a few seconds old)."""
        m, a = self.metrics, self.arbiter
        if a is not None:
            collect_node(m, a, a.feeder)
        collect_figures(m, self.figures, (p.name for p in self.settings.plans))
        collect_pool(m, self.pool_waits)
        m.ready.set(int(self.readiness()[0]))
        m.alarm_active.replace({(name,): int(on) for name, on in self.alarms.states().items()})
        return m.render()
