"""The node's upkeep beside the work: renew its leases and heartbeat, share the API
rate among live nodes, reap other nodes' expired leases and prune old tasks. Each loop
rides out database errors like the feeder's own loops do."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from genworker.api.results import remove_results
from genworker.node.dbhealth import DB_ERRORS, DB_PROBE_S
from genworker.node.feeder import Feeder
from genworker.queue.store import sleep_unless

log = logging.getLogger("genworker.feeder")

PRUNE_EVERY_S = 300.0
PRUNE_BATCH = 500

SetRate = Callable[[float | None], None]  # the host's API token bucket's rate, per second


async def lease_loop(
    f: Feeder,
    stop: asyncio.Event,
    info: Callable[[], dict[str, Any]],
    set_api_rate: SetRate | None = None,
) -> None:
    """Renew every lease this node holds (well before lease/2) and say it is alive."""
    every = max(0.2, f.settings.lease_s / 3)
    while not stop.is_set():
        if not f.db.ok and not await f.db.probe():
            # away: probe often (the other loops wait in the pool's queue meanwhile)
            await sleep_unless(stop, DB_PROBE_S)
            continue
        try:
            f.publish.clear()  # what info() reads now is published below
            held = f.holdings.ids()
            f.stats.renewed += await f.queue.renew(f.node, f.settings.lease_s, held)
            workers = sum(1 for _ in f.holders())
            f.note_live_nodes(await f.queue.heartbeat(f.node, workers, info()))
            f.db.answered()
            if set_api_rate is not None:
                set_api_rate(rate_share(f.settings.api_rps, f.live_nodes))
        except DB_ERRORS as e:
            f.db.failed("lease renewal", e)
        await _beat_due(stop, f.publish, every)


async def _beat_due(stop: asyncio.Event, publish: asyncio.Event, every: float) -> None:
    """Wait for the next heartbeat: `every`, or sooner when the published row went stale (a
    worker came up: `status` shows a new node's workers at once, not one beat later)."""
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(publish.wait())]
    try:
        await asyncio.wait(waits, timeout=every, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def rate_share(api_rps: float | None, live_nodes: int) -> float | None:
    """This host's share of the cluster-wide --api-rps: one live node's worth."""
    return api_rps / live_nodes if api_rps else None


async def prune_batch(f: Feeder) -> None:
    """Prune one batch of old finished tasks, and delete their result files from this
    host's output directory (files no remaining job names: a cached result is shared)."""
    pruned, files = await f.queue.prune_with_files(f.settings.retention_s, PRUNE_BATCH)
    removed = await asyncio.to_thread(remove_results, f.settings.resolved_output_dir, files)
    if pruned:
        log.info(
            "pruned %d tasks finished over %gs ago, and %d of their result files",
            pruned, f.settings.retention_s, removed,
        )  # fmt: skip


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
                await prune_batch(f)
        except DB_ERRORS as e:
            f.db.failed("reaper", e)
        await sleep_unless(stop, every)
