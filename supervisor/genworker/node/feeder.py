"""The supervisor's database side: claim into a small buffer, hand jobs to workers
with free slots, write outcomes back in batches, renew leases, reap, prune.

Everything here runs on the supervisor's event loop; it is the only code that
talks to PostgreSQL. It knows which worker holds which job, so a worker's
death gives exactly those jobs back at once, without waiting for a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from genworker.api.limiter import SharedTokenBucket
from genworker.buffer import UrgencyBuffer
from genworker.config import Settings
from genworker.model import Job, Outcome, OutcomeKind, unstorable
from genworker.node.dedupe import CacheGate
from genworker.queue.cache import open_cache
from genworker.queue.store import Listener, Queue, retry_delay_s

log = logging.getLogger("genworker.feeder")

# What the loops ride out (log, back off, retry) rather than die of. A statement cancelled by
# the timeouts below is one of them: a lock held too long is an outage of sorts.
DB_ERRORS = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    PoolTimeout,
    psycopg.errors.QueryCanceled,
    psycopg.errors.LockNotAvailable,
)
# No statement of the supervisor's may wait forever on a lock or a stuck server.
STATEMENT_TIMEOUT_MS = 60_000
LOCK_TIMEOUT_MS = 10_000
# While the database is away: ask the pool for a connection this often, and let each of
# the pool's reconnection attempts give up after RECONNECT_S (its backoff doubles up to 5
# minutes by default, so after a long outage the first connection came up to minutes
# after the server was back). Work resumes within about a second of its return.
DB_PROBE_S = 0.5
RECONNECT_S = 2.0
BUFFER_S = 0.05  # the buffer holds at least this much work at the recent completion rate
MAX_BUFFER = 2000
WRITE_GATHER_S = 0.02  # outcomes wait at most this long for company before a write
WRITE_ENOUGH = 100  # ... or until this many are waiting
WRITE_BATCH = 1000


class Holder(Protocol):
    """A worker as the feeder sees it."""

    slot: int
    jobs: dict[int, Job]

    def free_slots(self) -> int: ...
    def send_jobs(self, jobs: list[Job]) -> bool: ...
    def holds_suspect(self) -> bool: ...


@dataclass
class FeederStats:
    claimed: int = 0
    succeeded: int = 0
    retried: int = 0
    dead: int = 0
    cancelled: int = 0
    released: int = 0
    renewed: int = 0
    reaped: int = 0
    claims: int = 0
    writes: int = 0
    first_claim_at: float | None = None
    by_status: dict[str, int] = field(default_factory=dict)


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
        self.pool = AsyncConnectionPool(
            dsn,
            min_size=min(2, settings.db_pool_size),
            max_size=settings.db_pool_size,
            timeout=settings.db_pool_timeout_s,
            reconnect_timeout=RECONNECT_S,
            kwargs={
                "autocommit": True,
                "application_name": f"genworker {node}",
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
                f" -c lock_timeout={LOCK_TIMEOUT_MS}",
            },
            open=False,
        )
        self.queue = Queue(self.pool, snooze_max_s=settings.snooze_max_s)
        # Claimed jobs waiting for a slot, most urgent first (the claim's order key): a Free
        # job claimed after buffered Pro jobs goes out before them, as in the database.
        self.buffer = UrgencyBuffer()
        # Jobs that were in flight when a worker died: each runs alone on a worker, so a
        # poison job among them cannot take its neighbours down with it a second time.
        self.suspects: deque[Job] = deque()
        self.reserved: Holder | None = None  # drained of other work to take a suspect
        self.pending: list[tuple[Outcome, int]] = []
        self.writing: list[tuple[Outcome, int]] = []  # the batch being written now
        self.stats = FeederStats()
        self.rate = Rate()
        self.wake = asyncio.Event()  # claim: NOTIFY, poll timer, or slots freed
        self.write_wake = asyncio.Event()
        self.claiming = True
        self.queue_empty = False
        self.paused_until = 0.0  # claims paused (bad API key) until this monotonic time
        self._resume: asyncio.TimerHandle | None = None
        self.probe = False  # after a pause, one job at a time until one succeeds
        self.db_ok = False
        self.db_problem = "unreachable"  # what is wrong while db_ok is False
        self.db_back = asyncio.Event()  # set while the database answers: ends retry pauses
        self.live_nodes = 1
        self.listener = Listener(dsn, self)  # type: ignore[arg-type]  # it calls .set()
        self.rng = random.Random()
        self.gate: CacheGate | None = None
        self.bucket: SharedTokenBucket | None = None

    # ------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=self.settings.db_pool_timeout_s)
        self.db_ok = True
        self.db_back.set()
        cache = open_cache(self.settings, self.pool)
        if cache is not None:
            self.gate = CacheGate(cache, self.settings)

    async def close(self) -> None:
        st = self.stats
        log.info(
            "database batches: %d claims (%.1f jobs each), %d writes (%.1f outcomes each)",
            st.claims,
            st.claimed / max(1, st.claims),
            st.writes,
            sum(st.by_status.values()) / max(1, st.writes),
        )
        if self.gate is not None:
            await self.gate.cache.close()
        await self.pool.close()

    def db_failed(self, what: str, e: BaseException) -> None:
        if isinstance(e, PoolTimeout):
            problem = (
                f"pool exhausted (all {self.settings.db_pool_size} connections busy "
                f"past {self.settings.db_pool_timeout_s:g}s)"
            )
        elif isinstance(e, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
            problem = "statements timing out"
        else:
            problem = "unreachable"
        if self.db_ok or problem != self.db_problem:
            log.warning(
                "database %s (%s: %s); holding outcomes in memory and retrying",
                problem,
                what,
                type(e).__name__,
            )
        self.db_ok = False
        self.db_problem = problem
        self.db_back.clear()

    def db_answered(self) -> None:
        if not self.db_ok:
            log.info("database reachable again")
        self.db_ok = True
        self.db_back.set()

    async def _retry_pause(self, seconds: float) -> None:
        """Back off after a database error: `seconds`, or until the database is back."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.db_back.wait(), seconds)

    async def probe_db(self) -> bool:
        """Is the database back? Asking the pool (briefly) also has it try to reconnect now."""
        try:
            async with self.pool.connection(timeout=DB_PROBE_S) as conn:
                await conn.execute("SELECT 1")
        except DB_ERRORS:
            return False
        self.db_answered()
        return True

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
                    self.db_failed("claim", e)
                    await self._retry_pause(backoff)
                    backoff = min(backoff * 2, 5.0)
                    self.wake.set()
                    continue
                backoff = 0.1
                self.db_answered()
                self.queue_empty = len(jobs) < n
                if jobs and self.gate is not None:
                    jobs, hits = await self.gate.lookup(jobs)
                    self._add_pending([(o, 1) for o in hits])
                if jobs:
                    self.stats.claims += 1
                    self.stats.claimed += len(jobs)
                    if self.stats.first_claim_at is None:
                        self.stats.first_claim_at = time.monotonic()
                    for job in jobs:
                        (self.suspects if job.deaths else self.buffer).append(job)
                    self.dispatch()
                if not self.queue_empty:
                    self.wake.set()  # there may be more: look at the buffer again
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)

    def held_ids(self) -> list[int]:
        """Every job this node holds: buffered, with a worker, waiting for a running twin,
        or with its outcome not yet written. Only these leases are renewed: a job the
        node lost track of (a claim whose answer never came back, a release that failed)
        expires and goes back to the queue instead of being kept forever."""
        ids = [j.job_id for j in self.buffer]
        ids += [j.job_id for j in self.suspects]
        for h in self.holders():
            ids += h.jobs
        if self.gate is not None:
            ids += self.gate.waiting_ids()
        ids += [o.job_id for o, _ in self.pending]
        ids += [o.job_id for o, _ in self.writing]
        return ids

    def _claim_size(self) -> int:
        if self.queue_empty or time.monotonic() < self.paused_until:
            return 0
        free, spare = self.capacity()
        held = len(self.buffer) + len(self.suspects)
        if self.probe:  # after a pause: one job at a time until one succeeds
            return max(0, 1 - held - sum(len(h.jobs) for h in self.holders()))
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

    def dispatch(self) -> None:
        """Hand buffered jobs to the workers with free slots, most free first."""
        if time.monotonic() < self.paused_until:
            return
        if self.suspects:
            self._dispatch_suspects()
        if not self.suspects:
            self.reserved = None  # nothing to drain a worker for any more
        if not self.buffer:
            return
        holders = list(self.holders())
        frees = [(h.free_slots(), h) for h in holders if h is not self.reserved]
        frees.sort(key=lambda fh: fh[0], reverse=True)
        held = sum(len(h.jobs) for h in holders)  # the reserved worker's jobs count too
        room = len(self.buffer)
        cap = self.settings.api_max_inflight
        if cap:
            room = min(room, max(1, cap // max(1, self.live_nodes)) - held)
        if self.probe:  # after a pause: one job at a time until one succeeds
            room = min(room, 1 - held)
        for free, h in frees:
            take = min(free, room)
            if take <= 0:
                break
            batch = self._take(take)
            if not batch:
                break
            if not h.send_jobs(batch):
                self.buffer.extendleft(reversed(batch))
                continue
            room -= take
        if len(self.buffer) < self.settings.claim_batch:
            self.wake.set()

    def _dispatch_suspects(self) -> None:
        """Give each suspect a worker of its own: an idle one, or one we stop feeding until
        it is idle (so suspects cannot starve behind a busy node)."""
        holders = list(self.holders())
        if self.reserved is not None and self.reserved not in holders:
            self.reserved = None  # it died or left
        for h in sorted(holders, key=lambda x: len(x.jobs)):
            if not self.suspects:
                break
            if not h.jobs and h.free_slots() > 0:
                job = self.suspects.popleft()
                if h.send_jobs([job]):
                    if h is self.reserved:
                        self.reserved = None
                else:
                    self.suspects.appendleft(job)
        if self.suspects and self.reserved is None:
            candidates = [h for h in holders if not h.holds_suspect()]
            if candidates:
                self.reserved = min(candidates, key=lambda x: len(x.jobs))

    def _take(self, n: int) -> list[Job]:
        """Up to n buffered jobs to run; with the cache, twins of running jobs wait instead."""
        if self.gate is None:
            return [self.buffer.popleft() for _ in range(min(n, len(self.buffer)))]
        out: list[Job] = []
        served: list[tuple[Outcome, int]] = []
        while self.buffer and len(out) < n:
            job = self.buffer.popleft()
            verdict = self.gate.admit(job)
            if verdict is True:
                out.append(job)
            elif verdict is not False:
                served.append((verdict, job.attempt))
        self._add_pending(served)
        return out

    # ------------------------------------------------------------- outcomes
    def on_outcomes(self, holder: Holder, outcomes: Sequence[Outcome]) -> None:
        done: list[tuple[Outcome, int]] = []
        for o in outcomes:
            job = holder.jobs.pop(o.job_id, None)
            if job is None:
                continue  # already given back (the worker was declared dead)
            if o.alarm:
                self.on_alarm(o.alarm, o.error or o.alarm)
            if o.kind is OutcomeKind.OK and self.probe:
                self.probe = False
            done.append((o, job.attempt))
            if self.gate is not None:
                shared, back = self.gate.settle(job, o)
                done.extend((f, 1) for f in shared)
                self.buffer.extendleft(reversed(back))
        self.rate.add(len(outcomes))
        self._add_pending(done)
        self.dispatch()

    def _add_pending(self, done: list[tuple[Outcome, int]]) -> None:
        """Queue outcomes for the writer. While the database is away they wait here: no
        new claim can succeed then, so they are bounded by the jobs this node holds."""
        if not done:
            return
        was_empty = not self.pending
        self.pending.extend(done)
        if was_empty or len(self.pending) >= WRITE_ENOUGH:
            self.write_wake.set()  # wake an idle writer, or cut its gathering short

    def pause_claims(self, seconds: float) -> None:
        """Stop claiming and dispatching for `seconds` (a rejected API key), then hand out
        one job as a probe; 0 ends a pause now (a reload may have fixed the key)."""
        self.paused_until = time.monotonic() + seconds
        self.probe = True
        if self._resume is not None:
            self._resume.cancel()
        # dispatch runs on events only: with the buffer full and the workers idle, none
        # would come when the pause ends, so one is scheduled
        self._resume = asyncio.get_running_loop().call_later(max(0.0, seconds), self._resume_now)

    def _resume_now(self) -> None:
        self._resume = None
        # the timer is the pause's end (a later pause replaces it); the loop's clock may
        # lag time.monotonic() by a millisecond, so do not ask the clock again
        self.paused_until = min(self.paused_until, time.monotonic())
        if self.claiming:
            self.dispatch()
            self.wake.set()

    async def write_loop(self, stop: asyncio.Event) -> None:
        """Write outcomes in batches: as soon as WRITE_ENOUGH are waiting, else once the
        oldest has waited WRITE_GATHER_S (a write costs the database about the same for
        1 row as for 100), and everything at once when stopping."""
        backoff = 0.1
        while True:
            if not self.pending:
                if stop.is_set():
                    return
                await _first(self.write_wake, stop)
                self.write_wake.clear()
                continue
            if len(self.pending) < WRITE_ENOUGH and not stop.is_set():
                self.write_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first(self.write_wake, stop), WRITE_GATHER_S)
            batch = self.pending[:WRITE_BATCH]
            del self.pending[:WRITE_BATCH]
            self.writing = batch
            try:
                done = await self.queue.complete(
                    [o if o.kind is OutcomeKind.OK else self._with_delay(o, a) for o, a in batch]
                )
            except DB_ERRORS as e:
                self.db_failed("complete", e)
                self.pending[:0] = batch  # keep them, oldest first, and try again
                await self._retry_pause(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except asyncio.CancelledError:
                # A stop gave up waiting for this write: the batch is still unwritten, so
                # its jobs ran; the shutdown must see them pending and not give them back.
                self.pending[:0] = batch
                raise
            except Exception as e:  # the database is well but refused what the batch holds
                self.pending[:0] = self._storable(batch, e)
                await self._retry_pause(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            finally:
                self.writing = []
            backoff = 0.1
            self.db_answered()
            self._count(done.applied.values())
            if self.gate is not None:
                await self.gate.store()
            if done.stale:
                log.info(
                    "%d outcomes refused: this node no longer owned those jobs", len(done.stale)
                )

    def _storable(
        self, batch: list[tuple[Outcome, int]], error: Exception
    ) -> list[tuple[Outcome, int]]:
        """The batch with each outcome PostgreSQL cannot store (a NaN or a NUL from a
        handler, say) turned into that job's death, so one bad result never holds up
        the others' writes."""
        out, refused = [], 0
        for o, attempt in batch:
            why = unstorable([o.result, o.error])
            if why is not None:
                refused += 1
                log.warning(
                    "job %d: its outcome cannot be stored (%s); it goes dead", o.job_id, why
                )
                o = Outcome(
                    o.job_id, o.token, OutcomeKind.DEAD, error=f"outcome not storable: {why}"
                )
            out.append((o, attempt))
        if not refused:
            log.error(
                "writing %d outcomes failed (%s: %s); trying again",
                len(batch),
                type(error).__name__,
                error,
            )
        return out

    def _with_delay(self, o: Outcome, attempt: int) -> Outcome:
        base, cap = self.settings.retry_base_s, self.settings.retry_max_s
        return o._replace(delay_s=retry_delay_s(o, attempt, base, cap, self.rng))

    def _count(self, statuses: Iterable[str]) -> None:
        s = self.stats
        s.writes += 1
        for st in statuses:
            s.by_status[st] = s.by_status.get(st, 0) + 1
            if st == "succeeded":
                s.succeeded += 1
            elif st == "dead":
                s.dead += 1
            elif st == "scheduled":
                s.retried += 1
            elif st == "cancelled":
                s.cancelled += 1

    # -------------------------------------------------------------- release
    async def release(self, held: Sequence[Job], reason: str | None) -> int:
        """Give jobs back to the queue (a dead worker's, or unstarted ones at shutdown)."""
        if self.gate is not None:
            # jobs that waited for a twin this worker was running: run them here instead,
            # or give them back with it when the node is stopping
            back = self.gate.drop(held)
            if self.claiming:
                self.buffer.extendleft(reversed(back))
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
                self.db_failed("release", e)
                await self._retry_pause(min(0.1 * 2**attempt, 2.0))
                continue
            self.db_answered()
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
        jobs = [*self.buffer, *self.suspects]
        self.buffer.clear()
        self.suspects.clear()
        if self.gate is not None:
            jobs += self.gate.take_all()
        return await self.release(jobs, None)


async def _first(*events: asyncio.Event) -> None:
    """Return when any of the events is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
