"""The result cache on real PostgreSQL and the machine's real Redis (127.0.0.1:6379)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from genworker.config import ConfigError, Settings
from genworker.queue.cache import (
    Cache,
    PostgresCache,
    RedisCache,
    cache_key,
    is_cacheable,
    open_cache,
)
from psycopg_pool import AsyncConnectionPool

REDIS_URL = "redis://127.0.0.1:6379/0"
STORED = {"path": "/r/ab.png", "bytes": 318, "sha256": "ab" * 32, "mime": "image/png"}


def redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


def test_the_key_is_a_sha256_of_the_canonical_request() -> None:
    k = cache_key("https://api.example/", "gpt-image-1", "a cat", "1024x1024", 0)
    assert len(k) == 64
    assert k == cache_key("https://api.example", "gpt-image-1", "a cat", "1024x1024", 0)
    others = {
        cache_key("https://other.example", "gpt-image-1", "a cat", "1024x1024", 0),
        cache_key("https://api.example", "dall-e-3", "a cat", "1024x1024", 0),
        cache_key("https://api.example", "gpt-image-1", "a cat ", "1024x1024", 0),
        cache_key("https://api.example", "gpt-image-1", "a cat", "512x512", 0),
        cache_key("https://api.example", "gpt-image-1", "a cat", "1024x1024", 1),
    }
    assert k not in others
    assert len(others) == 5


def test_only_stored_results_are_cacheable() -> None:
    assert is_cacheable(STORED)
    assert not is_cacheable({"url": "https://provider.example/expiring.png"})
    assert not is_cacheable({})
    assert not is_cacheable(None)


def keys(n: int) -> list[str]:
    run = secrets.token_hex(4)
    return [cache_key("http://sim", "m", f"prompt {run}", "8x8", i) for i in range(n)]


async def hits_then_expiry(cache: Cache) -> None:
    k = keys(3)
    assert await cache.get_many(k) == {}
    await cache.put_many({k[0]: STORED, k[1]: {**STORED, "bytes": 1}}, ttl_s=60)
    await cache.put_many({k[2]: {"url": "https://provider.example/x.png"}}, ttl_s=60)
    assert await cache.get_many(k) == {k[0]: STORED, k[1]: {**STORED, "bytes": 1}}
    assert (cache.stats.hits, cache.stats.misses, cache.stats.writes) == (2, 4, 2)
    await cache.put_many({k[0]: STORED}, ttl_s=0.3)  # a refresh also resets the TTL
    await asyncio.sleep(0.5)
    assert set(await cache.get_many(k)) == {k[1]}


def run_pg(dsn: str, scenario: Callable[[PostgresCache], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False) as pool:
            cache = open_cache(Settings(cache="postgres"), pool)
            assert isinstance(cache, PostgresCache)
            try:
                return await scenario(cache)
            finally:
                await cache.close()

    return asyncio.run(main())


def test_postgres_cache_hits_and_expires(dsn: str) -> None:
    run_pg(dsn, hits_then_expiry)


def test_postgres_prune_deletes_only_expired_rows(dsn: str, conn: psycopg.Connection) -> None:
    async def scenario(cache: PostgresCache) -> int:
        k = keys(4)
        await cache.put_many({k[0]: STORED, k[1]: STORED}, ttl_s=0.2)
        await cache.put_many({k[2]: STORED, k[3]: STORED}, ttl_s=3600)
        await asyncio.sleep(0.3)
        return await cache.prune()

    assert run_pg(dsn, scenario) == 2
    assert conn.execute("SELECT count(*) FROM genworker.cache").fetchone() == (2,)
    assert conn.execute(
        "SELECT 1 FROM pg_indexes WHERE schemaname = 'genworker' AND indexname = 'cache_expires'"
    ).fetchone()


@pytest.mark.skipif(not redis_up(), reason="no Redis on 127.0.0.1:6379")
def test_redis_cache_hits_and_expires() -> None:
    async def main() -> None:
        cache = open_cache(Settings(cache=REDIS_URL), None)
        assert isinstance(cache, RedisCache)
        try:
            await hits_then_expiry(cache)
            assert await cache.prune() == 0  # Redis expires keys itself
        finally:
            await cache.close()

    asyncio.run(main())


def test_open_cache_is_off_by_default_and_refuses_unknown_backends() -> None:
    assert open_cache(Settings(), None) is None
    with pytest.raises(ConfigError, match="expected postgres or redis") as caught:
        open_cache(Settings(cache="memcached://u:hunter2@h"), None)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigError, match="pool"):
        open_cache(Settings(cache="postgres"), None)


def test_a_ttl_is_wall_clock_seconds(dsn: str) -> None:
    async def scenario(cache: PostgresCache) -> float:
        k = keys(1)
        await cache.put_many({k[0]: STORED}, ttl_s=1.0)
        start = time.monotonic()
        while await cache.get_many(k):
            await asyncio.sleep(0.05)
            assert time.monotonic() - start < 5
        return time.monotonic() - start

    assert 0.8 <= run_pg(dsn, scenario) < 2.0
