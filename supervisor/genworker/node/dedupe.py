"""The cache gate in front of dispatch: identical image requests cost one API call.

With `--cache`, the supervisor (the only process with a DB connection) looks
every claimed image job up in the cache before it reaches a worker: a hit is
completed at once with the stored result. Among the misses, jobs with the same
request key as one already running wait for it (they "follow" the leader):
when the leader succeeds they share its result; when it fails or its worker
dies, they go back to the buffer and the next one leads.

Keys are scoped by tenant (unless --cache-shared), so one tenant never receives another's
image nor learns from a hit's speed what another asked for. A stored entry is used only
if its file is inside --output-dir and still has the sha256 it was stored with: an entry
pointing elsewhere (a tampered cache) or at a changed file is a miss.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genworker.config import Settings
from genworker.contract import TASK_OPTIONS
from genworker.model import Job, Outcome, OutcomeKind
from genworker.queue.cache import SHARED, Cache, cache_key, is_cacheable

log = logging.getLogger("genworker.cache")

RECENT = 10_000  # results kept in memory for twins that reach dispatch after their leader
RECENT_S = 60.0  # ... for this long: past it the cache itself (TTL, file checks) answers


@dataclass
class GateStats:
    hits: int = 0
    misses: int = 0
    merged: int = 0
    stored: int = 0
    errors: int = 0
    rejected: int = 0  # entries not used: outside the output dir, or the file changed


class CacheGate:
    def __init__(self, cache: Cache, settings: Settings) -> None:
        self.cache = cache
        self.settings = settings
        self.keys: dict[int, str] = {}  # job id -> request key, for image jobs we hold
        self.leaders: dict[str, int] = {}  # request key -> job id of the one running it
        self.followers: dict[str, list[Job]] = {}  # request key -> jobs waiting for it
        self.to_store: dict[str, dict[str, Any]] = {}
        # key -> (result, when): a twin claimed just after its leader finished, before the
        # result reached the cache table
        self.recent: OrderedDict[str, tuple[dict[str, Any], float]] = OrderedDict()
        self.stats = GateStats()

    def key(self, job: Job, tenant: str | None) -> str | None:
        """The job's request key within `tenant` (SHARED: every tenant's)."""
        if job.kind != "image":
            return None
        p = job.params
        prompt = p.get("prompt")
        if not isinstance(prompt, str):
            return None
        return cache_key(
            self.settings.api_url or "",
            str(p.get("model") or self.settings.model),
            prompt,
            str(p.get("size") or self.settings.size),
            job.idx,
            tenant,
            {o: p[o] for o in TASK_OPTIONS if o in p},
        )

    async def _scopes(self, jobs: list[Job]) -> dict[int, str | None]:
        """task id -> the scope of its keys; a task left out is neither cached nor merged."""
        task_ids = sorted({j.task_id for j in jobs if j.kind == "image"})
        if self.settings.cache_shared:
            return dict.fromkeys(task_ids, SHARED)
        if not task_ids:
            return {}
        try:
            return dict(await self.cache.tenants(task_ids))
        except Exception as e:  # unknown tenants: run the jobs, share nothing
            self.stats.errors += 1
            log.warning("cache tenant lookup failed (%s); running the jobs", type(e).__name__)
            return {}

    async def lookup(self, jobs: list[Job]) -> tuple[list[Job], list[Outcome]]:
        """Split claimed jobs into those to run and outcomes for the cache hits."""
        scopes = await self._scopes(jobs)
        keyed = {}
        for j in jobs:
            k = self.key(j, scopes[j.task_id]) if j.task_id in scopes else None
            if k is not None:
                keyed[j.job_id] = k
        if not keyed:
            return jobs, []
        try:
            found = await self.cache.get_many(sorted(set(keyed.values())))
        except Exception as e:  # a cache outage must not stop the work: run the jobs
            self.stats.errors += 1
            log.warning("cache lookup failed (%s); running the jobs", type(e).__name__)
            found = {}
        if found:  # reading files to hash them: off the supervisor's loop
            out_dir = self.settings.resolved_output_dir
            good = await asyncio.to_thread(_verified, found, out_dir)
            self.stats.rejected += len(found) - len(good)
            found = good
        run, hits = [], []
        for j in jobs:
            k = keyed.get(j.job_id)
            if k is not None and k in found:
                hits.append(
                    Outcome(
                        j.job_id, j.token, OutcomeKind.OK, {**found[k], "cached": True}, api_calls=0
                    )
                )
                continue
            if k is not None:
                self.keys[j.job_id] = k
            run.append(j)
        self.stats.hits += len(hits)
        self.stats.misses += len(run)
        return run, hits

    def admit(self, job: Job) -> bool | Outcome:
        """True: dispatch it (it leads its key). False: it waits for the running twin.
        An Outcome: its twin already finished here, and this is its result."""
        k = self.keys.get(job.job_id)
        if k is None:
            return True
        kept = self.recent.get(k)
        if kept is not None and time.monotonic() - kept[1] > RECENT_S:
            del self.recent[k]  # stale: the cache may have expired it, its file may be gone
            kept = None
        if kept is not None:
            del self.keys[job.job_id]
            self.stats.hits += 1
            self.stats.misses -= 1
            return Outcome(
                job.job_id,
                job.token,
                OutcomeKind.OK,
                {**kept[0], "cached": True},
                api_calls=0,
            )
        if k in self.leaders and self.leaders[k] != job.job_id:
            self.followers.setdefault(k, []).append(job)
            self.stats.merged += 1
            return False
        self.leaders[k] = job.job_id
        return True

    def settle(self, job: Job, outcome: Outcome) -> tuple[list[Outcome], list[Job]]:
        """The leader finished: outcomes for its followers, or the followers to run again."""
        k = self.keys.pop(job.job_id, None)
        if k is None or self.leaders.get(k) != job.job_id:
            return [], []
        del self.leaders[k]
        waiting = self.followers.pop(k, [])
        if outcome.kind is not OutcomeKind.OK or outcome.result is None:
            return [], waiting
        # the image is shared; the tokens were spent once, by the leader's call
        image = {key: v for key, v in outcome.result.items() if key != "usage"}
        if is_cacheable(image):
            self.to_store[k] = image
            self.recent[k] = (image, time.monotonic())
            if len(self.recent) > RECENT:
                self.recent.popitem(last=False)
        for f in waiting:
            self.keys.pop(f.job_id, None)
        shared = [
            Outcome(f.job_id, f.token, OutcomeKind.OK, {**image, "merged": True}, api_calls=0)
            for f in waiting
        ]
        return shared, []

    def drop(self, jobs: Iterable[Job]) -> list[Job]:
        """These jobs leave without an outcome (worker died, released): free their keys."""
        back: list[Job] = []
        for j in jobs:
            k = self.keys.pop(j.job_id, None)
            if k is not None and self.leaders.get(k) == j.job_id:
                del self.leaders[k]
                back.extend(self.followers.pop(k, []))
        return back

    def waiting(self) -> int:
        """How many followers wait for a leader (a reading: changes nothing)."""
        return sum(map(len, self.followers.values()))

    def waiting_ids(self) -> list[int]:
        return [j.job_id for js in self.followers.values() for j in js]

    def take_all(self) -> list[Job]:
        """Every follower still waiting, taken out of the gate (to give back at shutdown)."""
        out = [j for js in self.followers.values() for j in js]
        for j in out:
            self.keys.pop(j.job_id, None)
        self.followers.clear()
        return out

    async def store(self) -> None:
        if not self.to_store:
            return
        items, self.to_store = self.to_store, {}
        try:
            await self.cache.put_many(items, self.settings.cache_ttl_s)
            self.stats.stored += len(items)
        except Exception as e:  # losing a cache write costs a future call, nothing more
            self.stats.errors += 1
            log.warning("cache write failed (%s)", type(e).__name__)


def _verified(found: dict[str, dict[str, Any]], out_dir: Path) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in found.items() if stored_intact(v, out_dir)}


def stored_intact(result: dict[str, Any], out_dir: Path) -> bool:
    """The entry's image is inside `out_dir` (symlinks resolved) with the sha256 it was
    stored under; an inline (b64) result has that sha256 too."""
    digest = result.get("sha256")
    if not isinstance(digest, str):
        return False
    path = result.get("path")
    if isinstance(path, str):
        real = os.path.realpath(path)
        base = os.path.realpath(out_dir)
        if os.path.dirname(real) != base:  # results are files directly in the output dir
            return False
        try:
            with open(real, "rb") as fh:
                return hashlib.file_digest(fh, "sha256").hexdigest() == digest
        except OSError:
            return False
    b64 = result.get("b64")
    if isinstance(b64, str):
        try:
            return hashlib.sha256(base64.b64decode(b64, validate=True)).hexdigest() == digest
        except (binascii.Error, ValueError):
            return False
    return False
