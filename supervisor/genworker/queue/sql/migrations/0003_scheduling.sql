-- genworker schema, version 3: scheduling. The order of service is plan priority, then the
-- smallest task, then arrival, with aging; a tenant may hold at most its plan's cap of jobs
-- in flight across the cluster. See "Scheduling" in bench/README.md for the why and the figures.

-- seconds of waiting one image of a task's size is worth (shortest task first; see urgency)
INSERT INTO genworker.settings (key, value) VALUES ('size_step_s', '10'), ('tenant_cap', '0')
ON CONFLICT (key) DO NOTHING;

-- A tenant's jobs of this plan in flight at once, cluster-wide: NULL takes the tenant_cap
-- setting, 0 means no cap.
ALTER TABLE genworker.plans ADD COLUMN tenant_cap integer CHECK (tenant_cap >= 0);

-- The runnable index, ordered by task within a key: a task's queued jobs are adjacent, so a
-- claim can step over a whole task (one probe) when its tenant is at its cap.
DROP INDEX genworker.jobs_queued;
CREATE INDEX jobs_queued ON genworker.jobs (urgency, task_id, id) WHERE status = 'queued';
-- A tenant's jobs in flight, counted under the tenant's lock by a capped claim.
CREATE INDEX jobs_running_tenant ON genworker.jobs (tenant) WHERE lease_expires IS NOT NULL;

-- ------------------------------------------------------------------ functions

-- Static order of service, smallest first: arrival, delayed by priority_step_s per plan
-- priority level and by size_step_s per image of the task. All jobs of a task share it.
-- Among tasks of one plan this serves the smallest first, and tasks of equal size in arrival
-- order, which is what "fewest jobs left" gives too (the earlier one has fewer left).
-- A key never changes, so waiting ages a job: anything arriving later than key - its own
-- offset queues behind it, which bounds every task's wait however many small tasks arrive.
DROP FUNCTION genworker.urgency(integer, timestamptz);
CREATE FUNCTION genworker.urgency(p_priority integer, p_n integer, p_created timestamptz)
RETURNS double precision LANGUAGE sql STABLE AS $$
    SELECT extract(epoch FROM p_created)
         + p_priority * coalesce((SELECT value::text::float8 FROM genworker.settings
                                  WHERE key = 'priority_step_s'), 600)
         + p_n * coalesce((SELECT value::text::float8 FROM genworker.settings
                           WHERE key = 'size_step_s'), 10)
$$;

-- Whether any tenant cap is set: without one the claim skips all cap bookkeeping.
CREATE FUNCTION genworker.caps_on() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT genworker.setting_int('tenant_cap', 0) > 0
        OR EXISTS (SELECT 1 FROM genworker.plans WHERE tenant_cap > 0)
$$;

-- Submit one task and fan it out into one job per image, in the caller's transaction.
-- Raises SQLSTATE GW0xx with a one-line message on bad input and writes nothing.
-- (Version 3: the jobs' urgency counts the task's size.)
CREATE OR REPLACE FUNCTION genworker.submit_task(
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
        RAISE EXCEPTION 'invalid tenant %: use 1-64 letters, digits and _.:@- ', to_json(left(p_tenant, 80))::text
            USING ERRCODE = 'GW004';
    END IF;
    SELECT * INTO v_plan FROM genworker.plans WHERE name = p_plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown plan %: choose one of %', to_json(left(p_plan, 80))::text,
            (SELECT string_agg(name, ', ' ORDER BY priority, name) FROM genworker.plans)
            USING ERRCODE = 'GW001';
    END IF;
    IF p_kind IS NULL OR p_kind !~ '^[a-z][a-z0-9_]{0,31}$' THEN
        RAISE EXCEPTION 'invalid job kind %: use lowercase letters, digits and _', to_json(left(p_kind, 80))::text
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

    -- one key for the whole task, computed once (not once per row)
    INSERT INTO genworker.jobs (task_id, idx, tenant, kind, urgency, max_attempts, created_at, run_after)
    SELECT v_id, i, p_tenant, p_kind, k.urgency, genworker.setting_int('max_attempts', 5), v_now, v_now
      FROM (SELECT genworker.urgency(v_plan.priority, v_n, v_now) AS urgency) k,
           generate_series(0, v_n - 1) AS i;

    -- A hint for sleeping claimers; PostgreSQL folds identical notifications of one transaction.
    PERFORM pg_notify('genworker_jobs', '');
    RETURN v_id;
END
$$;

-- The claim's functions plan once per session (force_generic_plan, see 0001) and run with
-- sequential scans off: a session that plans while the jobs table is tiny would otherwise
-- keep a generic plan that reads the whole table and sorts it, however big it grows. JIT is
-- off with them: the penalty that keeps seqscans out of a plan (on the tiny plans table, where
-- nothing else exists) would make it look expensive enough to compile, ~40 ms a call.

-- Pick up to p_n runnable jobs in order of service such that no tenant passes its plan's cap
-- of jobs in flight. Walks the runnable index task by task (a task's queued jobs are adjacent
-- there), so a tenant at its cap costs one probe per queued task, never one per job; it looks
-- at most 500 tasks. Returns the picked ids (locked) in order of service; trim_to_caps then
-- makes the counts exact.
CREATE FUNCTION genworker.pick_capped(p_n integer, OUT o_ids bigint[], OUT o_lanes integer[],
                                      OUT l_tenant text[], OUT l_plan text[], OUT l_cap integer[])
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off AS $$
DECLARE
    v_default integer := genworker.setting_int('tenant_cap', 0);
    v_plans   text[];
    v_caps    integer[];
    v_room    integer[] := '{}';       -- per lane: its cap minus its jobs in flight and picked
    v_k       double precision := '-infinity';
    v_t       bigint := 0;             -- the walk is past (v_k, v_t): (urgency, task_id)
    v_need    integer := p_n;
    v_head    record;
    v_cap     integer;
    v_lane    integer;
    v_take    integer;
    v_got     bigint[];
BEGIN
    o_ids := '{}'; o_lanes := '{}'; l_tenant := '{}'; l_plan := '{}'; l_cap := '{}';
    SELECT array_agg(name), array_agg(coalesce(tenant_cap, v_default)) INTO v_plans, v_caps
      FROM genworker.plans;
    FOR v_step IN 1..500 LOOP
        -- the next task in order of service that has a queued job
        SELECT q.urgency, q.task_id, q.tenant, t.plan INTO v_head
          FROM genworker.jobs q JOIN genworker.tasks t ON t.id = q.task_id
         WHERE q.status = 'queued' AND (q.urgency, q.task_id) > (v_k, v_t)
         ORDER BY q.urgency, q.task_id LIMIT 1;
        EXIT WHEN NOT FOUND;
        v_k := v_head.urgency;
        v_t := v_head.task_id;
        -- a plan deleted from the settings keeps the default cap
        v_cap := coalesce(v_caps[array_position(v_plans, v_head.plan)], v_default);
        v_lane := 0;
        v_take := v_need;
        IF v_cap > 0 THEN
            v_lane := coalesce((SELECT l.i FROM unnest(l_tenant, l_plan) WITH ORDINALITY l(te, pl, i)
                                 WHERE l.te = v_head.tenant AND l.pl = v_head.plan), 0);
            IF v_lane = 0 THEN
                l_tenant := l_tenant || v_head.tenant;
                l_plan := l_plan || v_head.plan;
                l_cap := l_cap || v_cap;
                v_lane := cardinality(l_tenant);
                -- unlocked: a first guess; trim_to_caps counts again under the lane's lock
                v_room := v_room || (v_cap - (
                    SELECT count(*)::integer FROM genworker.jobs j
                      JOIN genworker.tasks t ON t.id = j.task_id
                     WHERE j.lease_expires IS NOT NULL AND j.tenant = v_head.tenant
                       AND t.plan = v_head.plan));
            END IF;
            v_take := least(v_need, v_room[v_lane]);
        END IF;
        CONTINUE WHEN v_take <= 0;
        SELECT array_agg(s.id ORDER BY s.id) INTO v_got
          FROM (SELECT q.id FROM genworker.jobs q
                 WHERE q.status = 'queued' AND q.urgency = v_k AND q.task_id = v_t
                 ORDER BY q.id LIMIT v_take FOR UPDATE SKIP LOCKED) s;
        CONTINUE WHEN v_got IS NULL;
        o_ids := o_ids || v_got;
        o_lanes := o_lanes || array_fill(v_lane, ARRAY[cardinality(v_got)]);
        v_need := v_need - cardinality(v_got);
        IF v_lane > 0 THEN
            v_room[v_lane] := v_room[v_lane] - cardinality(v_got);
        END IF;
        EXIT WHEN v_need <= 0;
    END LOOP;
END
$$;

-- Keep, of picks made by pick_capped, what each lane's cap allows once counted exactly: under
-- a transaction-level advisory lock per (tenant, plan), taken in key order so two claimers
-- never wait on each other in a cycle. The lock makes a second claimer of the lane count
-- after the first one committed; completions, releases and the reaper need no lock (they
-- only lower the count), and the count is of the jobs themselves, so it cannot drift.
CREATE FUNCTION genworker.trim_to_caps(p_ids bigint[], p_lanes integer[], p_tenant text[],
                                       p_plan text[], p_cap integer[])
RETURNS bigint[] LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off AS $$
DECLARE
    v_key   bigint;
    v_allow integer[];
    v_ids   bigint[];
BEGIN
    FOR v_key IN
        SELECT DISTINCT hashtextextended(l.te || E'\x1f' || l.pl, 3)
          FROM unnest(p_tenant, p_plan) WITH ORDINALITY l(te, pl, i)
         WHERE l.i = ANY (p_lanes)
         ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(v_key);
    END LOOP;
    -- a new snapshot, taken after the locks: what other claimers of these lanes committed
    SELECT array_agg(l.cap - c.n ORDER BY l.i) INTO v_allow
      FROM unnest(p_tenant, p_plan, p_cap) WITH ORDINALITY l(te, pl, cap, i)
     CROSS JOIN LATERAL (
           SELECT count(*)::integer AS n FROM genworker.jobs j
             JOIN genworker.tasks t ON t.id = j.task_id
            WHERE j.lease_expires IS NOT NULL AND j.tenant = l.te AND t.plan = l.pl) c;
    SELECT array_agg(p.id ORDER BY p.ord) INTO v_ids
      FROM (SELECT u.id, u.lane, u.ord,
                   row_number() OVER (PARTITION BY u.lane ORDER BY u.ord) AS rank
              FROM unnest(p_ids, p_lanes) WITH ORDINALITY u(id, lane, ord)) p
     WHERE p.lane = 0 OR p.rank <= v_allow[p.lane];
    RETURN v_ids;
END
$$;

-- Claim up to p_n of the most urgent runnable jobs for p_node under a lease.
-- First moves due retries back to the runnable set, so the claim itself reads one index.
-- Returns each job's urgency too: the supervisor's buffer hands jobs out in that order.
DROP FUNCTION genworker.claim_jobs(text, integer, double precision);
CREATE FUNCTION genworker.claim_jobs(p_node text, p_n integer, p_lease_s double precision)
RETURNS TABLE (job_id bigint, token bigint, task_id bigint, idx integer, kind text,
               attempt integer, params jsonb, deaths integer, urgency double precision)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off AS $$
DECLARE
    v_ids  bigint[];
    v_pick record;
BEGIN
    UPDATE genworker.jobs j SET status = 'queued'
     WHERE j.id = ANY ((SELECT array_agg(s.id) FROM (
               SELECT s.id FROM genworker.jobs s
                WHERE s.status = 'scheduled' AND s.run_after <= now()
                ORDER BY s.run_after LIMIT 1000
                FOR UPDATE SKIP LOCKED) s)::bigint[]);

    IF genworker.caps_on() THEN
        SELECT * INTO v_pick FROM genworker.pick_capped(p_n);
        v_ids := genworker.trim_to_caps(v_pick.o_ids, v_pick.o_lanes, v_pick.l_tenant,
                                        v_pick.l_plan, v_pick.l_cap);
    ELSE
        SELECT array_agg(p.id) INTO v_ids
          FROM (SELECT q.id FROM genworker.jobs q
                 WHERE q.status = 'queued'
                 ORDER BY q.urgency, q.task_id, q.id
                 LIMIT p_n
                 FOR UPDATE SKIP LOCKED) p;
    END IF;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH claimed AS (
        -- The picked (and locked) rows, found again by primary key.
        UPDATE genworker.jobs j
           SET status = 'running', lease_owner = p_node,
               lease_expires = now() + make_interval(secs => p_lease_s),
               attempts = j.attempts + 1, token = j.token + 1,
               started_at = coalesce(j.started_at, now())
         WHERE j.id = ANY (v_ids)
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
    SELECT c.id, c.token, c.task_id, c.idx, c.kind, c.attempts, t.params, c.deaths, c.urgency
      FROM claimed c JOIN task t ON t.id = c.task_id
     ORDER BY c.urgency, c.task_id, c.id;
END
$$;

-- Write a batch of outcomes, fenced: a row changes only while it is running under the
-- token its claim handed out. Returns the jobs that changed and their new status;
-- the caller reports the rest as stale.
--   kind ok     -> succeeded (or cancelled, when its task was cancelled meanwhile)
--   kind retry  -> scheduled after p_delays[i], or dead when attempts are spent
--   kind snooze -> scheduled after p_delays[i], the attempt refunded; dead past p_snooze_max_s
--   kind dead   -> dead
-- (Version 3: with a tenant cap set, a batch that ends jobs in flight wakes the claimers.)
CREATE OR REPLACE FUNCTION genworker.complete_jobs(
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
    -- A claim cut short by a cap looks like an empty queue to its node, which then waits for
    -- a hint: a job leaving the in-flight set may have made room under a cap.
    IF v_ids IS NOT NULL AND genworker.caps_on() THEN
        PERFORM pg_notify('genworker_jobs', '');
    END IF;

    RETURN QUERY SELECT * FROM unnest(v_ids, v_status);
END
$$;
