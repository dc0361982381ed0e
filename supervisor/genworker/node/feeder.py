"""The supervisor's claim side: claim into a small buffer, hand jobs to workers with free
slots, take their outcomes, give back what a dead worker held.

Everything here runs on the supervisor's event loop. Which job is where is Holdings'
to answer; the outcomes go to PostgreSQL through the writer; the database's health
is DbHealth's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence

from genworker.config import Settings
from genworker.model import Job, Outcome, OutcomeKind
from genworker.node.dbhealth import DB_ERRORS, DbHealth, make_pool
from genworker.node.dedupe import CacheGate
from genworker.node.holdings import Done, Holder, Holdings
from genworker.node.stats import FeederStats
from genworker.node.writer import OutcomeWriter
from genworker.queue.cache import open_cache
from genworker.queue.store import Listener, Queue

log = logging.getLogger("genworker.feeder")

BUFFER_S = 0.05  # the buffer holds at least this much work at the recent completion rate
MAX_BUFFER = 2000

__all__ = ["DB_ERRORS", "Feeder", "FeederStats", "Holder"]


class Rate:
    """Events per second over the last ~second, cheap enough to call per batch."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self.start = time.monotonic()
        self.count = 0
        self.last = 0.0

    def add(self, n: int) -> None:
        now = time.monotonic()
        if now - self.start >= self.window_s:
            self.last = self.count / (now - self.start)
            self.start, self.count = now, 0
        self.count += n

    def per_s(self) -> float:
        elapsed = time.monotonic() - self.start
        if elapsed >= 2 * self.window_s:
            return 0.0
        return max(self.last, self.count / max(elapsed, 1e-3) if elapsed > 0.1 else 0.0)


class ClaimPause:
    """Claims and dispatch paused (a rejected API key); after it, one job at a time
    (the probe) until one succeeds."""

    def __init__(self, on_end: Callable[[], None]) -> None:
        self.until = 0.0  # monotonic
        self.probe = False
        self.on_end = on_end
        self._timer: asyncio.TimerHandle | None = None

    def active(self) -> bool:
        return time.monotonic() < self.until

    def start(self, seconds: float) -> None:
        """Pause for `seconds`, then probe; 0 ends a pause now (a reload may have fixed the
        key)."""
        self.until = time.monotonic() + seconds
        self.probe = True
        if self._timer is not None:
            self._timer.cancel()
        # dispatch runs on events only: with the buffer full and the workers idle, none
        # would come when the pause ends, so one is scheduled
        self._timer = asyncio.get_running_loop().call_later(max(0.0, seconds), self._ended)

    def passed(self) -> None:
        """A job succeeded: the key works, the probe is over."""
        self.probe = False

    def _ended(self) -> None:
        self._timer = None
        # the timer is the pause's end (a later pause replaces it); the loop's clock may
        # lag time.monotonic() by a millisecond, so do not ask the clock again
        self.until = min(self.until, time.monotonic())
        self.on_end()


class Feeder:
    def __init__(
        self,
        settings: Settings,
        dsn: str,
        node: str,
        holders: Callable[[], Iterable[Holder]],
        on_alarm: Callable[[str, str], None],
    ) -> None:
        self.settings = settings
        self.node = node
        self.holders = holders
        self.on_alarm = on_alarm
        self.pool = make_pool(settings, dsn, node)
        self.queue = Queue(self.pool, snooze_max_s=settings.snooze_max_s)
        self.db = DbHealth(self.pool, settings)
        self.holdings = Holdings(holders)
        self.stats = FeederStats()
        self.writer = OutcomeWriter(settings, self.queue, self.db, self.holdings, self.stats)
        self.rate = Rate()
        self.wake = asyncio.Event()  # claim: NOTIFY, poll timer, or slots freed
        self.claiming = True
        self.queue_empty = False
        self.pause = ClaimPause(self._pause_ended)
        self.reserved: Holder | None = None  # drained of other work to take a suspect
        self.live_nodes = 1
        self.listener = Listener(dsn, self)  # type: ignore[arg-type]  # it calls .set()

    # ------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        await self.db.open()
        cache = open_cache(self.settings, self.pool)
        if cache is not None:
            self.holdings.attach_gate(CacheGate(cache, self.settings))

    async def close(self) -> None:
        st = self.stats
        log.info(
            "database batches: %d claims (%.1f jobs each), %d writes (%.1f outcomes each)",
            st.claims,
            st.claimed / max(1, st.claims),
            st.writes,
            sum(st.by_status.values()) / max(1, st.writes),
        )
        if self.holdings.gate is not None:
            await self.holdings.gate.cache.close()
        await self.pool.close()

    def apply_settings(self, settings: Settings) -> None:
        """A HUP's new settings, from the next claim and write on."""
        self.settings = settings
        self.writer.apply_settings(settings)
        self.db.apply_settings(settings)

    def stop_claiming(self) -> None:
        """No claim after this one: the claim loop ends once it wakes."""
        self.claiming = False
        self.wake.set()

    def note_live_nodes(self, n: int) -> None:
        """How many nodes share the cluster's --api-max-inflight (from the heartbeat)."""
        self.live_nodes = n

    def probe_if_paused(self) -> None:
        """Paused for a bad key, which a reload may have fixed: probe it now."""
        if self.pause.active():
            self.pause.start(0.0)

    # ------------------------------------------------------- what ops reads
    @property
    def db_ok(self) -> bool:
        return self.db.ok

    @property
    def db_problem(self) -> str:
        return self.db.problem

    def jobs_held(self) -> dict[str, int]:
        """How many jobs wait to start, run on a worker, and wait for their write."""
        h = self.holdings
        return {"buffer": h.waiting(), "workers": h.with_workers(), "writing": len(h.pending)}

    # ------------------------------------------------------------ claiming
    def capacity(self) -> tuple[int, int]:
        """(free slots now, how many jobs the buffer should hold besides).

        The buffer covers `prefetch` x the slots, or BUFFER_S of the recent completion
        rate when that is more: fast jobs need deep buffers (and big claims), slow API
        calls need a shallow one, so a newly arrived urgent job never queues behind
        more than a moment of work.
        """
        free = total = held = 0
        for h in self.holders():
            f = h.free_slots()
            free += f
            held += len(h.jobs)
            total += f + len(h.jobs)
        cap = self.settings.api_max_inflight
        if cap:
            share = max(1, cap // max(1, self.live_nodes))
            free = max(0, min(free, share - held))
        spare = max(
            math.ceil(total * self.settings.prefetch), math.ceil(self.rate.per_s() * BUFFER_S)
        )
        return free, min(spare, MAX_BUFFER)

    async def claim_loop(self) -> None:
        """Claim whenever the buffer runs low and the queue may hold work.

        Woken by dispatch (the buffer ran low), by NOTIFY and by the poll timer; it
        never asks the database again after an empty claim until one of the last two
        says there may be new work.
        """
        poller = asyncio.get_running_loop().create_task(self._poll())
        backoff = 0.1
        try:
            while self.claiming:
                await self.wake.wait()
                self.wake.clear()
                n = self._claim_size()
                if n <= 0 or not self.claiming:
                    continue
                try:
                    jobs = await self.queue.claim(self.node, n, self.settings.lease_s)
                except DB_ERRORS as e:
                    self.db.failed("claim", e)
                    await self.db.pause(backoff)
                    backoff = min(backoff * 2, 5.0)
                    self.wake.set()
                    continue
                backoff = 0.1
                self.db.answered()
                self.queue_empty = len(jobs) < n
                await self._claimed(jobs)
                if not self.queue_empty:
                    self.wake.set()  # there may be more: look at the buffer again
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)

    async def _claimed(self, jobs: list[Job]) -> None:
        gate = self.holdings.gate
        if jobs and gate is not None:
            jobs, hits = await gate.lookup(jobs)
            self.writer.add([(o, 1) for o in hits])
        if jobs:
            self.stats.claims += 1
            self.stats.claimed += len(jobs)
            if self.stats.first_claim_at is None:
                self.stats.first_claim_at = time.monotonic()
            self.holdings.claimed(jobs)
            self.dispatch()

    def _claim_size(self) -> int:
        if self.queue_empty or self.pause.active():
            return 0
        free, spare = self.capacity()
        held = len(self.holdings.buffer) + len(self.holdings.suspects)
        if self.pause.probe:  # after a pause: one job at a time until one succeeds
            return max(0, 1 - held - self.holdings.with_workers())
        want = free + spare - held
        # no dribbling: a claim is worth a round trip once a quarter of the target is gone
        if want < max(1, min(self.settings.claim_batch, free + spare) // 4):
            return 0
        return min(want, self.settings.claim_batch)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            self.poke()

    def poke(self) -> None:
        """There may be new work (a NOTIFY, or the poll): claim even after an empty claim."""
        self.queue_empty = False
        self.wake.set()

    # Listener calls .set() on what it is given: a NOTIFY is a poke.
    set = poke

    # ------------------------------------------------------------ dispatch
    def slots_freed(self) -> None:
        """A worker came up: fill its slots, and claim for them."""
        self.dispatch()
        self.wake.set()

    def dispatch(self) -> None:
        """Hand buffered jobs to the workers with free slots, most free first."""
        if self.pause.active():
            return
        buffer = self.holdings.buffer
        if self.holdings.suspects:
            self._dispatch_suspects()
        if not self.holdings.suspects:
            self.reserved = None  # nothing to drain a worker for any more
        if not buffer:
            return
        holders = list(self.holders())
        frees = [(h.free_slots(), h) for h in holders if h is not self.reserved]
        frees.sort(key=lambda fh: fh[0], reverse=True)
        held = sum(len(h.jobs) for h in holders)  # the reserved worker's jobs count too
        room = len(buffer)
        cap = self.settings.api_max_inflight
        if cap:
            room = min(room, max(1, cap // max(1, self.live_nodes)) - held)
        if self.pause.probe:  # after a pause: one job at a time until one succeeds
            room = min(room, 1 - held)
        for free, h in frees:
            take = min(free, room)
            if take <= 0:
                break
            batch = self._take(take)
            if not batch:
                break
            if not h.send_jobs(batch):
                buffer.extendleft(reversed(batch))
                continue
            room -= take
        if len(buffer) < self.settings.claim_batch:
            self.wake.set()

    def _dispatch_suspects(self) -> None:
        """Give each suspect a worker of its own: an idle one, or one we stop feeding until
        it is idle (so suspects cannot starve behind a busy node)."""
        suspects = self.holdings.suspects
        holders = list(self.holders())
        if self.reserved is not None and self.reserved not in holders:
            self.reserved = None  # it died or left
        for h in sorted(holders, key=lambda x: len(x.jobs)):
            if not suspects:
                break
            if not h.jobs and h.free_slots() > 0:
                job = suspects.popleft()
                if h.send_jobs([job]):
                    if h is self.reserved:
                        self.reserved = None
                else:
                    suspects.appendleft(job)
        if suspects and self.reserved is None:
            candidates = [h for h in holders if not h.holds_suspect()]
            if candidates:
                self.reserved = min(candidates, key=lambda x: len(x.jobs))

    def _take(self, n: int) -> list[Job]:
        """Up to n buffered jobs to run; with the cache, twins of running jobs wait instead."""
        buffer, gate = self.holdings.buffer, self.holdings.gate
        if gate is None:
            return [buffer.popleft() for _ in range(min(n, len(buffer)))]
        out: list[Job] = []
        served: list[Done] = []
        while buffer and len(out) < n:
            job = buffer.popleft()
            verdict = gate.admit(job)
            if verdict is True:
                out.append(job)
            elif verdict is not False:
                served.append((verdict, job.attempt))
        self.writer.add(served)
        return out

    def _pause_ended(self) -> None:
        if self.claiming:
            self.dispatch()
            self.wake.set()

    def pause_claims(self, seconds: float) -> None:
        """Stop claiming and dispatching for `seconds` (a rejected API key), then hand out
        one job as a probe."""
        self.pause.start(seconds)

    # ------------------------------------------------------------- outcomes
    def on_outcomes(self, holder: Holder, outcomes: Sequence[Outcome]) -> None:
        done: list[Done] = []
        gate = self.holdings.gate
        for o in outcomes:
            job = holder.jobs.pop(o.job_id, None)
            if job is None:
                continue  # already given back (the worker was declared dead)
            if o.alarm:
                self.on_alarm(o.alarm, o.error or o.alarm)
            if o.kind is OutcomeKind.OK:
                self.pause.passed()
            done.append((o, job.attempt))
            if gate is not None:
                shared, back = gate.settle(job, o)
                done.extend((f, 1) for f in shared)
                self.holdings.buffer.extendleft(reversed(back))
        self.rate.add(len(outcomes))
        self.writer.add(done)
        self.dispatch()

    # -------------------------------------------------------------- release
    async def release(self, held: Sequence[Job], reason: str | None) -> int:
        """Give jobs back to the queue (a dead worker's, or unstarted ones at shutdown)."""
        gate = self.holdings.gate
        if gate is not None:
            # jobs that waited for a twin this worker was running: run them here instead,
            # or give them back with it when the node is stopping
            back = gate.drop(held)
            if self.claiming:
                self.holdings.buffer.extendleft(reversed(back))
                self.dispatch()
            else:
                held = [*held, *back]
        if not held:
            return 0
        pairs = [(j.job_id, j.token) for j in held]
        for attempt in range(50):
            try:
                done = await self.queue.release(pairs, reason, self.settings.max_worker_deaths)
            except DB_ERRORS as e:
                self.db.failed("release", e)
                await self.db.pause(min(0.1 * 2**attempt, 2.0))
                continue
            self.db.answered()
            self.stats.released += len(done.applied)
            dead = [i for i, st in done.applied.items() if st == "dead"]
            self.poke()  # they are runnable again, here or elsewhere
            if dead:
                log.warning(
                    "%d jobs went dead: %s", len(dead), f"worker died while running it: {reason}"
                )
            return len(done.applied)
        log.error("could not release %d jobs; their leases will expire and requeue them", len(held))
        return 0

    async def release_buffer(self) -> int:
        return await self.release(self.holdings.take_unstarted(), None)
