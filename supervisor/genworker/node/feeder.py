"""The supervisor's claim side: claim into a small buffer, hand jobs to workers with free
slots, take their outcomes, give back what a dead worker held.

Everything here runs on the supervisor's event loop. Which job is where is Holdings'
to answer; the outcomes go to PostgreSQL through the writer; the database's health
is DbHealth's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from genworker.config import Settings
from genworker.model import Job, Outcome, OutcomeKind
from genworker.node.dbhealth import DB_ERRORS, DbHealth, make_pool
from genworker.node.dedupe import CacheGate
from genworker.node.dispatch import ClaimPause, Dispatcher
from genworker.node.holdings import Done, Holder, Holdings
from genworker.node.outage import ALARM as OUTAGE
from genworker.node.outage import UNREACHABLE, ProviderWatch
from genworker.node.sizing import ClaimSizer
from genworker.node.stats import FeederStats
from genworker.node.writer import OutcomeWriter
from genworker.queue.cache import open_cache
from genworker.queue.store import Listener, Queue

log = logging.getLogger("genworker.feeder")

__all__ = ["DB_ERRORS", "Feeder", "FeederStats", "Holder"]


class Feeder:
    def __init__(
        self,
        settings: Settings,
        dsn: str,
        node: str,
        holders: Callable[[], Iterable[Holder]],
        on_alarm: Callable[[str, str], None],
        on_clear: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.node = node
        self.holders = holders
        self.on_alarm = on_alarm
        self.on_clear = on_clear  # a node-level alarm is over (the provider answers again)
        self.provider = ProviderWatch()
        self.give_back_buffer = False  # an outage began: the claim loop gives the buffer back
        self.publish = asyncio.Event()  # the node's row is stale (a worker came up): heartbeat
        self.pool = make_pool(settings, dsn, node)
        self.queue = Queue(self.pool, snooze_max_s=settings.snooze_max_s)
        self.db = DbHealth(self.pool, settings)
        self.holdings = Holdings(holders)
        self.stats = FeederStats()
        self.writer = OutcomeWriter(settings, self.queue, self.db, self.holdings, self.stats)
        self.wake = asyncio.Event()  # claim: NOTIFY, poll timer, or slots freed
        self.claiming = True
        self.queue_empty = False
        self.pause = ClaimPause(self._pause_ended)
        self.sizer = ClaimSizer(settings, holders, self.holdings, self.pause)
        self.dispatcher = Dispatcher(
            settings,
            self.holdings,
            self.pause,
            share=self.sizer.inflight_share,
            on_served=self.writer.add,
            running_low=self.wake.set,
        )
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
        self.dispatcher.apply_settings(settings)
        self.db.apply_settings(settings)
        self.sizer.apply_settings(settings)
        if self.queue.kinds is not None:  # registered: a new --handler is claimed, published
            self.queue.set_kinds(settings.kinds)

    def stop_claiming(self) -> None:
        """No claim after this one: the claim loop ends once it wakes."""
        self.claiming = False
        self.wake.set()

    def note_live_nodes(self, n: int) -> None:
        """How many nodes share the cluster's --api-max-inflight (from the heartbeat)."""
        self.sizer.note_live_nodes(n)

    @property
    def live_nodes(self) -> int:
        return self.sizer.live_nodes

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
                if self.give_back_buffer:
                    self.give_back_buffer = False
                    await self.release_buffer()  # no attempt spent: another node may run them
                n = self.sizer.claim_size(self.queue_empty)
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
        self.dispatcher.dispatch()

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
            if o.alarm == UNREACHABLE:
                snoozed = self._unreachable(o, job)
                if snoozed is None:
                    continue  # given back with the buffer
                o = snoozed
            elif o.alarm:
                self.on_alarm(o.alarm, o.error or o.alarm)
            if o.kind is OutcomeKind.OK:
                self.pause.passed()
                if self.provider.succeeded(job.kind) and self.on_clear is not None:
                    self.on_clear(OUTAGE)
            done.append((o, job.attempt))
            if gate is not None:
                shared, back = gate.settle(job, o)
                done.extend((f, 1) for f in shared)
                self.holdings.buffer.extendleft(reversed(back))
        self.sizer.rate.add(len(outcomes))
        self.writer.add(done)
        self.dispatch()

    def _unreachable(self, o: Outcome, job: Job) -> Outcome | None:
        """A call that never reached the provider: the job snoozes (no attempt spent), and
        enough of them in a row are an outage (claims pause, the buffer goes back, then
        one job at a time probes the provider). During an outage the job itself goes back
        with the buffer (None): released, it spends neither an attempt nor the snooze
        budget, so an outage of hours kills no job."""
        if self.provider.unreachable(job.kind):
            calls = self.provider.failures
            self.on_alarm(OUTAGE, f"{calls} calls in a row did not reach it: {o.error}")
        if not self.provider.down:
            return o._replace(kind=OutcomeKind.SNOOZE, alarm=None)
        if not self.pause.active():
            self.pause.start(self.provider.next_pause_s())
        self.holdings.buffer.append(job)  # no dispatch while paused: the claim loop releases it
        self.give_back_buffer = True
        self.wake.set()
        return None

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
        released = await self.writer.give_back(held, reason)
        if released is None:
            return 0
        self.poke()  # they are runnable again, here or elsewhere
        return released

    async def release_buffer(self) -> int:
        return await self.release(self.holdings.take_unstarted(), None)
