-- Result cache queries (genworker/queue/cache.py). Keys and results go in as arrays: one round trip per batch.

-- cache_get --
-- The live entries among the given keys.
SELECT key, result
FROM genworker.cache
WHERE key = ANY(%(keys)s::text[]) AND expires_at > now();

-- cache_tenants --
-- The tenant of each given task: a cache key is scoped by it.
SELECT id, tenant
FROM genworker.tasks
WHERE id = ANY(%(task_ids)s::bigint[]);

-- cache_put --
-- Insert or refresh entries; each lives ttl_s seconds from now.
INSERT INTO genworker.cache (key, result, created_at, expires_at)
SELECT k, r, now(), now() + make_interval(secs => %(ttl_s)s)
FROM unnest(%(keys)s::text[], %(results)s::jsonb[]) AS t(k, r)
ON CONFLICT (key) DO UPDATE
SET result = EXCLUDED.result, created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at;

-- cache_prune --
-- Delete up to `limit` expired entries, oldest first (the caller repeats while it gets a full batch).
DELETE FROM genworker.cache
WHERE key IN (
    SELECT key FROM genworker.cache
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT %(limit)s
);
