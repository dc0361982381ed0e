"""The cache gate in front of dispatch: identical image requests cost one API call.

With `--cache`, the supervisor (the only process with a DB connection) looks
every claimed image job up in the cache before it reaches a worker: a hit is
completed at once with the stored result. Among the misses, jobs with the same
request key as one already running wait for it (they "follow" the leader):
when the leader succeeds they share its result; when it fails or its worker
dies, they go back to the buffer and the next one leads.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from genworker.config import Settings
from genworker.model import Job, Outcome, OutcomeKind
from genworker.queue.cache import Cache, cache_key, is_cacheable

log = logging.getLogger("genworker.cache")

RECENT = 10_000  # results kept in memory for twins that reach dispatch after their leader


@dataclass
class GateStats:
    hits: int = 0
    misses: int = 0
    merged: int = 0
    stored: int = 0
    errors: int = 0


class CacheGate:
    def __init__(self, cache: Cache, settings: Settings) -> None:
        self.cache = cache
        self.settings = settings
        self.keys: dict[int, str] = {}  # job id -> request key, for image jobs we hold
        self.leaders: dict[str, int] = {}  # request key -> job id of the one running it
        self.followers: dict[str, list[Job]] = {}  # request key -> jobs waiting for it
        self.to_store: dict[str, dict[str, Any]] = {}
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.stats = GateStats()

    def key(self, job: Job) -> str | None:
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
        )

    async def lookup(self, jobs: list[Job]) -> tuple[list[Job], list[Outcome]]:
        """Split claimed jobs into those to run and outcomes for the cache hits."""
        keyed = {}
        for j in jobs:
            k = self.key(j)
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
        if k in self.recent:
            del self.keys[job.job_id]
            self.stats.hits += 1
            self.stats.misses -= 1
            return Outcome(
                job.job_id,
                job.token,
                OutcomeKind.OK,
                {**self.recent[k], "cached": True},
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
        if is_cacheable(outcome.result):
            self.to_store[k] = outcome.result
            self.recent[k] = outcome.result
            if len(self.recent) > RECENT:
                self.recent.popitem(last=False)
        for f in waiting:
            self.keys.pop(f.job_id, None)
        shared = [
            Outcome(
                f.job_id, f.token, OutcomeKind.OK, {**outcome.result, "merged": True}, api_calls=0
            )
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
