"""The result cache: identical requests served from an earlier stored result.

A key is the sha256 of a canonical JSON of the request (provider URL, model,
prompt, size, variation index) and its scope: the tenant, unless the operator
shares results across tenants (`--cache-shared`; tenants then receive each other's
images, and a hit's speed tells one tenant what another asked for). Values are stored
results (file path, bytes, sha256, mime), never a bare provider URL: those expire, often
within the hour.
The supervisor, the only process with a DB connection, looks keys up before it
dispatches jobs and writes results after; merging identical requests in flight
happens in its dispatcher. Backends: a PostgreSQL table (default) or Redis.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from genworker.config import ConfigError, Settings
from genworker.queue import sql

KEY_VERSION = 3  # bump when the key's recipe changes, so old entries stop matching
PRUNE_BATCH = 1000
SHARED = None  # the scope of a key shared by every tenant


def cache_key(
    provider_url: str,
    model: str,
    prompt: str,
    size: str,
    index: int,
    tenant: str | None,
    options: Mapping[str, Any] | None = None,
) -> str:
    """sha256 hex of the canonical request within its scope (a tenant, or SHARED); the same
    request of the same tenant always gives the same key. `options` are the model options
    the task carries (quality, output_format, ...): another option is another image."""
    canonical = json.dumps(
        {
            "v": KEY_VERSION,
            "provider": provider_url.rstrip("/"),
            "model": model,
            "prompt": prompt,
            "size": size,
            "index": index,
            "tenant": tenant,
            "options": dict(options or {}),
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def is_cacheable(result: dict[str, Any] | None) -> bool:
    """A stored file (or inline bytes) is; an unfetched provider URL is not."""
    return result is not None and ("sha256" in result or "b64" in result)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0


async def tenants_of(pool: AsyncConnectionPool, task_ids: list[int]) -> dict[int, str]:
    """The tenant of each task (one query for a claimed batch)."""
    if not task_ids:
        return {}
    async with pool.connection() as conn:
        cur = await conn.execute(sql.query("cache_tenants"), {"task_ids": task_ids})
        return {task_id: tenant for task_id, tenant in await cur.fetchall()}


class Cache(Protocol):
    stats: CacheStats

    async def tenants(self, task_ids: list[int]) -> dict[int, str]: ...

    async def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]: ...

    async def put_many(self, items: dict[str, dict[str, Any]], ttl_s: float) -> None: ...

    async def prune(self) -> int: ...

    async def close(self) -> None: ...


@dataclass
class PostgresCache:
    """The genworker.cache table, over the supervisor's connection pool."""

    pool: AsyncConnectionPool
    stats: CacheStats = field(default_factory=CacheStats)

    async def tenants(self, task_ids: list[int]) -> dict[int, str]:
        return await tenants_of(self.pool, task_ids)

    async def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        if not keys:
            return {}
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql.query("cache_get"), {"keys": list(keys)})
            found = {key: result for key, result in await cur.fetchall()}
        self.stats.hits += len(found)
        self.stats.misses += len(set(keys)) - len(found)
        return found

    async def put_many(self, items: dict[str, dict[str, Any]], ttl_s: float) -> None:
        items = {k: v for k, v in items.items() if is_cacheable(v)}
        if not items:
            return
        params = {
            "keys": list(items),
            "results": [Jsonb(v) for v in items.values()],
            "ttl_s": float(ttl_s),
        }
        async with self.pool.connection() as conn:
            await conn.execute(sql.query("cache_put"), params)
        self.stats.writes += len(items)

    async def prune(self) -> int:
        """Delete expired entries in batches; returns how many."""
        total = 0
        while True:
            async with self.pool.connection() as conn:
                cur = await conn.execute(sql.query("cache_prune"), {"limit": PRUNE_BATCH})
                total += cur.rowcount
            if cur.rowcount < PRUNE_BATCH:
                return total

    async def close(self) -> None:
        """The pool is the supervisor's: nothing of ours to close."""


class RedisCache:
    """Redis (`redis` package, the optional extra): entries expire by themselves (PX)."""

    PREFIX = "genworker:cache:"

    def __init__(self, url: str, pool: AsyncConnectionPool | None = None) -> None:
        self.pool = pool  # the queue's database knows each task's tenant
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise ConfigError(
                "--cache redis://... needs the redis package: pip install 'genworker[redis]'"
            ) from None
        self.stats = CacheStats()
        self._redis = aioredis.from_url(url)

    async def tenants(self, task_ids: list[int]) -> dict[int, str]:
        """Without the queue's pool no tenant is known: nothing is cached or shared."""
        return await tenants_of(self.pool, task_ids) if self.pool is not None else {}

    async def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        if not keys:
            return {}
        unique = list(dict.fromkeys(keys))
        values = await self._redis.mget([self.PREFIX + k for k in unique])
        found: dict[str, dict[str, Any]] = {}
        for key, raw in zip(unique, values, strict=True):
            if raw is not None:
                try:
                    found[key] = json.loads(raw)
                except ValueError:
                    continue  # not ours or damaged: a miss, and the next put overwrites it
        self.stats.hits += len(found)
        self.stats.misses += len(unique) - len(found)
        return found

    async def put_many(self, items: dict[str, dict[str, Any]], ttl_s: float) -> None:
        items = {k: v for k, v in items.items() if is_cacheable(v)}
        if not items:
            return
        ttl_ms = max(1, int(ttl_s * 1000))
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, value in items.items():
                pipe.set(self.PREFIX + key, json.dumps(value, separators=(",", ":")), px=ttl_ms)
            await pipe.execute()
        self.stats.writes += len(items)

    async def prune(self) -> int:
        return 0  # Redis expires keys itself

    async def close(self) -> None:
        await self._redis.aclose()


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def open_cache(settings: Settings, pool: AsyncConnectionPool | None) -> Cache | None:
    """The cache --cache names: None when off, "postgres" (the pool's DB) or a redis:// URL."""
    spec = (settings.cache or "").strip()
    if not spec or spec.lower() in ("off", "none", "no"):
        return None
    if spec.lower() in ("postgres", "postgresql", "pg"):
        if pool is None:
            raise ConfigError("--cache postgres needs the supervisor's database pool")
        return PostgresCache(pool)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisCache(spec, pool)
    raise ConfigError(
        f"--cache: expected postgres or redis://host:port/db, got {_mask_url(spec)!r}"
    )
