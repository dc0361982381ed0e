"""Which positions run a worker, and what each worker's exit counts as: a planned stop,
a death (its position backs off, and one that keeps dying is held back: the node is
degraded), or a boot failure, which stops the node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from genworker.background import TaskOwner
from genworker.exits import EXIT_BOOT, EXIT_OK, EXIT_RECYCLE
from genworker.node.feeder import Feeder
from genworker.node.handles import Position, State, WorkerHandle
from genworker.node.workers import Workers
from genworker.node.zygote import describe_exit

log = logging.getLogger("genworker.arbiter")


class Restarts:
    def __init__(
        self, workers: Workers, feeder: Feeder, tasks: TaskOwner, finish: Callable[[int], None]
    ) -> None:
        self.workers = workers
        self.feeder = feeder
        self.tasks = tasks
        self.finish = finish
        self.positions: dict[int, Position] = {}
        self.spawning: set[int] = set()  # positions whose worker is being started
        self.restarts_by_reason: dict[str, int] = {}  # crashes: exit, signal, heartbeat_timeout
        self.stops_by_reason: dict[str, int] = {}  # planned replacements: recycle, reload

    def degraded(self, target: int) -> bool:
        return any(p.held_back for i, p in self.positions.items() if i < target)

    def crash_looping(self, target: int) -> bool:
        """Every position is held back: restarting here is no use any more."""
        return bool(self.positions) and all(
            p.held_back for i, p in self.positions.items() if i < target
        )

    def progressed(self, h: WorkerHandle) -> None:
        self.positions.setdefault(h.position, Position(h.position)).record_progress()

    def keep(self, now: float, target: int) -> None:
        """Start a worker in every free position whose backoff is over; stop those past
        the target."""
        if self.workers.zygote_lost:
            return
        live = self.workers.live()
        active = {h.position for h in live if h.state in (State.SPAWNING, State.READY)}
        for p in range(target):
            pos = self.positions.setdefault(p, Position(p))
            if p not in active and p not in self.spawning and now >= pos.next_start:
                self.spawning.add(p)
                self.tasks.spawn(self._spawn(p), f"spawn {p}", critical=False)
        for h in live:
            if h.position >= target and h.state in (State.SPAWNING, State.READY):
                h.ask_stop("scale down")

    async def _spawn(self, p: int) -> None:
        try:
            if not self.workers.stopping:
                await self.workers.spawn(p)
        finally:
            self.spawning.discard(p)

    async def settle(self, h: WorkerHandle, status: int) -> None:
        """A worker is gone: give back what it held, and count a death unless it was asked
        to go, or the node is stopping, or it died of something not its own."""
        text, code, sig = describe_exit(status)
        text = h.lost_reason or text
        progressed = h.jobs_finished() > 0
        lived_s = 0.0 if h.ready_at is None else time.monotonic() - h.ready_at
        running = self.workers.running_ids(h)
        jobs = self.feeder.holdings.leave_worker(h)
        self.workers.retire(h)
        # Everything below that decides the restart runs before the first await: the
        # monitor must not see a free position whose backoff is not recorded yet.
        if code == EXIT_BOOT and h.ready_at is None and h.lost_reason is None:
            log.error(
                "worker %d cannot start (see its message above); stopping the node", h.position
            )
            self.finish(EXIT_BOOT)
            await self.feeder.release(jobs, None)
            return
        planned = h.stop_reason is not None and h.kill_reason is None
        planned = planned and code in (EXIT_OK, EXIT_RECYCLE)
        reason = h.kill_reason or text
        if planned:
            log.info("worker %d (pid %s) stopped: %s", h.position, h.pid, h.stop_reason)
            if h.stop_reason in ("recycle", "reload"):
                self.stops_by_reason[h.stop_reason] = self.stops_by_reason.get(h.stop_reason, 0) + 1
            if jobs:
                log.warning("worker %d left %d jobs unfinished", h.position, len(jobs))
            self.positions.get(h.position, Position(h.position)).record_clean_exit()
        elif (self.workers.stopping or self.workers.zygote_lost) and h.kill_reason is None:
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
