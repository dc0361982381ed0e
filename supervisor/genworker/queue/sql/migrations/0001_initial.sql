-- genworker schema, version 1: plans, tasks, jobs, nodes, and the SQL entry points.
-- Applied inside one transaction under an advisory lock by `genworker migrate`.

CREATE SCHEMA IF NOT EXISTS genworker;

-- Settings the SQL side needs to validate a submit on its own (kept in step by migrate/start).
CREATE TABLE genworker.plans (
    name        text PRIMARY KEY,
    images      integer NOT NULL CHECK (images BETWEEN 1 AND 10000),
    priority    integer NOT NULL
);

CREATE TABLE genworker.settings (
    key         text PRIMARY KEY,
    value       jsonb NOT NULL
);

INSERT INTO genworker.plans (name, images, priority)
VALUES ('free', 2, 0), ('start', 30, 1), ('pro', 70, 2);

INSERT INTO genworker.settings (key, value) VALUES
    ('max_prompt_chars', '4000'),
    ('max_attempts', '5'),
    -- seconds of wait one priority level is worth: a task's jobs are served before
    -- those of a task one level more urgent that arrived more than this much later
    ('priority_step_s', '600');

CREATE TABLE genworker.tasks (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant          text NOT NULL,
    plan            text NOT NULL,
    kind            text NOT NULL,
    params          jsonb NOT NULL,
    priority        integer NOT NULL,
    n_jobs          integer NOT NULL CHECK (n_jobs > 0),
    n_succeeded     integer NOT NULL DEFAULT 0,
    n_dead          integer NOT NULL DEFAULT 0,
    n_cancelled     integer NOT NULL DEFAULT 0,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    idempotency_key text,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    CHECK (n_succeeded + n_dead + n_cancelled <= n_jobs)
);

-- Submitting the same key twice for one tenant returns the first task.
CREATE UNIQUE INDEX tasks_idempotency ON genworker.tasks (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Pruning walks finished tasks by age; the runnable side never reads this index.
CREATE INDEX tasks_finished ON genworker.tasks (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE INDEX tasks_recent ON genworker.tasks (created_at);

CREATE TABLE genworker.jobs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id         bigint NOT NULL REFERENCES genworker.tasks (id) ON DELETE CASCADE,
    idx             integer NOT NULL,
    tenant          text NOT NULL,
    kind            text NOT NULL,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'scheduled', 'running', 'succeeded', 'dead', 'cancelled')),
    -- static order of service, smallest first (see genworker.urgency)
    urgency         double precision NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    max_attempts    integer NOT NULL,
    deaths          integer NOT NULL DEFAULT 0,   -- worker deaths while it ran
    snoozed_s       double precision NOT NULL DEFAULT 0,  -- rate-limit wait used so far
    run_after       timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,
    lease_expires   timestamptz,
    token           bigint NOT NULL DEFAULT 0,    -- fencing token, bumped by every claim
    result          jsonb,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    UNIQUE (task_id, idx),
    -- A job holds a lease exactly while it runs (jobs_running relies on it).
    CHECK ((status = 'running') = (lease_expires IS NOT NULL))
);

-- The claim reads exactly this index: runnable jobs in order of service.
CREATE INDEX jobs_queued ON genworker.jobs (urgency, id) WHERE status = 'queued';
-- Retries and snoozes wait here until due.
CREATE INDEX jobs_scheduled ON genworker.jobs (run_after) WHERE status = 'scheduled';
-- Lease renewal (by owner) and the reaper (by expiry) scan the small running set.
-- Keyed on the lease rather than on status = 'running' on purpose: complete_jobs filters on
-- status = 'running' too, and with this predicate the planner cannot pick this index there
-- (and, trusting a stale "one running row" estimate, rescan the whole batch for every
-- running job); it must look the batch up by primary key.
CREATE INDEX jobs_running ON genworker.jobs (lease_owner, lease_expires)
    WHERE lease_expires IS NOT NULL;

CREATE TABLE genworker.nodes (
    id            text PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    workers       integer NOT NULL DEFAULT 0,
    status        text NOT NULL DEFAULT 'alive' CHECK (status IN ('alive', 'stopped', 'dead')),
    info          jsonb NOT NULL DEFAULT '{}'
);

-- ------------------------------------------------------------------ functions

-- Static order of service: arrival time, delayed by priority_step_s per priority level.
-- A job's key never changes, so waiting ages it: anything that arrives later than
-- key - priority offset queues behind it, which bounds every task's wait.
CREATE FUNCTION genworker.urgency(p_priority integer, p_created timestamptz)
RETURNS double precision LANGUAGE sql STABLE AS $$
    SELECT extract(epoch FROM p_created)
         + p_priority * coalesce((SELECT value::text::float8 FROM genworker.settings
                                  WHERE key = 'priority_step_s'), 600)
$$;

CREATE FUNCTION genworker.setting_int(p_key text, p_default integer)
RETURNS integer LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT value::text::integer FROM genworker.settings WHERE key = p_key), p_default)
$$;

-- Submit one task and fan it out into one job per image, in the caller's transaction.
-- Raises SQLSTATE GW0xx with a one-line message on bad input and writes nothing.
CREATE FUNCTION genworker.submit_task(
    p_plan            text,
    p_params          jsonb,
    p_tenant          text DEFAULT 'default',
    p_kind            text DEFAULT 'image',
    p_idempotency_key text DEFAULT NULL,
    p_n               integer DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_plan      genworker.plans%ROWTYPE;
    v_prompt    text;
    v_max       integer;
    v_n         integer;
    v_id        bigint;
    v_now       timestamptz := now();
BEGIN
    IF p_tenant IS NULL OR p_tenant !~ '^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$' THEN
        RAISE EXCEPTION 'invalid tenant %: use 1-64 letters, digits and _.:@- ', quote_nullable(left(p_tenant, 80))
            USING ERRCODE = 'GW004';
    END IF;
    SELECT * INTO v_plan FROM genworker.plans WHERE name = p_plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown plan %: choose one of %', quote_nullable(left(p_plan, 80)),
            (SELECT string_agg(name, ', ' ORDER BY priority, name) FROM genworker.plans)
            USING ERRCODE = 'GW001';
    END IF;
    IF p_kind IS NULL OR p_kind !~ '^[a-z][a-z0-9_]{0,31}$' THEN
        RAISE EXCEPTION 'invalid job kind %: use lowercase letters, digits and _', quote_nullable(left(p_kind, 80))
            USING ERRCODE = 'GW007';
    END IF;
    IF p_params IS NULL OR jsonb_typeof(p_params) <> 'object' THEN
        RAISE EXCEPTION 'invalid params: expected a JSON object' USING ERRCODE = 'GW006';
    END IF;
    IF octet_length(p_params::text) > 1048576 THEN
        RAISE EXCEPTION 'invalid params: larger than 1 MiB' USING ERRCODE = 'GW006';
    END IF;
    IF p_kind = 'image' THEN
        IF jsonb_typeof(p_params -> 'prompt') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION 'invalid prompt: params.prompt must be a string' USING ERRCODE = 'GW002';
        END IF;
        v_prompt := p_params ->> 'prompt';
        v_max := genworker.setting_int('max_prompt_chars', 4000);
        -- not btrim(): that strips spaces only, and a prompt of tabs and newlines is empty too
        IF v_prompt !~ '[^[:space:]]' THEN
            RAISE EXCEPTION 'invalid prompt: it is empty' USING ERRCODE = 'GW002';
        END IF;
        IF char_length(v_prompt) > v_max THEN
            RAISE EXCEPTION 'invalid prompt: % characters, the limit is %', char_length(v_prompt), v_max
                USING ERRCODE = 'GW002';
        END IF;
        IF p_params ? 'size' AND (jsonb_typeof(p_params -> 'size') IS DISTINCT FROM 'string'
            OR (p_params ->> 'size') !~ '^(auto|[1-9][0-9]{1,3}x[1-9][0-9]{1,3})$') THEN
            RAISE EXCEPTION 'invalid size %: use WxH such as 1024x1024, or auto',
                left((p_params -> 'size')::text, 40) USING ERRCODE = 'GW003';
        END IF;
    END IF;
    v_n := coalesce(p_n, v_plan.images);
    IF v_n < 1 OR v_n > v_plan.images THEN
        RAISE EXCEPTION 'invalid n %: plan % allows 1 to % images', v_n, v_plan.name, v_plan.images
            USING ERRCODE = 'GW005';
    END IF;
    IF p_idempotency_key IS NOT NULL THEN
        IF char_length(p_idempotency_key) NOT BETWEEN 1 AND 200 THEN
            RAISE EXCEPTION 'invalid idempotency key: use 1-200 characters' USING ERRCODE = 'GW006';
        END IF;
        -- Serialise submits of one key so the second sees the first.
        PERFORM pg_advisory_xact_lock(hashtextextended(p_tenant || E'\x1f' || p_idempotency_key, 7));
        SELECT id INTO v_id FROM genworker.tasks
         WHERE tenant = p_tenant AND idempotency_key = p_idempotency_key;
        IF FOUND THEN
            RETURN v_id;
        END IF;
    END IF;

    INSERT INTO genworker.tasks (tenant, plan, kind, params, priority, n_jobs, idempotency_key, created_at)
    VALUES (p_tenant, v_plan.name, p_kind, p_params, v_plan.priority, v_n, p_idempotency_key, v_now)
    RETURNING id INTO v_id;

    INSERT INTO genworker.jobs (task_id, idx, tenant, kind, urgency, max_attempts, created_at, run_after)
    SELECT v_id, i, p_tenant, p_kind, genworker.urgency(v_plan.priority, v_now),
           genworker.setting_int('max_attempts', 5), v_now, v_now
      FROM generate_series(0, v_n - 1) AS i;

    -- A hint for sleeping claimers; PostgreSQL folds identical notifications of one transaction.
    PERFORM pg_notify('genworker_jobs', '');
    RETURN v_id;
END
$$;

-- Bulk form: a JSON array of {plan, params, tenant?, kind?, idempotency_key?, n?}, one round trip.
CREATE FUNCTION genworker.submit_tasks(p_tasks jsonb) RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[] := '{}';
    v_t   jsonb;
BEGIN
    IF jsonb_typeof(p_tasks) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'invalid bulk submit: expected a JSON array of tasks' USING ERRCODE = 'GW006';
    END IF;
    FOR v_t IN SELECT * FROM jsonb_array_elements(p_tasks) LOOP
        IF jsonb_typeof(v_t) IS DISTINCT FROM 'object' THEN
            RAISE EXCEPTION 'invalid bulk submit: every element must be an object' USING ERRCODE = 'GW006';
        END IF;
        IF (v_t ? 'n') AND (jsonb_typeof(v_t -> 'n') IS DISTINCT FROM 'number'
            OR (v_t ->> 'n')::numeric NOT BETWEEN -2147483648 AND 2147483647
            OR (v_t ->> 'n')::numeric % 1 <> 0) THEN
            RAISE EXCEPTION 'invalid n %: expected an integer', left(v_t ->> 'n', 40)
                USING ERRCODE = 'GW005';
        END IF;
        -- ->> would turn a number or an object into text and let it pass as a name
        IF EXISTS (SELECT 1 FROM jsonb_each(v_t) e
                    WHERE e.key IN ('plan', 'tenant', 'kind', 'idempotency_key')
                      AND jsonb_typeof(e.value) <> 'string') THEN
            RAISE EXCEPTION 'invalid bulk submit: plan, tenant, kind and idempotency_key must be strings'
                USING ERRCODE = 'GW006';
        END IF;
        v_ids := v_ids || genworker.submit_task(
            v_t ->> 'plan',
            v_t -> 'params',
            coalesce(v_t ->> 'tenant', 'default'),
            coalesce(v_t ->> 'kind', 'image'),
            v_t ->> 'idempotency_key',
            CASE WHEN v_t ? 'n' THEN (v_t ->> 'n')::numeric::integer END
        );
    END LOOP;
    RETURN v_ids;
END
$$;

-- The functions of the claim/complete path are planned once per session
-- (force_generic_plan): their plans do not depend on the arguments, and by default
-- PostgreSQL re-plans them on every call (custom plans look cheaper for a small LIMIT),
-- which cost more server time than running them, 1-2 ms per call.

-- Claim up to p_n of the most urgent runnable jobs for p_node under a lease.
-- First moves due retries back to the runnable set, so the claim itself reads one index.
CREATE FUNCTION genworker.claim_jobs(p_node text, p_n integer, p_lease_s double precision)
RETURNS TABLE (job_id bigint, token bigint, task_id bigint, idx integer, kind text,
               attempt integer, params jsonb, deaths integer)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    UPDATE genworker.jobs j SET status = 'queued'
     WHERE j.id = ANY ((SELECT array_agg(s.id) FROM (
               SELECT s.id FROM genworker.jobs s
                WHERE s.status = 'scheduled' AND s.run_after <= now()
                ORDER BY s.run_after LIMIT 1000
                FOR UPDATE SKIP LOCKED) s)::bigint[]);

    RETURN QUERY
    WITH picked AS (
        SELECT q.id FROM genworker.jobs q
         WHERE q.status = 'queued'
         ORDER BY q.urgency, q.id
         LIMIT p_n
         FOR UPDATE SKIP LOCKED
    ), claimed AS (
        -- The picked (and locked) rows, found again by primary key. Not as a join: the
        -- generic plan guesses LIMIT p_n at a tenth of the table and merge-joins the whole
        -- primary key index.
        UPDATE genworker.jobs j
           SET status = 'running', lease_owner = p_node,
               lease_expires = now() + make_interval(secs => p_lease_s),
               attempts = j.attempts + 1, token = j.token + 1,
               started_at = coalesce(j.started_at, now())
         WHERE j.id = ANY ((SELECT array_agg(p.id) FROM picked p)::bigint[])
        RETURNING j.id, j.token, j.task_id, j.idx, j.kind, j.attempts, j.urgency, j.deaths
    ), touched AS (
        -- The few tasks of the batch as one array, so both lookups below are primary-key
        -- probes: a join here lets the planner hash the whole tasks table on every claim.
        SELECT array_agg(DISTINCT c.task_id) AS ids FROM claimed c
    ), started AS (
        -- SKIP LOCKED: a task another claimer is marking as started needs no second mark,
        -- and waiting here could deadlock two claimers over two new tasks.
        UPDATE genworker.tasks t SET status = 'running', started_at = now()
         WHERE t.id = ANY ((SELECT array_agg(s.id) FROM (
                   SELECT s.id FROM genworker.tasks s
                    WHERE s.id = ANY ((SELECT ids FROM touched)::bigint[]) AND s.status = 'queued'
                    ORDER BY s.id FOR UPDATE SKIP LOCKED) s)::bigint[])
    ), task AS (
        SELECT t.id, t.params FROM genworker.tasks t
         WHERE t.id = ANY ((SELECT ids FROM touched)::bigint[])
    )
    SELECT c.id, c.token, c.task_id, c.idx, c.kind, c.attempts, t.params, c.deaths
      FROM claimed c JOIN task t ON t.id = c.task_id
     ORDER BY c.urgency, c.id;
END
$$;

-- Add finished jobs to their tasks' counters and finish the tasks that are complete.
-- Task rows are locked in id order, so concurrent callers never deadlock on them.
CREATE FUNCTION genworker.task_progress(p_task_ids bigint[], p_ok integer[], p_dead integer[],
                                        p_cancelled integer[])
RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    IF coalesce(cardinality(p_task_ids), 0) = 0 THEN
        RETURN;
    END IF;
    PERFORM 1 FROM genworker.tasks WHERE id = ANY (p_task_ids) ORDER BY id FOR UPDATE;
    UPDATE genworker.tasks t
       SET n_succeeded = t.n_succeeded + d.ok,
           n_dead = t.n_dead + d.dead,
           n_cancelled = t.n_cancelled + d.cancelled,
           status = CASE
               WHEN t.status = 'cancelled' THEN 'cancelled'
               WHEN t.n_succeeded + d.ok + t.n_dead + d.dead + t.n_cancelled + d.cancelled < t.n_jobs
                   THEN t.status
               WHEN t.n_dead + d.dead > 0 THEN 'failed'
               WHEN t.n_cancelled + d.cancelled > 0 THEN 'cancelled'
               ELSE 'succeeded' END,
           finished_at = CASE
               WHEN t.n_succeeded + d.ok + t.n_dead + d.dead + t.n_cancelled + d.cancelled >= t.n_jobs
                   THEN coalesce(t.finished_at, now())
               ELSE t.finished_at END,
           error = CASE WHEN t.error IS NULL AND t.n_dead + d.dead > 0
                        THEN (SELECT j.error FROM genworker.jobs j
                               WHERE j.task_id = t.id AND j.status = 'dead' LIMIT 1)
                        ELSE t.error END
      FROM unnest(p_task_ids, p_ok, p_dead, p_cancelled) AS d(task_id, ok, dead, cancelled)
     WHERE t.id = d.task_id;
END
$$;

-- Where an outcome takes a running job (see complete_jobs).
CREATE FUNCTION genworker.next_status(
    p_task_status text, p_kind text, p_attempts integer, p_max_attempts integer,
    p_snoozed_s double precision, p_delay double precision, p_snooze_max_s double precision
) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_task_status = 'cancelled' THEN 'cancelled'
        WHEN p_kind = 'ok' THEN 'succeeded'
        WHEN p_kind = 'dead' THEN 'dead'
        WHEN p_kind = 'retry' AND p_attempts >= p_max_attempts THEN 'dead'
        WHEN p_kind = 'snooze' AND p_snoozed_s + coalesce(p_delay, 0) > p_snooze_max_s THEN 'dead'
        WHEN p_kind IN ('retry', 'snooze') THEN 'scheduled'
    END
$$;

-- Write a batch of outcomes, fenced: a row changes only while it is running under the
-- token its claim handed out. Returns the jobs that changed and their new status;
-- the caller reports the rest as stale.
--   kind ok     -> succeeded (or cancelled, when its task was cancelled meanwhile)
--   kind retry  -> scheduled after p_delays[i], or dead when attempts are spent
--   kind snooze -> scheduled after p_delays[i], the attempt refunded; dead past p_snooze_max_s
--   kind dead   -> dead
CREATE FUNCTION genworker.complete_jobs(
    p_ids bigint[], p_tokens bigint[], p_kinds text[], p_results jsonb[], p_errors text[],
    p_delays double precision[], p_snooze_max_s double precision DEFAULT 3600
) RETURNS TABLE (job_id bigint, status text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_ids bigint[]; v_task_ids bigint[]; v_status text[];
    v_tasks bigint[]; v_ok integer[]; v_dead integer[]; v_cancelled integer[];
BEGIN
    WITH o AS (
        SELECT * FROM unnest(p_ids, p_tokens, p_kinds, p_results, p_errors, p_delays)
                   AS o(id, token, kind, result, error, delay)
    ), upd AS (
        UPDATE genworker.jobs j
           SET status = n.status,
               result = CASE WHEN n.status = 'succeeded' THEN o.result END,
               error = left(CASE n.status
                   WHEN 'succeeded' THEN NULL
                   WHEN 'cancelled' THEN 'task cancelled'
                   WHEN 'dead' THEN CASE o.kind
                       WHEN 'retry' THEN 'attempts spent (' || j.attempts || '): ' || coalesce(o.error, '?')
                       WHEN 'snooze' THEN 'rate limited for too long: ' || coalesce(o.error, '?')
                       ELSE coalesce(o.error, 'failed') END
                   ELSE o.error END, 1000),
               attempts = CASE WHEN o.kind = 'snooze' THEN j.attempts - 1 ELSE j.attempts END,
               snoozed_s = j.snoozed_s + CASE WHEN o.kind = 'snooze' THEN coalesce(o.delay, 0) ELSE 0 END,
               run_after = CASE WHEN n.status = 'scheduled'
                                THEN now() + make_interval(secs => greatest(coalesce(o.delay, 0), 0))
                                ELSE j.run_after END,
               finished_at = CASE WHEN n.status = 'scheduled' THEN NULL ELSE now() END,
               lease_expires = NULL
          FROM o
          JOIN genworker.jobs cur ON cur.id = o.id
          JOIN genworker.tasks t ON t.id = cur.task_id
          CROSS JOIN LATERAL (SELECT genworker.next_status(t.status, o.kind, cur.attempts,
                  cur.max_attempts, cur.snoozed_s, o.delay, p_snooze_max_s) AS status) n
         WHERE j.id = o.id AND j.token = o.token AND j.status = 'running' AND n.status IS NOT NULL
        RETURNING j.id, j.task_id, j.status
    )
    SELECT array_agg(u.id), array_agg(u.task_id), array_agg(u.status)
      INTO v_ids, v_task_ids, v_status FROM upd u;

    SELECT array_agg(d.task_id), array_agg(d.ok), array_agg(d.dead), array_agg(d.cancelled)
      INTO v_tasks, v_ok, v_dead, v_cancelled
      FROM (SELECT g.task_id,
                   count(*) FILTER (WHERE g.status = 'succeeded')::integer AS ok,
                   count(*) FILTER (WHERE g.status = 'dead')::integer AS dead,
                   count(*) FILTER (WHERE g.status = 'cancelled')::integer AS cancelled
              FROM unnest(v_task_ids, v_status) AS g(task_id, status)
             WHERE g.status <> 'scheduled' GROUP BY g.task_id) d;
    PERFORM genworker.task_progress(v_tasks, v_ok, v_dead, v_cancelled);

    RETURN QUERY SELECT * FROM unnest(v_ids, v_status);
END
$$;

-- Give jobs back to the queue that p_node holds but will not finish: buffered jobs at
-- shutdown (p_reason NULL), or jobs whose worker died (p_reason says how). A death is
-- not an attempt, but a job in flight in p_max_deaths deaths is poison and goes dead.
CREATE FUNCTION genworker.release_jobs(
    p_ids bigint[], p_tokens bigint[], p_reason text DEFAULT NULL, p_max_deaths integer DEFAULT 3
) RETURNS TABLE (job_id bigint, status text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_ids bigint[]; v_task_ids bigint[]; v_status text[];
    v_tasks bigint[]; v_dead integer[]; v_cancelled integer[];
BEGIN
    WITH upd AS (
        UPDATE genworker.jobs j
           SET status = CASE WHEN t.status = 'cancelled' THEN 'cancelled'
                             WHEN p_reason IS NOT NULL AND j.deaths + 1 >= p_max_deaths THEN 'dead'
                             ELSE 'queued' END,
               deaths = j.deaths + CASE WHEN p_reason IS NULL THEN 0 ELSE 1 END,
               attempts = greatest(j.attempts - 1, 0),
               error = CASE WHEN t.status = 'cancelled' THEN 'task cancelled'
                            WHEN p_reason IS NOT NULL AND j.deaths + 1 >= p_max_deaths
                            THEN left('worker died while running it: ' || p_reason, 1000)
                            ELSE j.error END,
               finished_at = CASE WHEN t.status = 'cancelled'
                                    OR (p_reason IS NOT NULL AND j.deaths + 1 >= p_max_deaths)
                                  THEN now() END,
               lease_owner = NULL, lease_expires = NULL
          FROM unnest(p_ids, p_tokens) AS o(id, token), genworker.tasks t
         WHERE j.id = o.id AND j.token = o.token AND j.status = 'running' AND t.id = j.task_id
        RETURNING j.id, j.task_id, j.status
    )
    SELECT array_agg(u.id), array_agg(u.task_id), array_agg(u.status)
      INTO v_ids, v_task_ids, v_status FROM upd u;

    SELECT array_agg(d.task_id), array_agg(d.dead), array_agg(d.cancelled)
      INTO v_tasks, v_dead, v_cancelled
      FROM (SELECT g.task_id,
                   count(*) FILTER (WHERE g.status = 'dead')::integer AS dead,
                   count(*) FILTER (WHERE g.status = 'cancelled')::integer AS cancelled
              FROM unnest(v_task_ids, v_status) AS g(task_id, status)
             WHERE g.status <> 'queued' GROUP BY g.task_id) d;
    PERFORM genworker.task_progress(v_tasks, array_fill(0, ARRAY[coalesce(cardinality(v_tasks), 0)]),
                                    v_dead, v_cancelled);
    IF v_ids IS NOT NULL THEN
        PERFORM pg_notify('genworker_jobs', '');
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_ids, v_status);
END
$$;

-- Return jobs whose lease ran out (their node died or lost the database) to the queue,
-- and mark nodes whose heartbeat is older than p_node_stale_s as dead. Safe to run
-- from every node at once: each expired job is taken by one reaper (SKIP LOCKED).
CREATE FUNCTION genworker.reap(p_node_stale_s double precision, p_max_deaths integer DEFAULT 3)
RETURNS TABLE (requeued integer, dead_jobs integer, dead_nodes integer)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_ids bigint[]; v_tokens bigint[]; v_nodes integer; v_requeued integer; v_dead integer;
BEGIN
    SELECT array_agg(e.id), array_agg(e.token) INTO v_ids, v_tokens
      FROM (SELECT id, token FROM genworker.jobs
             WHERE status = 'running' AND lease_expires < now()
             ORDER BY lease_expires LIMIT 10000 FOR UPDATE SKIP LOCKED) e;
    -- A lost lease is not the job's failure (its node died or lost the database), so it
    -- counts neither an attempt nor a death: three outages must not kill innocent jobs.
    WITH r AS (SELECT * FROM genworker.release_jobs(v_ids, v_tokens, NULL, p_max_deaths))
    SELECT count(*) FILTER (WHERE r.status = 'queued'), count(*) FILTER (WHERE r.status = 'dead')
      INTO v_requeued, v_dead FROM r;
    WITH n AS (
        UPDATE genworker.nodes SET status = 'dead'
         WHERE status = 'alive' AND heartbeat_at < now() - make_interval(secs => p_node_stale_s)
        RETURNING 1
    ) SELECT count(*) INTO v_nodes FROM n;
    -- jobs of a cancelled task leave as cancelled: neither requeued nor dead
    RETURN QUERY SELECT v_requeued, v_dead, v_nodes;
END
$$;

-- Cancel a task: its queued jobs never run; results that arrive later are discarded.
CREATE FUNCTION genworker.cancel_task(p_task_id bigint) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_status text; v_n integer;
BEGIN
    -- Jobs first, then the task: the same order as complete_jobs, so the two never deadlock.
    WITH c AS (
        UPDATE genworker.jobs SET status = 'cancelled', error = 'task cancelled', finished_at = now()
         WHERE task_id = p_task_id AND status IN ('queued', 'scheduled')
        RETURNING 1
    ) SELECT count(*) INTO v_n FROM c;
    UPDATE genworker.tasks
       SET n_cancelled = n_cancelled + v_n,
           status = CASE WHEN status IN ('succeeded', 'failed') THEN status ELSE 'cancelled' END,
           finished_at = CASE WHEN status IN ('succeeded', 'failed') THEN finished_at
                              ELSE coalesce(finished_at, now()) END
     WHERE id = p_task_id
    RETURNING status INTO v_status;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no task %', p_task_id USING ERRCODE = 'GW010';
    END IF;
    RETURN v_status;
END
$$;

-- Requeue a finished task's dead jobs with fresh attempts; returns how many.
CREATE FUNCTION genworker.retry_task(p_task_id bigint) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_n integer; v_status text;
BEGIN
    SELECT status INTO v_status FROM genworker.tasks WHERE id = p_task_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no task %', p_task_id USING ERRCODE = 'GW010';
    END IF;
    IF v_status = 'cancelled' THEN
        RAISE EXCEPTION 'task % was cancelled; submit it again instead', p_task_id USING ERRCODE = 'GW011';
    END IF;
    WITH r AS (
        UPDATE genworker.jobs
           SET status = 'queued', attempts = 0, deaths = 0, snoozed_s = 0, error = NULL,
               finished_at = NULL, run_after = now()
         WHERE task_id = p_task_id AND status = 'dead'
        RETURNING 1
    ) SELECT count(*) INTO v_n FROM r;
    IF v_n > 0 THEN
        UPDATE genworker.tasks
           SET n_dead = n_dead - v_n, status = 'running', finished_at = NULL, error = NULL
         WHERE id = p_task_id;
        PERFORM pg_notify('genworker_jobs', '');
    END IF;
    RETURN v_n;
END
$$;

-- Delete finished tasks (and their jobs) older than p_older_than_s, at most p_limit tasks.
CREATE FUNCTION genworker.prune(p_older_than_s double precision, p_limit integer DEFAULT 500)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_n integer;
BEGIN
    WITH old AS (
        SELECT id FROM genworker.tasks
         WHERE finished_at < now() - make_interval(secs => p_older_than_s)
           AND status IN ('succeeded', 'failed', 'cancelled')
         ORDER BY finished_at LIMIT p_limit FOR UPDATE SKIP LOCKED
    ), d AS (
        DELETE FROM genworker.tasks t USING old WHERE t.id = old.id RETURNING 1
    ) SELECT count(*) INTO v_n FROM d;
    DELETE FROM genworker.nodes
     WHERE status IN ('dead', 'stopped')
       AND heartbeat_at < now() - make_interval(secs => p_older_than_s);
    RETURN v_n;
END
$$;
