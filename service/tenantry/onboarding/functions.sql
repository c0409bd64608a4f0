-- version: 3
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
AS $$
#variable_conflict use_column
DECLARE
    context text := nullif(current_setting('app.tenant_id', true), '');
    earlier record;
    accepted_at timestamptz;
BEGIN
    IF for_tenant IS NULL OR new_onboarding IS NULL OR body_digest IS NULL THEN
        RAISE EXCEPTION 'tenantry.accept_onboarding: for_tenant, new_onboarding and'
                        ' body_digest must not be null' USING ERRCODE = '22004';
    END IF;
    IF context IS DISTINCT FROM NULL AND context IS DISTINCT FROM for_tenant::text THEN
        RAISE EXCEPTION 'tenantry.accept_onboarding: the transaction is in tenant context %,'
                        ' not %', context, for_tenant USING ERRCODE = '42501';
    END IF;
    PERFORM set_config('app.tenant_id', for_tenant::text, true);
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
ALTER FUNCTION tenantry.accept_onboarding(uuid, uuid, text, text, text, bytea, bytea, jsonb,
                                          jsonb, text)
    OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.prune_idempotency_keys(integer, integer) OWNER TO tenantry_system;
REVOKE ALL ON FUNCTION tenantry.onboarding_lock(uuid, uuid),
                       tenantry.accept_onboarding(uuid, uuid, text, text, text, bytea, bytea,
                                                  jsonb, jsonb, text),
                       tenantry.prune_idempotency_keys(integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.onboarding_lock(uuid, uuid),
                          tenantry.accept_onboarding(uuid, uuid, text, text, text, bytea,
                                                     bytea, jsonb, jsonb, text)
    TO tenantry_service;
GRANT EXECUTE ON FUNCTION tenantry.prune_idempotency_keys(integer, integer) TO tenantry_worker;

REVOKE CREATE ON SCHEMA tenantry FROM tenantry_system;
