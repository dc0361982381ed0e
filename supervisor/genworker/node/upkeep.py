"""The node's upkeep beside the work: renew its leases and heartbeat, share the API
rate among live nodes, reap other nodes' expired leases and prune old tasks. Each loop
rides out database errors like the feeder's own loops do."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from genworker.node.feeder import DB_ERRORS, DB_PROBE_S, Feeder
from genworker.queue.store import sleep_unless

log = logging.getLogger("genworker.feeder")

PRUNE_EVERY_S = 300.0
PRUNE_BATCH = 500


async def lease_loop(f: Feeder, stop: asyncio.Event, info: Callable[[], dict[str, Any]]) -> None:
    """Renew every lease this node holds (well before lease/2) and say it is alive."""
    every = max(0.2, f.settings.lease_s / 3)
    while not stop.is_set():
        if not f.db_ok and not await f.probe_db():
            # away: probe often (the other loops wait in the pool's queue meanwhile)
            await sleep_unless(stop, DB_PROBE_S)
            continue
        try:
            f.stats.renewed += await f.queue.renew(f.node, f.settings.lease_s, f.held_ids())
            f.live_nodes = await f.queue.heartbeat(f.node, sum(1 for _ in f.holders()), info())
            f.db_answered()
            share_rate(f)
        except DB_ERRORS as e:
            f.db_failed("lease renewal", e)
        await sleep_unless(stop, every)


def share_rate(f: Feeder) -> None:
    """Give this host its share of the cluster-wide --api-rps: one live node's worth."""
    if f.bucket is not None:
        rps = f.settings.api_rps
        f.bucket.set_rate(rps / f.live_nodes if rps else None)


def reap_every_s(lease_s: float) -> float:
    return max(0.5, min(5.0, lease_s / 3))


async def reap_loop(f: Feeder, stop: asyncio.Event) -> None:
    """Requeue expired leases of any node and mark silent nodes dead (safe from every node
    at once), and prune finished tasks past the retention in small batches."""
    every = reap_every_s(f.settings.lease_s)
    stale = max(f.settings.lease_s, 3 * every)
    next_prune = time.monotonic() + 60
    while not stop.is_set():
        try:
            r = await f.queue.reap(stale, f.settings.max_worker_deaths)
            if r.requeued or r.dead_jobs or r.dead_nodes:
                log.info(
                    "reaper: %d expired leases requeued, %d jobs dead, %d nodes marked dead",
                    r.requeued, r.dead_jobs, r.dead_nodes,
                )  # fmt: skip
                f.stats.reaped += r.requeued
                f.poke()
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_EVERY_S
                await f.queue.prune(f.settings.retention_s, PRUNE_BATCH)
        except DB_ERRORS as e:
            f.db_failed("reaper", e)
        await sleep_unless(stop, every)
