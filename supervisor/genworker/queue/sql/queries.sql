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
);
-- the oldest code version that can still run against this migration's schema (NULL: only its
-- own): what lets a node run against a schema one version newer than it knows
ALTER TABLE genworker.migrations ADD COLUMN IF NOT EXISTS compatible_with integer

-- applied_migrations --
-- Versions already applied.
SELECT version FROM genworker.migrations ORDER BY version

-- record_migration --
-- Mark one migration as applied, with the oldest code version it is compatible with.
INSERT INTO genworker.migrations (version, name, compatible_with)
VALUES (%(version)s, %(name)s, %(compatible_with)s)

-- newer_migrations --
-- Migrations newer than this code knows, with the oldest code version each one runs with.
SELECT version, name, compatible_with FROM genworker.migrations
 WHERE version > %(version)s ORDER BY version

-- schema_version --
-- The newest applied migration, or NULL on an empty database.
SELECT CASE WHEN to_regclass('genworker.migrations') IS NULL THEN NULL
            ELSE (SELECT max(version) FROM genworker.migrations) END AS version

-- upsert_plan --
-- Keep the plans table in step with the settings (tenant_cap NULL: the tenant_cap setting;
-- models NULL: any model).
INSERT INTO genworker.plans (name, images, priority, tenant_cap, models)
VALUES (%(name)s, %(images)s, %(priority)s, %(tenant_cap)s, %(models)s)
ON CONFLICT (name) DO UPDATE
SET images = excluded.images, priority = excluded.priority, tenant_cap = excluded.tenant_cap,
    models = excluded.models
WHERE (plans.images, plans.priority, plans.tenant_cap, plans.models)
      IS DISTINCT FROM (excluded.images, excluded.priority, excluded.tenant_cap, excluded.models)

-- delete_other_plans --
-- Forget plans the settings no longer name (existing tasks keep their copy of the priority).
DELETE FROM genworker.plans WHERE NOT (name = ANY (%(names)s))

-- upsert_image_model --
-- Keep one model's contract (genworker.contract.MODELS) in step for submit-time checks.
INSERT INTO genworker.image_models (name, max_prompt_chars, sizes, n_max, options, response_formats)
VALUES (%(name)s, %(max_prompt_chars)s, %(sizes)s, %(n_max)s, %(options)s, %(response_formats)s)
ON CONFLICT (name) DO UPDATE
SET max_prompt_chars = excluded.max_prompt_chars, sizes = excluded.sizes, n_max = excluded.n_max,
    options = excluded.options, response_formats = excluded.response_formats
WHERE (image_models.max_prompt_chars, image_models.sizes, image_models.n_max,
       image_models.options, image_models.response_formats)
      IS DISTINCT FROM (excluded.max_prompt_chars, excluded.sizes, excluded.n_max,
                        excluded.options, excluded.response_formats)

-- delete_other_image_models --
-- Forget models the contract no longer lists (a task naming one is then an unknown model).
DELETE FROM genworker.image_models WHERE NOT (name = ANY (%(names)s))

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
-- Claim up to n of the most urgent runnable jobs of the kinds the node runs (NULL: any) under
-- a lease, with each one's order key (params as text: the jobs of one task share it, so the
-- caller decodes it once per task).
SELECT job_id, token, task_id, idx, kind, attempt, params::text AS params, deaths, urgency
  FROM genworker.claim_jobs(%(node)s, %(n)s, %(lease_s)s, %(kinds)s::text[])

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
-- Announce a node (or bring a restarted one back to life), with the job kinds it runs.
INSERT INTO genworker.nodes (id, host, pid, workers, status, info, kinds)
VALUES (%(node)s, %(host)s, %(pid)s, %(workers)s, 'alive', %(info)s, %(kinds)s::text[])
ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid,
    workers = excluded.workers, status = 'alive', started_at = now(), heartbeat_at = now(),
    info = excluded.info, kinds = excluded.kinds

-- heartbeat_node --
-- A node is alive, running these kinds (NULL: as registered); returns the live node count
-- (for sharing cluster-wide limits).
WITH h AS (
    UPDATE genworker.nodes SET heartbeat_at = now(), workers = %(workers)s, info = %(info)s,
           status = 'alive', kinds = coalesce(%(kinds)s::text[], kinds)
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

-- cancel_task --
-- Cancel a task; returns its status afterwards.
SELECT genworker.cancel_task(%(task_id)s) AS status

-- retry_task --
-- Requeue a task's dead jobs; returns how many.
SELECT genworker.retry_task(%(task_id)s) AS requeued

-- retry_dead --
-- Requeue one batch of dead jobs that died in [since, before), across tasks; returns how many.
SELECT genworker.retry_dead(%(since)s, %(before)s, %(limit)s) AS requeued

-- get_task --
-- One task with its progress.
SELECT id, tenant, plan, kind, params, status, n_jobs, n_succeeded, n_dead, n_cancelled,
       error, idempotency_key, created_at, started_at, finished_at, input_tokens, output_tokens
  FROM genworker.tasks WHERE id = %(task_id)s

-- task_jobs --
-- The jobs of one task.
SELECT id, idx, status, attempts, deaths, result, error, started_at, finished_at,
       input_tokens, output_tokens
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

-- tenant_usage --
-- Tokens per tenant over the tasks submitted since a time (index tasks_recent), the biggest
-- users first, at most limit tenants: what `genworker status` shows, never a scan of jobs.
SELECT tenant, sum(input_tokens)::bigint AS input_tokens, sum(output_tokens)::bigint AS output_tokens
  FROM genworker.tasks
 WHERE created_at >= %(since)s
 GROUP BY tenant
HAVING sum(input_tokens + output_tokens) > 0
 ORDER BY sum(input_tokens + output_tokens) DESC, tenant
 LIMIT %(limit)s

-- kind_runners --
-- Whether a live node (heard from within max_age_s) may run a kind: it publishes the kind,
-- or it publishes no kinds at all (a node older than the kinds column).
SELECT EXISTS (
    SELECT 1 FROM genworker.nodes
     WHERE status = 'alive' AND heartbeat_at > now() - make_interval(secs => %(max_age_s)s)
       AND (kinds IS NULL OR %(kind)s = ANY (kinds))) AS runs,
       EXISTS (
    SELECT 1 FROM genworker.nodes
     WHERE status = 'alive' AND heartbeat_at > now() - make_interval(secs => %(max_age_s)s)
       ) AS any_live

-- list_nodes --
-- Every known node, newest heartbeat first.
SELECT id, host, pid, status, workers, started_at, heartbeat_at, info,
       extract(epoch FROM now() - heartbeat_at) AS heartbeat_age_s
  FROM genworker.nodes ORDER BY heartbeat_at DESC

-- prune_with_files --
-- Delete one small batch of finished tasks older than the retention (and nodes gone that
-- long); returns how many tasks, and the result files of their jobs that no other job still
-- names (a cached result is shared), for the caller to delete. One scan of jobs per batch.
WITH old AS (
    SELECT id FROM genworker.tasks
     WHERE finished_at < now() - make_interval(secs => %(older_than_s)s)
       AND status IN ('succeeded', 'failed', 'cancelled')
     ORDER BY finished_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), files AS (
    SELECT DISTINCT j.result ->> 'path' AS path
      FROM genworker.jobs j JOIN old ON old.id = j.task_id
     WHERE j.result ? 'path'
), gone AS (
    DELETE FROM genworker.tasks t USING old WHERE t.id = old.id RETURNING t.id
), nodes_gone AS (
    DELETE FROM genworker.nodes
     WHERE status IN ('dead', 'stopped')
       AND heartbeat_at < now() - make_interval(secs => %(older_than_s)s)
)
SELECT (SELECT count(*) FROM gone) AS pruned,
       ARRAY(SELECT f.path FROM files f
              WHERE NOT EXISTS (SELECT 1 FROM genworker.jobs j
                                 WHERE j.result ->> 'path' = f.path
                                   AND j.task_id NOT IN (SELECT id FROM old))) AS orphaned
