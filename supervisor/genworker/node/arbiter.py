"""The supervisor process: fork workers (through the zygote), watch them, restart
them. What each signal does is in signals.py; the order of a shutdown in shutdown.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import pickle
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from setproctitle import setproctitle

from genworker import channels as ch
from genworker.background import TaskOwner
from genworker.config import Settings
from genworker.errors import UsageError
from genworker.model import Job
from genworker.node import signals, upkeep
from genworker.node.feeder import Feeder
from genworker.node.handles import BOOT_TIMEOUT_S, Position, State, WorkerHandle
from genworker.node.shutdown import shut_down
from genworker.node.zygote import ZygoteHandle, describe_exit
from genworker.ops.alarms import parse_limits
from genworker.worker.process import EXIT_BOOT, EXIT_RECYCLE

log = logging.getLogger("genworker.arbiter")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BOOT_FAILED = 3  # a worker could not start: fix the configuration
EXIT_CRASH_LOOP = 6  # every worker keeps dying: let systemd's restart policy take over

MONITOR_S = 0.25
KILL_GRACE_S = 2.0
CHANNEL_EOF_S = 1.0  # after a worker's exit, how long its channel may take to deliver the rest


class Arbiter:
    def __init__(
        self,
        settings: Settings,
        *,
        dsn: str,
        zygote: ZygoteHandle,
        block: ch.SharedBlock,
        reload_settings: Callable[[], Settings] | None = None,
        hooks: Any = None,
        bucket: Any = None,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.node = settings.resolved_node_id
        self.zygote = zygote
        self.block = block
        self.reload_settings = reload_settings
        self.hooks = hooks  # observability (metrics, sd_notify); optional
        self.bucket = bucket  # the host's API token bucket; this process sets its rate
        self.target = settings.workers
        self.handles: list[WorkerHandle] = []
        self.by_pid: dict[int, WorkerHandle] = {}
        self.positions: dict[int, Position] = {}
        self.generations = itertools.count(1)
        self.retired = [0.0] * ch.SLOT_DOUBLES  # counters of workers that are gone
        self.restarts_by_reason: dict[str, int] = {}  # crashes: exit, signal, heartbeat_timeout
        self.stops_by_reason: dict[str, int] = {}  # planned replacements: recycle, reload
        self.alarms: dict[str, str] = {}  # without hooks; with them, the hooks keep the alarms
        self.stopping = False
        self.immediate = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.exit_code: asyncio.Future[int] | None = None
        self.signals: asyncio.Queue[int] = asyncio.Queue()
        self.tasks = TaskOwner(on_crash=self._task_crashed)
        self.reloading = False
        self.zygote_lost = False
        self.watchers: set[asyncio.Task[None]] = set()  # one per worker: its death is settled
        self.spawning: set[int] = set()
        self.started_at = time.monotonic()
        # a rejected API key pauses claims this long, then one job probes it
        self.key_pause_s = parse_limits(settings.alarms).bad_api_key_pause_s
        self.monitored_at = time.monotonic()  # the monitor's last round (the watchdog's health)

    # ================================================================= run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.exit_code = loop.create_future()
        self.feeder = Feeder(
            self.settings, self.dsn, self.node, self.live_handles, self.raise_alarm
        )
        self.feeder.bucket = self.bucket
        if self.hooks is not None:
            await self.hooks.starting(self)  # binds --http: a port in use fails here, cleanly
        try:
            await self.feeder.open()
            await self._claim_node_id()
        except BaseException:
            if self.hooks is not None:
                await self.hooks.stopped()  # close the HTTP server before the error goes up
            await self.feeder.close()
            raise
        given_back = await self.feeder.queue.release_node(self.node)
        if given_back:
            log.info("gave back %d jobs held by a previous run of node %s", given_back, self.node)
        await self.feeder.queue.register_node(
            self.node, socket.gethostname(), os.getpid(), self.target, self.node_info()
        )
        loop.add_reader(self.zygote.sock.fileno(), self._on_zygote)
        for sig in signals.HANDLERS:
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        log.info(
            "node %s starting %d workers x %d slots",
            self.node,
            self.target,
            self.settings.concurrency,
        )
        for p in range(self.target):
            self.positions[p] = Position(p)
        self.tasks.spawn(self.signal_loop(), "signals")
        self.tasks.spawn(self.monitor_loop(), "monitor")
        self.tasks.spawn(self.feeder.claim_loop(), "claim")
        self.tasks.spawn(self.feeder.write_loop(self.stop_event), "write")
        self.tasks.spawn(upkeep.lease_loop(self.feeder, self.stop_event, self.node_info), "lease")
        self.tasks.spawn(upkeep.reap_loop(self.feeder, self.stop_event), "reaper")
        self.tasks.spawn(self.feeder.listener.run(self.stop_event), "listen")
        if self.hooks is not None:
            await self.hooks.started(self)
        code = await self.exit_code
        await shut_down(self)
        return code

    async def _claim_node_id(self) -> None:
        """Refuse a node id another live supervisor runs under: both would renew (and give
        back) each other's jobs. A previous life of this node id that died is fine: its
        jobs come back at once."""
        row = await self.feeder.queue.node_row(self.node)
        if row is None or row[2] != "alive":
            return
        host, pid, _, silent_s = row
        here = socket.gethostname()
        if host == here and pid != os.getpid() and _is_supervisor(pid):
            raise UsageError(
                f"node id {self.node!r} is in use by the supervisor with pid {pid} on this "
                "host: give each supervisor its own --node-id"
            )
        if host != here and silent_s < self.settings.lease_s:
            raise UsageError(
                f"node id {self.node!r} is alive on host {host} (heard of {silent_s:.0f}s ago): "
                "give each supervisor its own --node-id"
            )

    def finish(self, code: int) -> None:
        if self.exit_code is not None and not self.exit_code.done():
            self.exit_code.set_result(code)

    def _task_crashed(self, name: str, exc: BaseException) -> None:
        log.error("supervisor task %s failed: %s: %s; shutting down", name, type(exc).__name__, exc)
        self.finish(EXIT_FAILED)

    # ============================================================ workers
    def live_handles(self) -> list[WorkerHandle]:
        return [h for h in self.handles if h.state is not State.DEAD]

    def _free_slot(self, position: int) -> int:
        used = {h.slot for h in self.handles}
        if position not in used and position < self.block.max_workers:
            return position
        for i in range(self.block.max_workers):
            if i not in used:
                return i
        raise RuntimeError("no free shared-memory slot for a worker")

    async def spawn(self, position: int) -> None:
        slot = self._free_slot(position)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        h = WorkerHandle(
            position, slot, next(self.generations), ours, self.block, self.settings.concurrency
        )
        if self.settings.max_jobs_per_worker:
            jitter = 1 + 0.1 * (hash((slot, h.generation)) % 100) / 100
            h.recycle_after = int(self.settings.max_jobs_per_worker * jitter)
        self.handles.append(h)
        try:
            self.zygote.spawn(slot, h.generation, theirs.fileno(), position)
        except OSError:
            self.handles.remove(h)  # never started: no watcher would ever retire it
            ours.close()
            raise
        finally:
            theirs.close()
        h.attach(
            await ch.open_channel(
                ours, functools.partial(self._on_message, h), functools.partial(self._on_closed, h)
            )
        )
        watcher = self.tasks.spawn(self._watch(h), f"watch worker {position}", critical=False)
        self.watchers.add(watcher)
        watcher.add_done_callback(self.watchers.discard)

    def _on_message(self, h: WorkerHandle, msg: tuple[str, Any]) -> None:
        kind, body = msg
        if kind == ch.DONE:
            if log.isEnabledFor(logging.DEBUG):
                for o in body:
                    log.debug("job %d %s on worker %d%s", o.job_id, o.kind, h.position,
                              f": {o.error}" if o.error else "")  # fmt: skip
            self.feeder.on_outcomes(h, body)
            if h.recycle_after and h.state is State.READY and h.jobs_finished() >= h.recycle_after:
                self.recycle(h, f"served {h.jobs_finished()} jobs")
        elif kind == ch.READY:
            h.pid = h.pid or int(body)
            self.by_pid.setdefault(h.pid, h)
            if h.state is State.SPAWNING:
                h.state = State.READY
                h.ready_at = time.monotonic()
                self.feeder.dispatch()
                self.feeder.wake.set()

    def _on_closed(self, h: WorkerHandle, exc: Exception | None) -> None:
        h.channel_closed.set()
        # The process may still be alive (it closed its end): make sure it goes.
        if h.state is not State.DEAD and h.pid is not None:
            asyncio.get_running_loop().call_later(1.0, self.kill, h, signal.SIGKILL)

    def _on_zygote(self) -> None:
        while True:
            try:
                data = self.zygote.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                asyncio.get_running_loop().remove_reader(self.zygote.sock.fileno())
                if not self.stopping:
                    log.error("the zygote died: cannot fork workers any more; shutting down")
                    self.finish(EXIT_FAILED)
                self._zygote_gone()
                return
            msg = pickle.loads(data)
            if msg[0] == "spawned":
                _, slot, gen, pid = msg
                for h in self.handles:
                    if h.slot == slot and h.generation == gen:
                        h.pid = pid
                        self.by_pid[pid] = h
                        if self.stopping and h.ready_at is None:
                            self.kill(h, signal.SIGTERM)  # asked for before the stop
            elif msg[0] == "exited":
                gone = self.by_pid.pop(msg[1], None)
                if gone is not None and not gone.exited.done():
                    gone.exited.set_result(msg[2])

    def _zygote_gone(self) -> None:
        """The zygote reaped our workers and reported their exits; with it gone, nobody will.
        Its workers die with it (PDEATHSIG): make sure of it, and settle them here, so their
        jobs go back now rather than when their leases expire."""
        self.zygote_lost = True
        for h in self.live_handles():
            h.lost_reason = "its zygote died"
            self.kill(h, signal.SIGKILL)
            if not h.exited.done():
                h.exited.set_result(signal.SIGKILL)  # a wait status: killed by SIGKILL

    async def _watch(self, h: WorkerHandle) -> None:
        status = await h.exited
        text, code, sig = describe_exit(status)
        text = h.lost_reason or text
        if h.chan is not None:
            # Its last outcomes may still be in the socket: read up to the EOF (it comes at
            # once, the process is gone) before deciding which jobs it still held.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(h.channel_closed.wait(), CHANNEL_EOF_S)
        progressed = h.jobs_finished() > 0
        lived_s = 0.0 if h.ready_at is None else time.monotonic() - h.ready_at
        running = self._running_ids(h)
        jobs = self._retire(h)
        # Everything below that decides the restart runs before the first await: the
        # monitor must not see a free position whose backoff is not recorded yet.
        if code == EXIT_BOOT and h.ready_at is None and h.lost_reason is None:
            log.error(
                "worker %d cannot start (see its message above); stopping the node", h.position
            )
            self.finish(EXIT_BOOT_FAILED)
            await self.feeder.release(jobs, None)
            return
        planned = h.stop_reason is not None and h.kill_reason is None and code in (0, EXIT_RECYCLE)
        reason = h.kill_reason or text
        if planned:
            log.info("worker %d (pid %s) stopped: %s", h.position, h.pid, h.stop_reason)
            if h.stop_reason in ("recycle", "reload"):
                self.stops_by_reason[h.stop_reason] = self.stops_by_reason.get(h.stop_reason, 0) + 1
            if jobs:
                log.warning("worker %d left %d jobs unfinished", h.position, len(jobs))
            self.positions.get(h.position, Position(h.position)).record_clean_exit()
        elif (self.stopping or self.zygote_lost) and h.kill_reason is None:
            log.info(
                "worker %d (pid %s) %s during shutdown; %d jobs given back",
                h.position,
                h.pid,
                text,
                len(jobs),
            )
        else:
            # only the jobs it was running take a death: those queued behind its busy slots,
            # or still on their way to it, never started
            ran = [j for j in jobs if running is None or j.job_id in running]
            self._record_death(h, reason, sig, progressed, lived_s, len(jobs), len(ran))
            if len(ran) < len(jobs):
                await self.feeder.release([j for j in jobs if j not in ran], None)
            await self.feeder.release(ran, reason)
            return
        await self.feeder.release(jobs, None)  # not their fault: no death counted

    def _running_ids(self, h: WorkerHandle) -> set[int] | None:
        """The jobs a (dead) worker was running, from its slot; None when it did not keep
        the list (concurrency above the slot's room: then every held job counts)."""
        if h.max_limit > ch.RUNNING_PLACES:  # its own concurrency: a HUP may have changed ours
            return None
        places = h.view[ch.RUNNING0 : ch.RUNNING0 + ch.RUNNING_PLACES]
        return {int(v) for v in places.tolist() if v > 0}

    def _retire(self, h: WorkerHandle) -> list[Job]:
        """Forget a dead worker: close its channel, keep its counters, free its slot; returns
        the jobs it still held."""
        h.state = State.DEAD
        if h.chan is not None:
            h.chan.close()
        with contextlib.suppress(OSError):
            h.sock.close()
        slot = self.block.slot(h.slot)
        for i in ch.COUNTER_FIELDS.values():
            self.retired[i] += slot[i]
        for i in range(ch.LATENCY_BUCKET0, ch.LATENCY_BUCKET0 + len(ch.LATENCY_BUCKETS_S)):
            self.retired[i] += slot[i]
        ch.clear_slot(slot)
        self.handles.remove(h)
        self.by_pid.pop(h.pid or 0, None)
        jobs = list(h.jobs.values())
        h.jobs.clear()
        return jobs

    def _record_death(
        self,
        h: WorkerHandle,
        reason: str,
        sig: int | None,
        progressed: bool,
        lived_s: float,
        n_jobs: int,
        n_running: int,
    ) -> None:
        pos = self.positions.setdefault(h.position, Position(h.position))
        delay = pos.record_death(progressed, lived_s=lived_s)
        key = "heartbeat_timeout" if h.kill_reason else ("signal" if sig else "exit")
        self.restarts_by_reason[key] = self.restarts_by_reason.get(key, 0) + 1
        log.warning(
            "worker %d (pid %s) died: %s; %d jobs back in the queue (%d were running); "
            "restarting in %.1fs%s",
            h.position,
            h.pid,
            reason,
            n_jobs,
            n_running,
            delay,
            " (crash loop: held back, node degraded)" if pos.held_back else "",
        )

    def kill(self, h: WorkerHandle, sig: int) -> None:
        if h.state is State.DEAD or h.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(h.pid, sig)

    def recycle(self, h: WorkerHandle, why: str) -> None:
        """Replace a worker gracefully: the monitor starts its successor at once."""
        log.info("recycling worker %d (pid %s): %s", h.position, h.pid, why)
        h.ask_stop("recycle")

    # ============================================================ monitor
    async def monitor_loop(self) -> None:
        last_title = 0.0
        while not self.stopping:
            now = self.monitored_at = time.monotonic()
            self._check_workers(now)
            self._keep_positions(now)
            if now - last_title >= 1.0:
                last_title = now
                setproctitle(self.title())
            if self.positions and all(
                p.held_back for i, p in self.positions.items() if i < self.target
            ):
                log.error(
                    "every worker keeps crashing; giving up so the service manager can restart us"
                )
                self.finish(EXIT_CRASH_LOOP)
                return
            await asyncio.sleep(MONITOR_S)

    def _check_workers(self, now: float) -> None:
        timeout = self.settings.worker_timeout_s
        max_rss = self.settings.max_worker_memory_mb * 1024 * 1024
        for h in self.live_handles():
            if h.state is State.SPAWNING:
                if now - h.spawned_at > BOOT_TIMEOUT_S and h.kill_reason is None:
                    h.kill_reason = f"did not start within {BOOT_TIMEOUT_S:.0f}s"
                    self.kill(h, signal.SIGKILL)
                continue
            if h.jobs_finished() > 0:
                self.positions.setdefault(h.position, Position(h.position)).record_progress()
            age = now - h.counter(ch.HEARTBEAT)
            if age > timeout and h.kill_reason is None:
                h.kill_reason = f"heartbeat timeout: no sign of life for {age:.0f}s"
                log.warning(
                    "worker %d (pid %s) unresponsive for %.0fs: terminating", h.position, h.pid, age
                )
                self.kill(h, signal.SIGTERM)
                asyncio.get_running_loop().call_later(KILL_GRACE_S, self.kill, h, signal.SIGKILL)
            elif h.state is State.READY and max_rss and h.counter(ch.RSS) > max_rss:
                self.recycle(h, f"RSS {h.counter(ch.RSS) / 2**20:.0f} MB over --max-worker-memory")

    def _keep_positions(self, now: float) -> None:
        if self.zygote_lost:
            return
        active = {
            h.position for h in self.live_handles() if h.state in (State.SPAWNING, State.READY)
        }
        for p in range(self.target):
            pos = self.positions.setdefault(p, Position(p))
            if p not in active and p not in self.spawning and now >= pos.next_start:
                self.spawning.add(p)
                self.tasks.spawn(self._spawn_position(p), f"spawn {p}", critical=False)
        for h in self.live_handles():
            if h.position >= self.target and h.state in (State.SPAWNING, State.READY):
                h.ask_stop("scale down")

    async def _spawn_position(self, p: int) -> None:
        try:
            if not self.stopping:
                await self.spawn(p)
        finally:
            self.spawning.discard(p)

    @property
    def degraded(self) -> bool:
        return any(p.held_back for i, p in self.positions.items() if i < self.target)

    def title(self) -> str:
        live = [h for h in self.live_handles() if h.state is State.READY]
        inflight = sum(len(h.jobs) for h in self.live_handles())
        flags = (" degraded" if self.degraded else "") + (" stopping" if self.stopping else "")
        flags += "" if self.feeder.db_ok else " db-down"
        return (
            f"genworker: supervisor node={self.node} workers={len(live)}/{self.target} "
            f"inflight={inflight} buffered={len(self.feeder.buffer)} "
            f"done={self.feeder.stats.succeeded}{flags}"
        )

    # ============================================================= alarms
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

    def active_alarms(self) -> dict[str, str]:
        return self.hooks.active_alarms() if self.hooks is not None else dict(self.alarms)

    # ============================================================ signals
    async def signal_loop(self) -> None:
        await signals.signal_loop(self)

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
            "http": getattr(self.hooks, "address", None),
            "db_ok": self.feeder.db_ok,
            "totals": self.totals(),
            "restarts": dict(self.restarts_by_reason),
        }

    def totals(self) -> dict[str, float]:
        """Counters of every worker this node ran, live and gone."""
        out = {}
        for name, i in ch.COUNTER_FIELDS.items():
            out[name] = self.retired[i] + sum(h.counter(i) for h in self.live_handles())
        return out


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
