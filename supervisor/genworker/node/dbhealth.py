"""The supervisor's connection pool and what it knows of the database's health.

Every loop that talks to PostgreSQL reports here: an error marks the database down
(with what is wrong: unreachable, pool exhausted, statements timing out), an answer
marks it up again and ends every loop's retry pause at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from genworker.config import Settings
from genworker.queue.db import DB_ERRORS

log = logging.getLogger("genworker.feeder")

# No statement of the supervisor's may wait forever on a lock or a stuck server.
STATEMENT_TIMEOUT_MS = 60_000
LOCK_TIMEOUT_MS = 10_000
# While the database is away: ask the pool for a connection this often, and let each of
# the pool's reconnection attempts give up after RECONNECT_S (its backoff doubles up to 5
# minutes by default, so after a long outage the first connection came up to minutes
# after the server was back). Work resumes within about a second of its return.
DB_PROBE_S = 0.5
RECONNECT_S = 2.0

__all__ = ["DB_ERRORS", "DB_PROBE_S", "DbHealth", "make_pool"]


def make_pool(settings: Settings, dsn: str, node: str) -> AsyncConnectionPool:
    """The node's pool (not opened yet): autocommit, named after the node, time-limited."""
    return AsyncConnectionPool(
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


class DbHealth:
    """Is the database answering, and if not, what is wrong (for /readyz and the title)."""

    def __init__(self, pool: AsyncConnectionPool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.ok = False
        self.problem = "unreachable"  # what is wrong while ok is False
        self.back = asyncio.Event()  # set while the database answers: ends retry pauses

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=self.settings.db_pool_timeout_s)
        self.ok = True
        self.back.set()

    def apply_settings(self, settings: Settings) -> None:
        self.settings = settings

    def failed(self, what: str, e: BaseException) -> None:
        if isinstance(e, PoolTimeout):
            problem = (
                f"pool exhausted (all {self.settings.db_pool_size} connections busy "
                f"past {self.settings.db_pool_timeout_s:g}s)"
            )
        elif isinstance(e, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
            problem = "statements timing out"
        else:
            problem = "unreachable"
        if self.ok or problem != self.problem:
            log.warning(
                "database %s (%s: %s); holding outcomes in memory and retrying",
                problem,
                what,
                type(e).__name__,
            )
        self.ok = False
        self.problem = problem
        self.back.clear()

    def answered(self) -> None:
        if not self.ok:
            log.info("database reachable again")
        self.ok = True
        self.back.set()

    async def pause(self, seconds: float) -> None:
        """Back off after a database error: `seconds`, or until the database is back."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.back.wait(), seconds)

    async def probe(self) -> bool:
        """Is the database back? Asking the pool (briefly) also has it try to reconnect now."""
        try:
            async with self.pool.connection(timeout=DB_PROBE_S) as conn:
                await conn.execute("SELECT 1")
        except DB_ERRORS:
            return False
        self.answered()
        return True
