-- version: 14
-- The onboarding module's functions.  A repeatable migration (tenantry/migrate.py),
-- applied again whenever this file changes (raise the version above with every
-- change).

GRANT CREATE ON SCHEMA tenantry TO tenantry_system;

-- Lock an onboarding for one step, then read its step ledger.  Two statements, on
-- purpose: a statement's snapshot is taken before it waits for a row lock, so a ledger
-- read by the locking statement itself missed the step committed by the runner it had
-- waited for (the second runner saw no steps done, and failed on the ledger's key).
-- Each statement of a function takes a new snapshot (READ COMMITTED), so the second
-- sees everything committed before the lock was granted.  One round trip for both.
-- The caller's rights: row-level security applies.
CREATE OR REPLACE FUNCTION tenantry.onboarding_lock(for_tenant uuid, onboarding_id uuid)
RETURNS TABLE (state text, version integer, email text, tenant_name text, plan text,
               done text[])
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off  -- see the head of jobs/functions.sql
AS $$
#variable_conflict use_column
BEGIN
    PERFORM 1
       FROM tenantry.onboardings o
      WHERE o.tenant_id = $1::uuid AND o.id = $2::uuid
        FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT o.state, o.version, o.email, o.tenant_name, o.plan,
           ARRAY(SELECT s.step FROM tenantry.onboarding_steps s
                  WHERE s.tenant_id = $1::uuid AND s.onboarding_id = $2::uuid
                  ORDER BY s.step)
      FROM tenantry.onboardings o
     WHERE o.tenant_id = $1::uuid AND o.id = $2::uuid;
END;
$$;

-- Put the calling transaction in `for_tenant`'s context (app.tenant_id, transaction-
-- local, as tenant_tx does), unless it is in another tenant's context already: then
-- refuse (42501) rather than switch that transaction's tenant.  The context is compared
-- as the UUID's hex digits, as row-level security reads the setting (a cast to uuid: any
-- case, braces, hyphens), not as text in one spelling of it.  `caller` names the
-- function in the error.  For the functions below that name their tenant themselves, so
-- that sent alone they are their own transaction.
CREATE OR REPLACE FUNCTION tenantry.enter_tenant_context(for_tenant uuid, caller text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    context text := nullif(current_setting('app.tenant_id', true), '');
BEGIN
    IF context IS NOT NULL
       AND lower(translate(context, '{}-', '')) IS DISTINCT FROM
           replace(for_tenant::text, '-', '') THEN
        RAISE EXCEPTION '%: the transaction is in tenant context %, not %', caller, context,
                        for_tenant USING ERRCODE = '42501';
    END IF;
    PERFORM set_config('app.tenant_id', for_tenant::text, true);
END;
$$;

-- Accept a sign-up: its idempotency key, the onboarding, its first event and its
-- provisioning job, in one call.  Called alone, as the request's one statement, the call
-- is its own transaction: one round trip in all (the service's accept, machine.py),
-- where BEGIN, the settings, the key, the insert and COMMIT took five.
--
-- It names the tenant itself (app.tenant_id, transaction-local, as tenant_tx does) and
-- presents the key (app.idempotency_key, the key's row policy): the caller's rights, so
-- row-level security applies to every row written.  Inside a transaction already in
-- another tenant's context it refuses, rather than switch that transaction's tenant.
--
-- With a key, the first request to present it wins: a concurrent one waits on the key's
-- unique index until the winner commits, and the next statement (a new snapshot, READ
-- COMMITTED) finds the winner's row.  Then nothing is written, and the outcome says what
-- to answer: `replayed` (the same request: the winner's onboarding), `conflict` (another
-- body under the same key) or `unfinished` (the row went between the two statements).
CREATE OR REPLACE FUNCTION tenantry.accept_onboarding(
    for_tenant       uuid,
    new_onboarding   uuid,
    sign_up_email    text,
    sign_up_name     text,
    sign_up_plan     text,
    key_digest       bytea,
    body_digest      bytea,
    accepted_payload jsonb,
    job_payload      jsonb,
    job_queue        text
) RETURNS TABLE (outcome text, tenant_id uuid, onboarding_id uuid, created_at timestamptz)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off  -- see the head of jobs/functions.sql
AS $$
#variable_conflict use_column
DECLARE
    earlier record;
    accepted_at timestamptz;
BEGIN
    IF for_tenant IS NULL OR new_onboarding IS NULL OR body_digest IS NULL THEN
        RAISE EXCEPTION 'tenantry.accept_onboarding: for_tenant, new_onboarding and'
                        ' body_digest must not be null' USING ERRCODE = '22004';
    END IF;
    PERFORM tenantry.enter_tenant_context(for_tenant, 'tenantry.accept_onboarding');
    IF key_digest IS NOT NULL THEN
        PERFORM set_config('app.idempotency_key', encode(key_digest, 'hex'), true);
        INSERT INTO tenantry.idempotency_keys AS k
               (key_hash, request_hash, tenant_id, onboarding_id)
        VALUES (key_digest, body_digest, for_tenant, new_onboarding)
        ON CONFLICT (key_hash) DO NOTHING;
        IF NOT FOUND THEN
            SELECT k.request_hash, k.tenant_id, k.onboarding_id, k.created_at INTO earlier
              FROM tenantry.idempotency_keys k
             WHERE k.key_hash = key_digest;
            IF NOT FOUND THEN
                RETURN QUERY SELECT 'unfinished'::text, NULL::uuid, NULL::uuid,
                                    NULL::timestamptz;
            ELSE
                RETURN QUERY SELECT CASE WHEN earlier.request_hash = body_digest
                                         THEN 'replayed' ELSE 'conflict' END,
                                    earlier.tenant_id, earlier.onboarding_id, earlier.created_at;
            END IF;
            RETURN;
        END IF;
    END IF;
    INSERT INTO tenantry.onboardings AS o (tenant_id, id, email, tenant_name, plan)
    VALUES (for_tenant, new_onboarding, sign_up_email, sign_up_name, sign_up_plan)
    RETURNING o.created_at INTO accepted_at;
    PERFORM tenantry.emit(for_tenant, 'onboarding', new_onboarding::text,
                          'onboarding.accepted', accepted_payload, 1);
    PERFORM tenantry.enqueue(for_tenant, 'onboarding.provision', job_payload, job_queue,
                             NULL::timestamptz, 0::smallint,
                             'onboarding:' || new_onboarding::text);
    RETURN QUERY SELECT 'accepted'::text, for_tenant, new_onboarding, accepted_at;
END;
$$;

-- Run a group of provisioning steps (provision.py, STEP_GROUPS), in one call: sent
-- alone, the call is its own transaction, so a group is one round trip where BEGIN, the
-- setting, the lock, each step's statement and its record, the job's completion and
-- COMMIT took nine to fourteen.
--
-- It names the tenant itself (app.tenant_id, transaction-local) and refuses inside a
-- transaction of another tenant, as tenantry.accept_onboarding does; the caller's
-- rights, so row-level security applies to every row.  The onboarding is locked first,
-- then its ledger read (each statement of a function takes a new snapshot: the ledger
-- read sees a step committed by the runner whose lock it waited for; see
-- onboarding_lock).  Each step of `todo` not in the ledger then runs, unless the
-- onboarding has ended: its rows (ids from the caller, derived from the onboarding's, so
-- a repeat is a no-op), then its record: a ledger row with the time it was done (the
-- group's steps share one transaction, and the ledger lists them by this time: strictly
-- increasing, a microsecond apart at least), the onboarding's next version and state,
-- and its event of that version.  The records of the group's steps are written together
-- after the last step (three statements, not three per step: the ledger rows, the
-- onboarding, the events with tenantry.emit_many), in the order the steps ran.
-- `storage` and `welcome_email` have no rows here: the caller made their effect outside
-- the database before the call.
--
-- `completes_job` (with its `lease_owner`): the provisioning job, completed in the same
-- transaction (the last group: its steps and the job's end commit together).  If the
-- worker no longer holds the job's lease, everything rolls back (SQLSTATE TY002).
-- `compensation` ({"queue", "payload"}): the caller made an effect outside the database
-- for this call; if the onboarding is found failed, the failure's compensation may
-- already have run, so another compensation job is enqueued in this transaction.
-- No free slug for the tenant raises SQLSTATE TY001 (nothing is written: the caller
-- fails the onboarding).
--
-- A group that runs steps and leaves the onboarding unfinished (the first: the tenant's
-- rows and the storage) commits without waiting for its WAL to reach the disk
-- (synchronous_commit off, for this transaction alone), unless the setting
-- `tenantry.durable_steps` is true for the session (set on the service's login or the
-- database; any value but an unset one or a false one, typos included, makes it wait).
-- Waiting for that flush was a good part of a sign-up's PostgreSQL time, and with the
-- service's files in memory the wait, not the CPU, bounded the provisioning rate (the
-- README's Benchmarks: bench.onboarding).  What it risks is small and repaired by
-- itself: PostgreSQL's crash (not the service's) may lose the last fraction of a second
-- of such commits.  What they wrote is re-derived from what the accept committed
-- durably: the provisioning job runs again (its attempt fails with the connection, or
-- it is rescued when its lease runs out) and does the lost steps again, with the same
-- ids and versions; the effects outside the database are idempotent (the storage, the
-- email's key).  The group that ends the onboarding (and completes the job), the
-- failure's path (provision.py _fail) and the compensation below wait: a commit that
-- waits writes every commit before it to the disk too, so `completed` or `failed`,
-- once seen, stays, and so does every step before it.  Nothing durable is built on a
-- lost step either: the webhook fan-out's commit waits.  A stream or a status read may
-- have shown a step that a crash then lost; it comes again with the same version (its
-- `done_at` may differ).
--
-- Returns the onboarding as the call leaves it, and the steps it ran; no row when there
-- is no such onboarding.
CREATE OR REPLACE FUNCTION tenantry.onboarding_run_steps(
    for_tenant       uuid,
    onboarding       uuid,
    todo             text[],
    all_steps        text[],
    tenant_slugs     text[],
    owner_id         uuid,
    role_names       text[],
    role_permissions text[],
    workspace_id     uuid,
    request_id       text,
    completes_job    bigint,
    lease_owner      text,
    compensation     jsonb
) RETURNS TABLE (state text, version integer, email text, tenant_name text, plan text,
                 done text[], ran text[])
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off  -- see the head of jobs/functions.sql
AS $$
#variable_conflict use_column
DECLARE
    -- The steps in their order (onboarding/model.py, STEPS): `all_steps` must be this
    -- list, and a step runs only once every step before it is in the ledger, so no
    -- caller can record a step out of order or end the onboarding elsewhere.
    steps     constant text[] := ARRAY['tenant', 'owner', 'roles', 'workspace', 'storage',
                                       'welcome_email', 'provisioned'];
    o         record;
    done_now  text[];
    ran_now   text[] := '{}';
    ran_at    timestamptz[] := '{}';
    step      text;
    step_at   timestamptz;
    -- The events to append, element by element (tenantry.emit_many).
    ev_aggs   text[] := '{}';
    ev_ids    text[] := '{}';
    ev_vers   integer[] := '{}';
    ev_types  text[] := '{}';
    ev_data   jsonb[] := '{}';
    request   jsonb := CASE WHEN request_id IS NULL THEN '{}'::jsonb
                            ELSE jsonb_build_object('request_id', request_id) END;
BEGIN
    IF for_tenant IS NULL OR onboarding IS NULL THEN
        RAISE EXCEPTION 'tenantry.onboarding_run_steps: for_tenant and onboarding must not'
                        ' be null' USING ERRCODE = '22004';
    END IF;
    IF all_steps IS DISTINCT FROM steps THEN
        RAISE EXCEPTION 'tenantry.onboarding_run_steps: all_steps must be %', steps
            USING ERRCODE = '22023';
    END IF;
    PERFORM tenantry.enter_tenant_context(for_tenant, 'tenantry.onboarding_run_steps');
    PERFORM 1
       FROM tenantry.onboardings x
      WHERE x.tenant_id = for_tenant AND x.id = onboarding
        FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT x.state, x.version, x.email, x.tenant_name, x.plan,
           ARRAY(SELECT s.step FROM tenantry.onboarding_steps s
                  WHERE s.tenant_id = for_tenant AND s.onboarding_id = onboarding) AS done
      INTO o
      FROM tenantry.onboardings x
     WHERE x.tenant_id = for_tenant AND x.id = onboarding;
    done_now := o.done;
    IF compensation IS NOT NULL AND o.state = 'failed' THEN
        PERFORM tenantry.enqueue(for_tenant, 'onboarding.compensate',
                                 compensation -> 'payload', compensation ->> 'queue');
    END IF;
    IF o.state NOT IN ('completed', 'failed') THEN
        FOREACH step IN ARRAY todo LOOP
            CONTINUE WHEN step = ANY (done_now);
            IF NOT steps[1:array_position(steps, step) - 1] <@ done_now THEN
                RAISE EXCEPTION 'tenantry.onboarding_run_steps: step % before the steps'
                                ' before it', step USING ERRCODE = '22023';
            END IF;
            CASE step
            WHEN 'tenant' THEN
                IF tenantry.tenant_create_with_free_slug(for_tenant, tenant_slugs,
                                                         o.tenant_name, o.plan) IS NULL THEN
                    RAISE EXCEPTION 'no free slug for %', quote_literal(o.tenant_name)
                        USING ERRCODE = 'TY001';
                END IF;
            WHEN 'owner' THEN
                PERFORM tenantry.tenant_add_user(for_tenant, owner_id, o.email,
                                                 left(split_part(o.email, '@', 1), 100));
            WHEN 'roles' THEN
                PERFORM tenantry.tenant_add_roles(for_tenant, role_names, role_permissions);
            WHEN 'workspace' THEN
                PERFORM tenantry.tenant_add_workspace_with_member(
                    for_tenant, workspace_id, 'default', 'Default', owner_id, 'owner');
            WHEN 'storage', 'welcome_email' THEN
                NULL;  -- made outside the database, by the caller, before this call
            WHEN 'provisioned' THEN
                IF NOT tenantry.tenant_set_state(for_tenant, 'active') THEN
                    RAISE EXCEPTION 'no tenant %', for_tenant USING ERRCODE = 'P0002';
                END IF;
                ev_aggs := ev_aggs || 'tenant'::text;
                ev_ids := ev_ids || for_tenant::text;
                ev_vers := ev_vers || NULL::integer;
                ev_types := ev_types || 'tenant.provisioned'::text;
                ev_data := ev_data || (jsonb_build_object('tenant_id', for_tenant,
                                                          'name', o.tenant_name,
                                                          'plan', o.plan) || request);
            ELSE
                RAISE EXCEPTION 'tenantry.onboarding_run_steps: no step %', step
                    USING ERRCODE = '22023';
            END CASE;
            -- Done now: strictly after the step before it (the ledger's order).
            step_at := greatest(clock_timestamp(),
                                ran_at[cardinality(ran_at)] + interval '1 microsecond');
            done_now := done_now || step;
            ran_now := ran_now || step;
            ran_at := ran_at || step_at;
            o.state := CASE WHEN step = all_steps[cardinality(all_steps)]
                            THEN 'completed' ELSE 'provisioning' END;
            o.version := o.version + 1;
            ev_aggs := ev_aggs || 'onboarding'::text;
            ev_ids := ev_ids || onboarding::text;
            ev_vers := ev_vers || o.version;
            ev_types := ev_types || CASE WHEN o.state = 'completed' THEN 'onboarding.completed'
                                         ELSE 'onboarding.step_completed' END;
            ev_data := ev_data || (jsonb_build_object(
                'state', o.state, 'step', step, 'steps_done', cardinality(done_now),
                'steps_total', cardinality(all_steps),
                'done_at', to_char(step_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
                || request);
        END LOOP;
        IF cardinality(ran_now) > 0 THEN
            IF o.state = 'provisioning' AND completes_job IS NULL
               AND lower(btrim(coalesce(current_setting('tenantry.durable_steps', true), '')))
                   IN ('', 'f', 'fa', 'fal', 'fals', 'false', 'n', 'no', 'of', 'off', '0') THEN
                PERFORM set_config('synchronous_commit', 'off', true);  -- see above
            END IF;
            INSERT INTO tenantry.onboarding_steps (tenant_id, onboarding_id, step, done_at)
            SELECT for_tenant, onboarding, r.step, r.at
              FROM unnest(ran_now, ran_at) WITH ORDINALITY AS r(step, at, n)
             ORDER BY r.n;
            UPDATE tenantry.onboardings x
               SET state = o.state, version = o.version, failure_reason = NULL,
                   updated_at = now()
             WHERE x.tenant_id = for_tenant AND x.id = onboarding;
            PERFORM tenantry.emit_many(for_tenant, ev_aggs, ev_ids, ev_vers, ev_types,
                                       ev_data);
        END IF;
    END IF;
    IF completes_job IS NOT NULL
       AND NOT tenantry.complete_job(for_tenant, completes_job, lease_owner) THEN
        RAISE EXCEPTION 'job %: lease lost; effects rolled back', completes_job
            USING ERRCODE = 'TY002';
    END IF;
    RETURN QUERY SELECT o.state, o.version, o.email, o.tenant_name, o.plan, done_now, ran_now;
END;
$$;

-- Retention of the idempotency keys: older than the given age, oldest first, a
-- bounded batch per call.
CREATE OR REPLACE FUNCTION tenantry.prune_idempotency_keys(retention_hours integer,
                                                           max_rows integer)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
BEGIN
    IF retention_hours IS NULL OR retention_hours < 1 THEN
        RAISE EXCEPTION 'tenantry.prune_idempotency_keys: retention_hours must be >= 1'
            USING ERRCODE = '22023';
    END IF;
    DELETE FROM tenantry.idempotency_keys k
     WHERE k.ctid = ANY (ARRAY(
           SELECT x.ctid FROM tenantry.idempotency_keys x
            WHERE x.created_at < now() - make_interval(hours => retention_hours)
            ORDER BY x.created_at
            LIMIT max_rows));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;

ALTER FUNCTION tenantry.onboarding_lock(uuid, uuid) OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.enter_tenant_context(uuid, text) OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.accept_onboarding(uuid, uuid, text, text, text, bytea, bytea, jsonb,
                                          jsonb, text)
    OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.onboarding_run_steps(uuid, uuid, text[], text[], text[], uuid, text[],
                                             text[], uuid, text, bigint, text, jsonb)
    OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.prune_idempotency_keys(integer, integer) OWNER TO tenantry_system;
REVOKE ALL ON FUNCTION tenantry.onboarding_lock(uuid, uuid),
                       tenantry.enter_tenant_context(uuid, text),
                       tenantry.accept_onboarding(uuid, uuid, text, text, text, bytea, bytea,
                                                  jsonb, jsonb, text),
                       tenantry.prune_idempotency_keys(integer, integer),
                       tenantry.onboarding_run_steps(uuid, uuid, text[], text[], text[], uuid,
                                                     text[], text[], uuid, text, bigint, text,
                                                     jsonb)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.onboarding_lock(uuid, uuid),
                          tenantry.enter_tenant_context(uuid, text),
                          tenantry.accept_onboarding(uuid, uuid, text, text, text, bytea,
                                                     bytea, jsonb, jsonb, text),
                          tenantry.onboarding_run_steps(uuid, uuid, text[], text[], text[],
                                                        uuid, text[], text[], uuid, text,
                                                        bigint, text, jsonb)
    TO tenantry_service;
GRANT EXECUTE ON FUNCTION tenantry.prune_idempotency_keys(integer, integer) TO tenantry_worker;

REVOKE CREATE ON SCHEMA tenantry FROM tenantry_system;
