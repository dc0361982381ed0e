-- genworker schema, version 4: production day one. The provider's contract per model is
-- checked at submit; a tenant's reach is bounded (params size, models per plan, queued tasks,
-- bulk size); an idempotency key reused for another task is a conflict; token usage is
-- recorded per job and summed per task; nodes publish the job kinds they run and claim only
-- those; dead jobs can be requeued across tasks; a task's finish is announced with a NOTIFY on
-- genworker_task_finished (task_finished).
-- compatible_with: 3
--
-- Compatibility with nodes one version older (3): every function of 0003 keeps working with
-- the arguments it took (claim_jobs and task_progress gain defaulted parameters; the rest keep
-- their signatures), and every new column has a default or is nullable. What a version-3
-- node does not get: it claims every kind (it passes no kinds), its node row publishes no
-- kinds (NULL: `genworker submit` then assumes it may run anything), and its `genworker`
-- commands other than `start` refuse this schema as newer than they know (upgrade the CLI
-- with the nodes). Written to run twice without harm (IF NOT EXISTS, OR REPLACE): a rollback
-- that forgets version 4 and an upgrade that re-applies it both leave this schema.

-- ------------------------------------------------------------------ tables

-- What each image model takes, written from genworker.contract.MODELS on every migrate.
CREATE TABLE IF NOT EXISTS genworker.image_models (
    name             text PRIMARY KEY,
    max_prompt_chars integer NOT NULL CHECK (max_prompt_chars > 0),
    sizes            text[] NOT NULL,
    n_max            integer NOT NULL CHECK (n_max > 0),
    -- option -> ["value", ...] or {"min": a, "max": b} (integers)
    options          jsonb NOT NULL DEFAULT '{}',
    response_formats text[] NOT NULL DEFAULT '{}'
);

-- The models a plan may ask for; NULL: any.
ALTER TABLE genworker.plans ADD COLUMN IF NOT EXISTS models text[];

-- Token usage the provider reported (NULL: none reported), per job and summed per task.
ALTER TABLE genworker.jobs ADD COLUMN IF NOT EXISTS input_tokens integer;
ALTER TABLE genworker.jobs ADD COLUMN IF NOT EXISTS output_tokens integer;
ALTER TABLE genworker.tasks ADD COLUMN IF NOT EXISTS input_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE genworker.tasks ADD COLUMN IF NOT EXISTS output_tokens bigint NOT NULL DEFAULT 0;

-- The job kinds a node runs (NULL: a node older than this column, which runs any it has).
ALTER TABLE genworker.nodes ADD COLUMN IF NOT EXISTS kinds text[];

-- A tenant's unfinished tasks, counted (up to the cap) at every submit.
CREATE INDEX IF NOT EXISTS tasks_open_tenant ON genworker.tasks (tenant)
    WHERE status IN ('queued', 'running');
-- Dead jobs by when they died: what `genworker retry --status dead --since` walks.
CREATE INDEX IF NOT EXISTS jobs_dead ON genworker.jobs (finished_at) WHERE status = 'dead';

INSERT INTO genworker.settings (key, value) VALUES
    ('max_params_bytes', '16384'),
    ('max_queued_tasks_per_tenant', '1000'),
    ('max_bulk_tasks', '1000'),
    ('default_model', '"gpt-image-1"'),
    ('task_options', '["quality", "style", "background", "output_format", "output_compression", "moderation"]')
ON CONFLICT (key) DO NOTHING;

-- ------------------------------------------------------------------ submit

-- 'a', 'b', and 'c': how the provider lists the values it takes.
CREATE OR REPLACE FUNCTION genworker.quoted_list(p_values text[])
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN cardinality(p_values) > 1
        THEN (SELECT string_agg('''' || v || '''', ', ' ORDER BY i)
                FROM unnest(p_values[1:cardinality(p_values) - 1]) WITH ORDINALITY u(v, i))
             || ', and ''' || p_values[cardinality(p_values)] || ''''
        ELSE '''' || coalesce(p_values[1], '') || '''' END
$$;

-- A submitted value as Python's repr shows it (strings quoted), cut to 40 characters: the
-- messages match genworker.contract.option_problem's.
CREATE OR REPLACE FUNCTION genworker.shown(p_value jsonb)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT left(CASE WHEN jsonb_typeof(p_value) = 'string' THEN '''' || (p_value #>> '{}') || ''''
                     ELSE p_value::text END, 40)
$$;

-- Check an image task's params against its model (params.model, else the default_model
-- setting) and its plan's list of models. Raises GW002 (prompt), GW003 (size), GW006,
-- GW008 (an option the model does not take, or any option on a model genworker does not
-- know) or GW009 (a model the plan does not allow). Options are checked in the order of
-- contract.TASK_OPTIONS (the task_options setting), then the size, as option_problem does.
CREATE OR REPLACE FUNCTION genworker.check_image(p_plan text, p_models text[], p_params jsonb)
RETURNS void LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_prompt  text;
    v_model   text;
    v_row     genworker.image_models%ROWTYPE;
    v_known   boolean;
    v_max     integer;
    v_opt     text;
    v_val     jsonb;
    v_allowed jsonb;
BEGIN
    IF jsonb_typeof(p_params -> 'prompt') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION 'invalid prompt: params.prompt must be a string' USING ERRCODE = 'GW002';
    END IF;
    IF p_params ? 'model' AND jsonb_typeof(p_params -> 'model') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION 'invalid params: model must be a string' USING ERRCODE = 'GW006';
    END IF;
    v_model := coalesce(p_params ->> 'model',
                        (SELECT value #>> '{}' FROM genworker.settings WHERE key = 'default_model'));
    IF p_models IS NOT NULL AND NOT (v_model = ANY (p_models)) THEN
        RAISE EXCEPTION 'model % is not allowed on plan %: it allows %', to_json(left(v_model, 80))::text,
            p_plan, coalesce(nullif(array_to_string(p_models, ', '), ''), 'none')
            USING ERRCODE = 'GW009';
    END IF;
    SELECT * INTO v_row FROM genworker.image_models WHERE name = v_model;
    v_known := FOUND;

    v_prompt := p_params ->> 'prompt';
    -- not btrim(): that strips spaces only, and a prompt of tabs and newlines is empty too
    IF v_prompt !~ '[^[:space:]]' THEN
        RAISE EXCEPTION 'invalid prompt: it is empty' USING ERRCODE = 'GW002';
    END IF;
    v_max := genworker.setting_int('max_prompt_chars', 4000);
    IF v_known AND v_row.max_prompt_chars < v_max AND char_length(v_prompt) > v_row.max_prompt_chars THEN
        RAISE EXCEPTION 'invalid prompt: % characters, the limit is % for %',
            char_length(v_prompt), v_row.max_prompt_chars, v_model USING ERRCODE = 'GW002';
    END IF;
    IF char_length(v_prompt) > v_max THEN
        RAISE EXCEPTION 'invalid prompt: % characters, the limit is %', char_length(v_prompt), v_max
            USING ERRCODE = 'GW002';
    END IF;

    FOR v_opt IN SELECT o.name FROM genworker.settings s,
                        jsonb_array_elements_text(s.value) WITH ORDINALITY o(name, i)
                  WHERE s.key = 'task_options' ORDER BY o.i LOOP
        CONTINUE WHEN NOT p_params ? v_opt;
        IF NOT v_known THEN
            RAISE EXCEPTION 'invalid option %: model % is not one genworker knows',
                v_opt, '''' || left(v_model, 80) || '''' USING ERRCODE = 'GW008';
        END IF;
        v_allowed := v_row.options -> v_opt;
        IF v_allowed IS NULL THEN
            RAISE EXCEPTION 'invalid option %: model % does not take it', v_opt, v_model
                USING ERRCODE = 'GW008';
        END IF;
        v_val := p_params -> v_opt;
        IF jsonb_typeof(v_allowed) = 'array' THEN
            CONTINUE WHEN jsonb_typeof(v_val) = 'string' AND v_allowed ? (v_val #>> '{}');
            RAISE EXCEPTION 'invalid option %: Invalid value: %. Supported values are: %.',
                v_opt, genworker.shown(v_val),
                genworker.quoted_list(ARRAY(SELECT e FROM jsonb_array_elements_text(v_allowed)
                                                   WITH ORDINALITY a(e, i) ORDER BY a.i))
                USING ERRCODE = 'GW008';
        END IF;
        -- an integer range: a JSON number written without a fraction or exponent
        CONTINUE WHEN jsonb_typeof(v_val) = 'number' AND v_val::text ~ '^-?[0-9]+$'
                  AND v_val::text::numeric BETWEEN (v_allowed ->> 'min')::numeric
                                               AND (v_allowed ->> 'max')::numeric;
        RAISE EXCEPTION 'invalid option %: Invalid ''%'': %. Expected an integer from % to %.',
            v_opt, v_opt, genworker.shown(v_val), v_allowed ->> 'min', v_allowed ->> 'max'
            USING ERRCODE = 'GW008';
    END LOOP;

    IF NOT p_params ? 'size' THEN
        RETURN;
    END IF;
    v_val := p_params -> 'size';
    IF v_known THEN
        IF jsonb_typeof(v_val) IS DISTINCT FROM 'string' OR NOT ((v_val #>> '{}') = ANY (v_row.sizes)) THEN
            RAISE EXCEPTION 'invalid size %: % takes %', '''' || left(v_val #>> '{}', 40) || '''',
                v_model, array_to_string(v_row.sizes, ', ') USING ERRCODE = 'GW003';
        END IF;
    ELSIF jsonb_typeof(v_val) IS DISTINCT FROM 'string'
          OR (v_val #>> '{}') !~ '^(auto|[1-9][0-9]{1,3}x[1-9][0-9]{1,3})$' THEN
        RAISE EXCEPTION 'invalid size %: use WxH such as 1024x1024, or auto', left(v_val::text, 40)
            USING ERRCODE = 'GW003';
    END IF;
END
$$;

-- Submit one task and fan it out into one job per image, in the caller's transaction.
-- Raises SQLSTATE GW0xx with a one-line message on bad input and writes nothing.
-- (Version 4: the model's contract and the plan's models (check_image), a params size
-- setting, GW013 for a key reused with other parameters, GW012 past the tenant's cap of
-- unfinished tasks. A repeat of a key answers before that cap is counted: a client retrying
-- a submit that went through is never refused for the task it already made.)
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
    v_limit     integer;
    v_n         integer;
    v_id        bigint;
    v_first     record;
    v_differs   text;
    v_given     jsonb;
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
    IF p_kind = 'image' THEN
        PERFORM genworker.check_image(v_plan.name, v_plan.models, p_params);
    END IF;
    -- after the image checks: an over-long prompt is told as such, not as too many bytes
    v_limit := genworker.setting_int('max_params_bytes', 16384);
    IF octet_length(p_params::text) > v_limit THEN
        RAISE EXCEPTION 'invalid params: % bytes of JSON, the limit is %', octet_length(p_params::text), v_limit
            USING ERRCODE = 'GW006';
    END IF;
    v_n := coalesce(p_n, v_plan.images);
    IF v_n < 1 OR v_n > v_plan.images THEN
        RAISE EXCEPTION 'invalid n %: plan % allows 1 to % images', v_n, v_plan.name, v_plan.images
            USING ERRCODE = 'GW005';
    END IF;
    -- The model the task was checked against is the one its jobs ask for: written into its
    -- params, so a node's own --model (which may differ from the default_model of whoever
    -- migrated last) never sends it to another model.
    v_given := p_params;
    IF p_kind = 'image' AND NOT p_params ? 'model' THEN
        p_params := p_params || coalesce((SELECT jsonb_build_object('model', value)
                                            FROM genworker.settings
                                           WHERE key = 'default_model'
                                             AND jsonb_typeof(value) = 'string'), '{}');
    END IF;
    IF p_idempotency_key IS NOT NULL THEN
        IF char_length(p_idempotency_key) NOT BETWEEN 1 AND 200 THEN
            RAISE EXCEPTION 'invalid idempotency key: use 1-200 characters' USING ERRCODE = 'GW006';
        END IF;
        -- Serialise submits of one key so the second sees the first.
        PERFORM pg_advisory_xact_lock(hashtextextended(p_tenant || E'\x1f' || p_idempotency_key, 7));
        SELECT id, plan, kind, params, n_jobs INTO v_first FROM genworker.tasks
         WHERE tenant = p_tenant AND idempotency_key = p_idempotency_key;
        IF FOUND THEN
            -- jsonb equality: key order and spacing do not count, values and types do
            v_differs := CASE WHEN v_first.plan <> v_plan.name THEN 'plan'
                              WHEN v_first.kind <> p_kind THEN 'kind'
                              WHEN v_first.n_jobs <> v_n THEN 'n'
                              WHEN v_first.params NOT IN (p_params, v_given) THEN 'params' END;
            IF v_differs IS NOT NULL THEN
                RAISE EXCEPTION 'idempotency key % was first used for task % with another %: send the same request again, or use a new key',
                    to_json(left(p_idempotency_key, 80))::text, v_first.id, v_differs
                    USING ERRCODE = 'GW013';
            END IF;
            RETURN v_first.id;
        END IF;
    END IF;
    v_limit := genworker.setting_int('max_queued_tasks_per_tenant', 1000);
    -- counted up to the cap only, on the tenant's open tasks (index tasks_open_tenant); two
    -- submits of one tenant at the same moment may both see room: a soft cap by one or two
    IF v_limit > 0 AND (SELECT count(*) FROM (
            SELECT 1 FROM genworker.tasks
             WHERE tenant = p_tenant AND status IN ('queued', 'running') LIMIT v_limit) o) >= v_limit THEN
        RAISE EXCEPTION 'too many queued tasks: tenant % already has % queued or running, the limit; submit again when some have finished',
            p_tenant, v_limit USING ERRCODE = 'GW012';
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

-- Bulk form: a JSON array of {plan, params, tenant?, kind?, idempotency_key?, n?}, one round
-- trip, at most max_bulk_tasks items (version 4: one call is one transaction; a bigger one
-- holds its locks for long and could never pass the tenant's queued-task cap anyway).
CREATE OR REPLACE FUNCTION genworker.submit_tasks(p_tasks jsonb) RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    v_ids   bigint[] := '{}';
    v_t     jsonb;
    v_limit integer := genworker.setting_int('max_bulk_tasks', 1000);
BEGIN
    IF jsonb_typeof(p_tasks) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'invalid bulk submit: expected a JSON array of tasks' USING ERRCODE = 'GW006';
    END IF;
    IF jsonb_array_length(p_tasks) > v_limit THEN
        RAISE EXCEPTION 'invalid bulk submit: % tasks in one call, the limit is %; split it',
            jsonb_array_length(p_tasks), v_limit USING ERRCODE = 'GW006';
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

-- ------------------------------------------------------------------ claim

-- As in 0003, and only jobs of p_kinds (NULL: any kind). A task's jobs share its kind.
DROP FUNCTION IF EXISTS genworker.pick_capped(integer);
CREATE OR REPLACE FUNCTION genworker.pick_capped(p_n integer, p_kinds text[] DEFAULT NULL,
                                      OUT o_ids bigint[], OUT o_lanes integer[],
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
        -- the next task in order of service that has a queued job of a kind we run
        SELECT q.urgency, q.task_id, q.tenant, t.plan INTO v_head
          FROM genworker.jobs q JOIN genworker.tasks t ON t.id = q.task_id
         WHERE q.status = 'queued' AND (q.urgency, q.task_id) > (v_k, v_t)
           AND (p_kinds IS NULL OR q.kind = ANY (p_kinds))
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

-- Claim up to p_n of the most urgent runnable jobs of p_kinds for p_node under a lease.
-- (Version 4: p_kinds, the kinds the node has handlers for; NULL, what a version-3 node's
-- three-argument call gets, claims every kind. A kind no node runs is stepped over in the
-- index, so the submit warns about it.)
DROP FUNCTION IF EXISTS genworker.claim_jobs(text, integer, double precision);
CREATE OR REPLACE FUNCTION genworker.claim_jobs(p_node text, p_n integer, p_lease_s double precision,
                                                p_kinds text[] DEFAULT NULL)
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
        SELECT * INTO v_pick FROM genworker.pick_capped(p_n, p_kinds);
        v_ids := genworker.trim_to_caps(v_pick.o_ids, v_pick.o_lanes, v_pick.l_tenant,
                                        v_pick.l_plan, v_pick.l_cap);
    ELSE
        SELECT array_agg(p.id) INTO v_ids
          FROM (SELECT q.id FROM genworker.jobs q
                 WHERE q.status = 'queued' AND (p_kinds IS NULL OR q.kind = ANY (p_kinds))
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

-- ------------------------------------------------------------------ completion

-- A token count from a provider's usage object, or NULL when it is not a count PostgreSQL
-- can keep: a malformed usage must never fail the outcome that carries it.
CREATE OR REPLACE FUNCTION genworker.token_count(p_value jsonb)
RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(p_value) = 'number'
                 AND p_value::text::numeric BETWEEN 0 AND 2147483647
                THEN round(p_value::text::numeric)::integer END
$$;

-- Tell listeners a task finished: NOTIFY genworker_task_finished with {"task": id, "status":
-- "succeeded|failed|cancelled", "tenant": "..."} (a tenant is at most 64 safe characters, so far
-- below NOTIFY's 8000 bytes). Delivered at commit, to connections that LISTEN outside a
-- transaction; Client.wait and `genworker submit --wait` wake on it and poll anyway.
CREATE OR REPLACE FUNCTION genworker.task_finished(p_task_id bigint, p_status text, p_tenant text)
RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify('genworker_task_finished',
                     jsonb_build_object('task', p_task_id, 'status', p_status, 'tenant', p_tenant)::text)
$$;

-- As in 0001, and the finished jobs' token usage added to their tasks (version 4: the two
-- defaulted arrays; release_jobs, which finishes jobs without an answer, passes none). A task
-- this call finishes is announced on genworker_task_finished (task_finished), in the same
-- transaction: complete_jobs, release_jobs and reap all finish tasks through here.
DROP FUNCTION IF EXISTS genworker.task_progress(bigint[], integer[], integer[], integer[]);
CREATE OR REPLACE FUNCTION genworker.task_progress(p_task_ids bigint[], p_ok integer[], p_dead integer[],
                                        p_cancelled integer[], p_input_tokens bigint[] DEFAULT NULL,
                                        p_output_tokens bigint[] DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_n integer;
BEGIN
    IF coalesce(cardinality(p_task_ids), 0) = 0 THEN
        RETURN;
    END IF;
    PERFORM 1 FROM genworker.tasks WHERE id = ANY (p_task_ids) ORDER BY id FOR UPDATE;
    WITH upd AS (
        UPDATE genworker.tasks t
           SET n_succeeded = t.n_succeeded + d.ok,
               n_dead = t.n_dead + d.dead,
               n_cancelled = t.n_cancelled + d.cancelled,
               input_tokens = t.input_tokens + coalesce(d.input_tokens, 0),
               output_tokens = t.output_tokens + coalesce(d.output_tokens, 0),
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
          FROM unnest(p_task_ids, p_ok, p_dead, p_cancelled, p_input_tokens, p_output_tokens)
               AS d(task_id, ok, dead, cancelled, input_tokens, output_tokens),
               -- the row before this update: locked above, so this statement's snapshot is current
               genworker.tasks was
         WHERE t.id = d.task_id AND was.id = t.id
        RETURNING t.id, t.status, t.tenant, was.status AS was_status
    )
    SELECT count(genworker.task_finished(u.id, u.status, u.tenant)) INTO v_n FROM upd u
     WHERE u.status IN ('succeeded', 'failed', 'cancelled')
       AND u.was_status NOT IN ('succeeded', 'failed', 'cancelled');
END
$$;

-- Write a batch of outcomes, fenced (see 0003). Version 4: an ok outcome's result may carry
-- the provider's usage, {"usage": {"input_tokens": N, "output_tokens": M}}: it is kept on the
-- job and added to its task, also when the task was cancelled meanwhile (the tokens were
-- spent). Same signature: a version-3 node's call records usage too.
CREATE OR REPLACE FUNCTION genworker.complete_jobs(
    p_ids bigint[], p_tokens bigint[], p_kinds text[], p_results jsonb[], p_errors text[],
    p_delays double precision[], p_snooze_max_s double precision DEFAULT 3600
) RETURNS TABLE (job_id bigint, status text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_ids bigint[]; v_task_ids bigint[]; v_status text[]; v_in integer[]; v_out integer[];
    v_tasks bigint[]; v_ok integer[]; v_dead integer[]; v_cancelled integer[];
    v_tin bigint[]; v_tout bigint[];
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
               input_tokens = CASE WHEN o.kind = 'ok'
                                   THEN genworker.token_count(o.result -> 'usage' -> 'input_tokens')
                                   ELSE j.input_tokens END,
               output_tokens = CASE WHEN o.kind = 'ok'
                                    THEN genworker.token_count(o.result -> 'usage' -> 'output_tokens')
                                    ELSE j.output_tokens END,
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
        RETURNING j.id, j.task_id, j.status,
                  CASE WHEN o.kind = 'ok' THEN j.input_tokens END AS input_tokens,
                  CASE WHEN o.kind = 'ok' THEN j.output_tokens END AS output_tokens
    )
    SELECT array_agg(u.id), array_agg(u.task_id), array_agg(u.status),
           array_agg(u.input_tokens), array_agg(u.output_tokens)
      INTO v_ids, v_task_ids, v_status, v_in, v_out FROM upd u;

    SELECT array_agg(d.task_id), array_agg(d.ok), array_agg(d.dead), array_agg(d.cancelled),
           array_agg(d.tin), array_agg(d.tout)
      INTO v_tasks, v_ok, v_dead, v_cancelled, v_tin, v_tout
      FROM (SELECT g.task_id,
                   count(*) FILTER (WHERE g.status = 'succeeded')::integer AS ok,
                   count(*) FILTER (WHERE g.status = 'dead')::integer AS dead,
                   count(*) FILTER (WHERE g.status = 'cancelled')::integer AS cancelled,
                   coalesce(sum(g.tin), 0)::bigint AS tin,
                   coalesce(sum(g.tout), 0)::bigint AS tout
              FROM unnest(v_task_ids, v_status, v_in, v_out) AS g(task_id, status, tin, tout)
             WHERE g.status <> 'scheduled' GROUP BY g.task_id) d;
    PERFORM genworker.task_progress(v_tasks, v_ok, v_dead, v_cancelled, v_tin, v_tout);
    -- A claim cut short by a cap looks like an empty queue to its node, which then waits for
    -- a hint: a job leaving the in-flight set may have made room under a cap.
    IF v_ids IS NOT NULL AND genworker.caps_on() THEN
        PERFORM pg_notify('genworker_jobs', '');
    END IF;

    RETURN QUERY SELECT * FROM unnest(v_ids, v_status);
END
$$;

-- ------------------------------------------------------------------ requeue

-- Requeue, with fresh attempts, up to p_limit dead jobs that died in [p_since, p_before), of
-- tasks not cancelled (what failed during an outage); returns how many. p_before bounds a
-- run of batches: a job that dies again meanwhile is not requeued twice by the same run.
CREATE OR REPLACE FUNCTION genworker.retry_dead(p_since timestamptz, p_before timestamptz,
                                                p_limit integer DEFAULT 500)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_tasks bigint[]; v_counts integer[]; v_n integer;
BEGIN
    -- jobs first, then their tasks in id order: the order complete_jobs locks them in
    WITH picked AS (
        SELECT j.id FROM genworker.jobs j JOIN genworker.tasks t ON t.id = j.task_id
         WHERE j.status = 'dead' AND j.finished_at >= p_since AND j.finished_at < p_before
           AND t.status <> 'cancelled'
         ORDER BY j.finished_at, j.id LIMIT p_limit
         FOR UPDATE OF j SKIP LOCKED
    ), r AS (
        UPDATE genworker.jobs j
           SET status = 'queued', attempts = 0, deaths = 0, snoozed_s = 0, error = NULL,
               finished_at = NULL, run_after = now()
          FROM picked WHERE j.id = picked.id
        RETURNING j.task_id
    )
    SELECT array_agg(g.task_id ORDER BY g.task_id), array_agg(g.n ORDER BY g.task_id)
      INTO v_tasks, v_counts
      FROM (SELECT r.task_id, count(*)::integer AS n FROM r GROUP BY r.task_id) g;
    IF v_tasks IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM 1 FROM genworker.tasks WHERE id = ANY (v_tasks) ORDER BY id FOR UPDATE;
    UPDATE genworker.tasks t
       SET n_dead = t.n_dead - d.n, status = 'running', finished_at = NULL, error = NULL
      FROM unnest(v_tasks, v_counts) AS d(task_id, n)
     WHERE t.id = d.task_id;
    SELECT sum(c) INTO v_n FROM unnest(v_counts) c;
    PERFORM pg_notify('genworker_jobs', '');
    RETURN v_n;
END
$$;

-- ------------------------------------------------------------------ finish events

-- Cancel a task, as in 0001 (same signature), and announce it on genworker_task_finished
-- when this call is what finished it (not for a task already succeeded, failed or cancelled).
CREATE OR REPLACE FUNCTION genworker.cancel_task(p_task_id bigint) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_status text; v_was text; v_tenant text; v_n integer;
BEGIN
    -- Jobs first, then the task: the same order as complete_jobs, so the two never deadlock.
    WITH c AS (
        UPDATE genworker.jobs SET status = 'cancelled', error = 'task cancelled', finished_at = now()
         WHERE task_id = p_task_id AND status IN ('queued', 'scheduled')
        RETURNING 1
    ) SELECT count(*) INTO v_n FROM c;
    -- locked before it is read: a complete_jobs finishing it meanwhile is seen, not overwritten
    SELECT status, tenant INTO v_was, v_tenant FROM genworker.tasks WHERE id = p_task_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no task %', p_task_id USING ERRCODE = 'GW010';
    END IF;
    UPDATE genworker.tasks
       SET n_cancelled = n_cancelled + v_n,
           status = CASE WHEN status IN ('succeeded', 'failed') THEN status ELSE 'cancelled' END,
           finished_at = CASE WHEN status IN ('succeeded', 'failed') THEN finished_at
                              ELSE coalesce(finished_at, now()) END
     WHERE id = p_task_id
    RETURNING status INTO v_status;
    IF v_status = 'cancelled' AND v_was <> 'cancelled' THEN
        PERFORM genworker.task_finished(p_task_id, v_status, v_tenant);
    END IF;
    RETURN v_status;
END
$$;
