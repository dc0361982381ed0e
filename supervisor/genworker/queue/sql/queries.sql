-- genworker queries. Each block starts with "-- name --" and a one-line comment;
-- parameters are named. Most of the logic lives in the functions of migrations/.

-- migrate_lock --
-- Serialise migrations across hosts for the rest of the transaction.
SELECT pg_advisory_xact_lock(hashtextextended('genworker.migrate', 0))

-- migrate_bootstrap --
-- The bookkeeping table migrations are recorded in.
CREATE SCHEMA IF NOT EXISTS genworker;
CREATE TABLE IF NOT EXISTS genworker.migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- applied_migrations --
-- Versions already applied.
SELECT version FROM genworker.migrations ORDER BY version

-- record_migration --
-- Mark one migration as applied.
INSERT INTO genworker.migrations (version, name) VALUES (%(version)s, %(name)s)

-- schema_version --
-- The newest applied migration, or NULL on an empty database.
SELECT CASE WHEN to_regclass('genworker.migrations') IS NULL THEN NULL
            ELSE (SELECT max(version) FROM genworker.migrations) END AS version

-- upsert_plan --
-- Keep the plans table in step with the settings (tenant_cap NULL: the tenant_cap setting).
INSERT INTO genworker.plans (name, images, priority, tenant_cap)
VALUES (%(name)s, %(images)s, %(priority)s, %(tenant_cap)s)
ON CONFLICT (name) DO UPDATE
SET images = excluded.images, priority = excluded.priority, tenant_cap = excluded.tenant_cap
WHERE (plans.images, plans.priority, plans.tenant_cap)
      IS DISTINCT FROM (excluded.images, excluded.priority, excluded.tenant_cap)

-- delete_other_plans --
-- Forget plans the settings no longer name (existing tasks keep their copy of the priority).
DELETE FROM genworker.plans WHERE NOT (name = ANY (%(names)s))

-- upsert_setting --
-- Keep one SQL-side setting in step with the settings.
INSERT INTO genworker.settings (key, value) VALUES (%(key)s, %(value)s)
ON CONFLICT (key) DO UPDATE SET value = excluded.value
WHERE settings.value IS DISTINCT FROM excluded.value

-- submit_task --
-- Submit one task (validated in SQL); returns its id.
SELECT genworker.submit_task(%(plan)s, %(params)s, %(tenant)s, %(kind)s, %(idempotency_key)s, %(n)s) AS id

-- submit_tasks --
-- Submit many tasks in one round trip; returns their ids in order.
SELECT genworker.submit_tasks(%(tasks)s) AS ids

-- claim_jobs --
-- Claim up to n of the most urgent runnable jobs under a lease, with each one's order key
-- (params as text: the jobs of one task share it, so the caller decodes it once per task).
SELECT job_id, token, task_id, idx, kind, attempt, params::text AS params, deaths, urgency
  FROM genworker.claim_jobs(%(node)s, %(n)s, %(lease_s)s)

-- complete_jobs --
-- Write a batch of outcomes, fenced by token; returns the rows that changed. The batch is
-- one JSON array of [id, token, kind, result, error, delay], unpacked here into the arrays
-- genworker.complete_jobs takes (one parameter is much cheaper to send than six arrays).
SELECT c.job_id, c.status
  FROM (SELECT array_agg((o ->> 0)::bigint ORDER BY n) AS ids,
               array_agg((o ->> 1)::bigint ORDER BY n) AS tokens,
               array_agg(o ->> 2 ORDER BY n) AS kinds,
               array_agg(nullif(o -> 3, 'null') ORDER BY n) AS results,
               array_agg(o ->> 4 ORDER BY n) AS errors,
               array_agg((o ->> 5)::float8 ORDER BY n) AS delays
          FROM jsonb_array_elements(%(batch)s::jsonb) WITH ORDINALITY AS b(o, n)) a,
       genworker.complete_jobs(a.ids, a.tokens, a.kinds, a.results, a.errors, a.delays,
                               %(snooze_max_s)s) c

-- release_jobs --
-- Give held jobs back (shutdown, or a worker died holding them); returns the rows that changed.
SELECT job_id, status FROM genworker.release_jobs(%(ids)s, %(tokens)s, %(reason)s, %(max_deaths)s)

-- release_node --
-- Give back every job a node id still holds (a restarted supervisor's previous life).
SELECT r.job_id, r.status
  FROM (SELECT array_agg(id ORDER BY id) AS ids, array_agg(token ORDER BY id) AS tokens
          FROM genworker.jobs
         WHERE status = 'running' AND lease_owner = %(node)s AND lease_expires IS NOT NULL) held,
       genworker.release_jobs(held.ids, held.tokens, NULL, 1) r

-- renew_leases --
-- Extend the lease of every job a node holds (the ids it keeps track of), in one
-- statement; returns how many. A job it lost track of is left to expire.
WITH r AS (
    UPDATE genworker.jobs SET lease_expires = now() + make_interval(secs => %(lease_s)s)
     WHERE id = ANY(%(ids)s::bigint[]) AND status = 'running' AND lease_owner = %(node)s
       AND lease_expires IS NOT NULL
    RETURNING 1
) SELECT count(*) AS renewed FROM r

-- node_row --
-- Who last ran under a node id, and how long ago it was heard of.
SELECT host, pid, status, extract(epoch FROM now() - heartbeat_at) AS silent_s
  FROM genworker.nodes WHERE id = %(node)s

-- register_node --
-- Announce a node (or bring a restarted one back to life).
INSERT INTO genworker.nodes (id, host, pid, workers, status, info)
VALUES (%(node)s, %(host)s, %(pid)s, %(workers)s, 'alive', %(info)s)
ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid,
    workers = excluded.workers, status = 'alive', started_at = now(), heartbeat_at = now(),
    info = excluded.info

-- heartbeat_node --
-- A node is alive; returns the live node count (for sharing cluster-wide limits).
WITH h AS (
    UPDATE genworker.nodes SET heartbeat_at = now(), workers = %(workers)s, info = %(info)s,
           status = 'alive'
     WHERE id = %(node)s
)
SELECT count(*) + CASE WHEN EXISTS (SELECT 1 FROM genworker.nodes WHERE id = %(node)s AND status = 'alive')
                       THEN 0 ELSE 1 END AS live_nodes
  FROM genworker.nodes WHERE status = 'alive'

-- stop_node --
-- A node shut down cleanly.
UPDATE genworker.nodes SET status = 'stopped', heartbeat_at = now() WHERE id = %(node)s

-- reap --
-- Requeue expired leases and mark silent nodes dead (safe from every node at once).
SELECT requeued, dead_jobs, dead_nodes FROM genworker.reap(%(node_stale_s)s, %(max_deaths)s)

-- prune --
-- Delete finished tasks older than the retention, in one small batch.
SELECT genworker.prune(%(older_than_s)s, %(limit)s) AS pruned

-- cancel_task --
-- Cancel a task; returns its status afterwards.
SELECT genworker.cancel_task(%(task_id)s) AS status

-- retry_task --
-- Requeue a task's dead jobs; returns how many.
SELECT genworker.retry_task(%(task_id)s) AS requeued

-- get_task --
-- One task with its progress.
SELECT id, tenant, plan, kind, params, status, n_jobs, n_succeeded, n_dead, n_cancelled,
       error, idempotency_key, created_at, started_at, finished_at
  FROM genworker.tasks WHERE id = %(task_id)s

-- task_jobs --
-- The jobs of one task.
SELECT id, idx, status, attempts, deaths, result, error, started_at, finished_at
  FROM genworker.jobs WHERE task_id = %(task_id)s ORDER BY idx

-- list_tasks --
-- Recent tasks, newest first, optionally filtered.
SELECT id, tenant, plan, kind, status, n_jobs, n_succeeded, n_dead, n_cancelled, error,
       created_at, started_at, finished_at
  FROM genworker.tasks
 WHERE (%(status)s::text IS NULL OR status = %(status)s)
   AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)
 ORDER BY id DESC LIMIT %(limit)s

-- queue_depth --
-- Jobs by plan and state, for status and metrics (finished states excluded: they are history).
SELECT t.plan, j.status, count(*) AS n
  FROM genworker.jobs j JOIN genworker.tasks t ON t.id = j.task_id
 WHERE j.status IN ('queued', 'scheduled', 'running')
 GROUP BY t.plan, j.status ORDER BY t.plan, j.status

-- task_counts --
-- Tasks by status.
SELECT status, count(*) AS n FROM genworker.tasks GROUP BY status ORDER BY status

-- list_nodes --
-- Every known node, newest heartbeat first.
SELECT id, host, pid, status, workers, started_at, heartbeat_at, info,
       extract(epoch FROM now() - heartbeat_at) AS heartbeat_age_s
  FROM genworker.nodes ORDER BY heartbeat_at DESC
