"""The node's worker processes: forked by the zygote, heard through their channels,
killed, and retired when they are gone (their counters kept, their slot freed).

What a worker's exit means (a planned stop, a death, a boot failure) is the arbiter's
to decide: it is told through `WorkerEvents`.
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
from collections.abc import Callable
from typing import Any, Protocol

from genworker import channels as ch
from genworker.background import TaskOwner
from genworker.config import Settings
from genworker.model import Outcome
from genworker.node.handles import BOOT_TIMEOUT_S, State, WorkerHandle
from genworker.node.zygote import ZygoteHandle

log = logging.getLogger("genworker.arbiter")

KILL_GRACE_S = 2.0  # after a stuck worker's SIGTERM, its SIGKILL
CHANNEL_EOF_S = 1.0  # after a worker's exit, how long its channel may take to deliver the rest


class WorkerEvents(Protocol):
    """What the arbiter hears of its workers."""

    def on_outcomes(self, h: WorkerHandle, outcomes: list[Outcome]) -> None: ...
    def on_ready(self, h: WorkerHandle) -> None: ...
    def on_zygote_lost(self) -> None: ...
    async def on_exit(self, h: WorkerHandle, status: int) -> None: ...


class Workers:
    def __init__(
        self,
        settings: Settings,
        zygote: ZygoteHandle,
        block: ch.SharedBlock,
        tasks: TaskOwner,
        events: WorkerEvents,
    ) -> None:
        self.settings = settings
        self.zygote = zygote
        self.block = block
        self.tasks = tasks
        self.events = events
        self.handles: list[WorkerHandle] = []
        self.by_pid: dict[int, WorkerHandle] = {}
        self.generations = itertools.count(1)
        self.retired = [0.0] * ch.SLOT_DOUBLES  # counters of workers that are gone
        self.watchers: set[asyncio.Task[None]] = set()  # one per worker: its death is settled
        self.stopping = False
        self.zygote_lost = False

    def apply_settings(self, settings: Settings) -> None:
        self.settings = settings  # the next workers' concurrency and recycling
        self.zygote.send_settings(settings)

    def live(self) -> list[WorkerHandle]:
        return [h for h in self.handles if h.state is not State.DEAD]

    # ============================================================ starting
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
            self.events.on_outcomes(h, body)
        elif kind == ch.READY:
            h.pid = h.pid or int(body)
            self.by_pid.setdefault(h.pid, h)
            if h.state is State.SPAWNING:
                h.state = State.READY
                h.ready_at = time.monotonic()
                self.events.on_ready(h)

    def _on_closed(self, h: WorkerHandle, exc: Exception | None) -> None:
        h.channel_closed.set()
        # The process may still be alive (it closed its end): make sure it goes.
        if h.state is not State.DEAD and h.pid is not None:
            asyncio.get_running_loop().call_later(1.0, self.kill, h, signal.SIGKILL)

    # ============================================================= the zygote
    def watch_zygote(self) -> None:
        asyncio.get_running_loop().add_reader(self.zygote.sock.fileno(), self._on_zygote)

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
                    self.events.on_zygote_lost()
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
        for h in self.live():
            h.lost_reason = "its zygote died"
            self.kill(h, signal.SIGKILL)
            if not h.exited.done():
                h.exited.set_result(signal.SIGKILL)  # a wait status: killed by SIGKILL

    def close_zygote(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # gone already if the zygote died
            asyncio.get_running_loop().remove_reader(self.zygote.sock.fileno())
        self.zygote.close()

    def check(self, now: float, on_progress: Callable[[WorkerHandle], None]) -> None:
        """Kill a worker that never booted or stopped beating; recycle one that grew too
        big; tell `on_progress` of each that has finished a job."""
        timeout = self.settings.worker_timeout_s
        max_rss = self.settings.max_worker_memory_mb * 1024 * 1024
        kill = self.kill
        for h in self.live():
            if h.state is State.SPAWNING:
                if now - h.spawned_at > BOOT_TIMEOUT_S and h.kill_reason is None:
                    h.kill_reason = f"did not start within {BOOT_TIMEOUT_S:.0f}s"
                    kill(h, signal.SIGKILL)
                continue
            if h.jobs_finished() > 0:
                on_progress(h)
            age = now - h.counter(ch.HEARTBEAT)
            if age > timeout and h.kill_reason is None:
                h.kill_reason = f"heartbeat timeout: no sign of life for {age:.0f}s"
                log.warning(
                    "worker %d (pid %s) unresponsive for %.0fs: terminating", h.position, h.pid, age
                )
                kill(h, signal.SIGTERM)
                asyncio.get_running_loop().call_later(KILL_GRACE_S, kill, h, signal.SIGKILL)
            elif h.state is State.READY and max_rss and h.counter(ch.RSS) > max_rss:
                self.recycle(h, f"RSS {h.counter(ch.RSS) / 2**20:.0f} MB over --max-worker-memory")

    # ============================================================ stopping
    def kill(self, h: WorkerHandle, sig: int) -> None:
        if h.state is State.DEAD or h.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(h.pid, sig)

    def recycle(self, h: WorkerHandle, why: str) -> None:
        """Replace a worker gracefully: the monitor starts its successor at once."""
        log.info("recycling worker %d (pid %s): %s", h.position, h.pid, why)
        h.ask_stop("recycle")

    def mark_stopping(self) -> None:
        """The node is stopping: no worker is started or restarted any more."""
        self.stopping = True

    def stop_all(self) -> None:
        """Shutdown: every worker is asked to finish what it holds and leave."""
        for h in self.live():
            if h.state is State.SPAWNING:
                self.kill(h, signal.SIGTERM)  # holds no job: no need to wait for its boot
            h.ask_stop("shutdown")

    def kill_all(self) -> None:
        for h in self.live():
            self.kill(h, signal.SIGKILL)

    # ============================================================== exits
    async def _watch(self, h: WorkerHandle) -> None:
        status = await h.exited
        if h.chan is not None:
            # Its last outcomes may still be in the socket: read up to the EOF (it comes at
            # once, the process is gone) before deciding which jobs it still held.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(h.channel_closed.wait(), CHANNEL_EOF_S)
        await self.events.on_exit(h, status)

    def running_ids(self, h: WorkerHandle) -> set[int] | None:
        """The jobs a (dead) worker was running, from its slot; None when it did not keep
        the list (concurrency above the slot's room: then every held job counts)."""
        if h.max_limit > ch.RUNNING_PLACES:  # its own concurrency: a HUP may have changed ours
            return None
        places = h.view[ch.RUNNING0 : ch.RUNNING0 + ch.RUNNING_PLACES]
        return {int(v) for v in places.tolist() if v > 0}

    def retire(self, h: WorkerHandle) -> None:
        """Forget a dead worker: close its channel, keep its counters, free its slot."""
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

    def totals(self) -> dict[str, float]:
        """Counters of every worker this node ran, live and gone."""
        out = {}
        for name, i in ch.COUNTER_FIELDS.items():
            out[name] = self.retired[i] + sum(h.counter(i) for h in self.live())
        return out
