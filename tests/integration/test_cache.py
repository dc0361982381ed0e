"""The result cache on real PostgreSQL and the machine's real Redis (127.0.0.1:6379)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from genworker.api.results import write_atomic
from genworker.config import ConfigError, Settings
from genworker.model import Job, Outcome, OutcomeKind
from genworker.node.dedupe import CacheGate
from genworker.queue.cache import (
    SHARED,
    Cache,
    PostgresCache,
    RedisCache,
    cache_key,
    is_cacheable,
    open_cache,
)
from genworker.queue.client import Client
from genworker.sim.server import tiny_png
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from queue_support import sync_queue

REDIS_URL = "redis://127.0.0.1:6379/0"
STORED = {"path": "/r/ab.png", "bytes": 318, "sha256": "ab" * 32, "mime": "image/png"}


def redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


def test_the_key_is_a_sha256_of_the_canonical_request_in_its_tenant() -> None:
    k = cache_key("https://api.example/", "gpt-image-1", "a cat", "1024x1024", 0, "acme")
    assert len(k) == 64
    assert k == cache_key("https://api.example", "gpt-image-1", "a cat", "1024x1024", 0, "acme")
    others = {
        cache_key("https://other.example", "gpt-image-1", "a cat", "1024x1024", 0, "acme"),
        cache_key("https://api.example", "dall-e-3", "a cat", "1024x1024", 0, "acme"),
        cache_key("https://api.example", "gpt-image-1", "a cat ", "1024x1024", 0, "acme"),
        cache_key("https://api.example", "gpt-image-1", "a cat", "512x512", 0, "acme"),
        cache_key("https://api.example", "gpt-image-1", "a cat", "1024x1024", 1, "acme"),
        cache_key("https://api.example", "gpt-image-1", "a cat", "1024x1024", 0, "globex"),
        cache_key("https://api.example", "gpt-image-1", "a cat", "1024x1024", 0, SHARED),
        # another option of the model is another image (a jpeg is not the png asked before)
        cache_key(
            "https://api.example",
            "gpt-image-1",
            "a cat",
            "1024x1024",
            0,
            "acme",
            {"output_format": "jpeg"},
        ),
        cache_key(
            "https://api.example",
            "gpt-image-1",
            "a cat",
            "1024x1024",
            0,
            "acme",
            {"quality": "high"},
        ),
    }
    assert k not in others
    assert len(others) == 9
    assert k == cache_key("https://api.example", "gpt-image-1", "a cat", "1024x1024", 0, "acme", {})


def test_only_stored_results_are_cacheable() -> None:
    assert is_cacheable(STORED)
    assert not is_cacheable({"url": "https://provider.example/expiring.png"})
    assert not is_cacheable({})
    assert not is_cacheable(None)


def keys(n: int) -> list[str]:
    run = secrets.token_hex(4)
    return [cache_key("http://sim", "m", f"prompt {run}", "8x8", i, "acme") for i in range(n)]


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


# ------------------------------------------------ the gate: tenants and stored files


def gate_settings(out: Path, **changes: Any) -> Settings:
    return Settings(cache="postgres", api_url="http://sim", output_dir=out, **changes)


def claim(dsn: str, client: Client, tenant: str, prompt: str) -> list[Job]:
    client.submit("start", prompt, tenant=tenant, n=1)
    with sync_queue(dsn) as q:
        return q.claim("node-a", 10, 30)


async def dispatch(gate: CacheGate, jobs: list[Job], out: Path) -> tuple[int, list[Outcome]]:
    """What the node does with claimed jobs, a stored PNG standing for the API call;
    returns the API calls made and every outcome."""
    calls, outcomes = 0, []
    run, hits = await gate.lookup(jobs)
    outcomes += hits
    for job in run:
        admitted = gate.admit(job)
        if isinstance(admitted, Outcome):
            outcomes.append(admitted)
            continue
        assert admitted is True
        calls += 1
        result = write_atomic(out, tiny_png(f"{job.job_id}".encode()), "image/png")
        done = Outcome(job.job_id, job.token, OutcomeKind.OK, result)
        shared, again = gate.settle(job, done)
        assert again == []
        outcomes += [done, *shared]
    await gate.store()
    return calls, outcomes


def run_gate(dsn: str, settings: Settings, jobs: list[Job]) -> tuple[int, list[Outcome]]:
    """One claimed batch through a fresh gate (so only the stored cache can answer it)."""

    async def main() -> tuple[int, list[Outcome]]:
        async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False) as pool:
            gate = CacheGate(PostgresCache(pool), settings)
            return await dispatch(gate, jobs, settings.resolved_output_dir)

    return asyncio.run(main())


@pytest.mark.parametrize(("shared", "calls"), [(False, 2), (True, 1)])
def test_two_tenants_asking_the_same_share_an_image_only_when_the_operator_says_so(
    dsn: str, client: Client, tmp_path: Path, shared: bool, calls: int
) -> None:
    settings = gate_settings(tmp_path, cache_shared=shared)
    made, _ = run_gate(dsn, settings, claim(dsn, client, "acme", "a cat"))
    more, second = run_gate(dsn, settings, claim(dsn, client, "globex", "a cat"))
    assert made + more == calls
    assert bool(second[0].result and second[0].result.get("cached")) is shared


def test_twins_of_two_tenants_in_one_batch_are_not_merged(
    dsn: str, client: Client, tmp_path: Path
) -> None:
    client.submit("start", "a dog", tenant="acme", n=1)
    jobs = claim(dsn, client, "globex", "a dog")
    assert len(jobs) == 2
    assert run_gate(dsn, gate_settings(tmp_path), jobs)[0] == 2


@pytest.mark.parametrize("tamper", ["path outside", "path traversal", "file changed", "none"])
def test_a_tampered_entry_is_a_miss(
    dsn: str, client: Client, conn: psycopg.Connection, tmp_path: Path, tamper: str
) -> None:
    out = tmp_path / "out"
    secret = tmp_path / "secret.png"
    secret.write_bytes(tiny_png(b"someone else's"))
    settings = gate_settings(out)
    run_gate(dsn, settings, claim(dsn, client, "acme", "a fox"))
    (row,) = conn.execute("SELECT result FROM genworker.cache").fetchall()
    stored = row[0]
    if tamper == "path outside":
        stored["path"] = str(secret)
        stored["sha256"] = hashlib.sha256(secret.read_bytes()).hexdigest()
    elif tamper == "path traversal":
        stored["path"] = str(out / ".." / "secret.png")
        stored["sha256"] = hashlib.sha256(secret.read_bytes()).hexdigest()
    elif tamper == "file changed":
        Path(stored["path"]).write_bytes(tiny_png(b"replaced"))
    conn.execute("UPDATE genworker.cache SET result = %s", [Jsonb(stored)])
    conn.commit()
    calls, outcomes = run_gate(dsn, settings, claim(dsn, client, "acme", "a fox"))
    assert calls == (0 if tamper == "none" else 1)
    assert outcomes[0].result is not None
    assert outcomes[0].result["path"] != str(secret)


def test_a_result_kept_in_memory_serves_twins_only_for_a_moment() -> None:
    """Past RECENT_S the cache table answers (its TTL, its file checks), not the node's
    memory of a result it may since have expired or pruned."""
    import time

    from genworker.config import Settings
    from genworker.model import Job, Outcome
    from genworker.node.dedupe import RECENT_S, CacheGate

    gate = CacheGate(None, Settings(api_url="http://127.0.0.1:9"))  # type: ignore[arg-type]
    image = {"path": "/results/x.png", "sha256": "0" * 64}
    fresh = Job(1, 1, 10, 0, "image", {"prompt": "p"}, 1)
    stale = Job(2, 1, 11, 0, "image", {"prompt": "q"}, 1)
    gate.keys |= {fresh.job_id: "k-fresh", stale.job_id: "k-stale"}
    gate.recent["k-fresh"] = (image, time.monotonic())
    gate.recent["k-stale"] = (image, time.monotonic() - RECENT_S - 1)
    served = gate.admit(fresh)
    assert isinstance(served, Outcome)
    assert served.result == {**image, "cached": True}
    assert gate.admit(stale) is True  # dispatched: it leads its key again
    assert "k-stale" not in gate.recent
