"""The outcome writer: workers' outcomes go to PostgreSQL in batches; jobs given back
(a dead worker's, the buffer at shutdown) go the same way.

While the database is away the outcomes wait in memory (no claim can succeed then, so
they are bounded by the jobs this node holds) and are written once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence

from genworker.config import Settings
from genworker.model import Job, Outcome, OutcomeKind, unstorable
from genworker.node.dbhealth import DB_ERRORS, DbHealth
from genworker.node.holdings import Done, Holdings
from genworker.node.stats import FeederStats
from genworker.queue.store import Queue, retry_delay_s

log = logging.getLogger("genworker.feeder")

WRITE_GATHER_S = 0.02  # outcomes wait at most this long for company before a write
WRITE_ENOUGH = 100  # ... or until this many are waiting
WRITE_BATCH = 1000


class OutcomeWriter:
    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        db: DbHealth,
        holdings: Holdings,
        stats: FeederStats,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.db = db
        self.holdings = holdings
        self.stats = stats
        self.wake = asyncio.Event()
        self.rng = random.Random()

    def apply_settings(self, settings: Settings) -> None:
        self.settings = settings  # the retry backoff of the next writes

    def add(self, done: list[Done]) -> None:
        """Queue outcomes to write."""
        if not done:
            return
        pending = self.holdings.pending
        was_empty = not pending
        pending.extend(done)
        if was_empty or len(pending) >= WRITE_ENOUGH:
            self.wake.set()  # wake an idle writer, or cut its gathering short

    async def write_loop(self, stop: asyncio.Event) -> None:
        """Write outcomes in batches: as soon as WRITE_ENOUGH are waiting, else once the
        oldest has waited WRITE_GATHER_S (a write costs the database about the same for
        1 row as for 100), and everything at once when stopping."""
        pending = self.holdings.pending
        backoff = 0.1
        while True:
            if not pending:
                if stop.is_set():
                    return
                await _first(self.wake, stop)
                self.wake.clear()
                continue
            if len(pending) < WRITE_ENOUGH and not stop.is_set():
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first(self.wake, stop), WRITE_GATHER_S)
            batch = pending[:WRITE_BATCH]
            del pending[:WRITE_BATCH]
            if await self._write(batch):
                backoff = 0.1
            else:
                await self.db.pause(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _write(self, batch: list[Done]) -> bool:
        """Write one batch; on failure put it back in front (oldest first) and say so."""
        holdings = self.holdings
        holdings.writing = batch
        try:
            done = await self.queue.complete(
                [o if o.kind is OutcomeKind.OK else self._with_delay(o, a) for o, a in batch]
            )
        except DB_ERRORS as e:
            self.db.failed("complete", e)
            holdings.pending[:0] = batch  # keep them, oldest first, and try again
            return False
        except asyncio.CancelledError:
            # A stop gave up waiting for this write: the batch is still unwritten, so
            # its jobs ran; the shutdown must see them pending and not give them back.
            holdings.pending[:0] = batch
            raise
        except Exception as e:  # the database is well but refused what the batch holds
            holdings.pending[:0] = self._storable(batch, e)
            return False
        finally:
            holdings.writing = []
        self.db.answered()
        self.stats.count_written(done.applied.values())
        if holdings.gate is not None:
            await holdings.gate.store()
        if done.stale:
            log.info("%d outcomes refused: this node no longer owned those jobs", len(done.stale))
        return True

    async def give_back(self, held: Sequence[Job], reason: str | None) -> int | None:
        """Release jobs to the queue (a reason: their worker died running them), retrying
        while the database is away; how many were released, None if it never answered."""
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
            if dead:
                log.warning(
                    "%d jobs went dead: %s", len(dead), f"worker died while running it: {reason}"
                )
            return len(done.applied)
        log.error("could not release %d jobs; their leases will expire and requeue them", len(held))
        return None

    def _storable(self, batch: list[Done], error: Exception) -> list[Done]:
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


async def _first(*events: asyncio.Event) -> None:
    """Return when any of the events is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
