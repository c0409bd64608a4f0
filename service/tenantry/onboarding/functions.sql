-- version: 2
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
ALTER FUNCTION tenantry.prune_idempotency_keys(integer, integer) OWNER TO tenantry_system;
REVOKE ALL ON FUNCTION tenantry.onboarding_lock(uuid, uuid),
                       tenantry.prune_idempotency_keys(integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.onboarding_lock(uuid, uuid) TO tenantry_service;
GRANT EXECUTE ON FUNCTION tenantry.prune_idempotency_keys(integer, integer) TO tenantry_worker;

REVOKE CREATE ON SCHEMA tenantry FROM tenantry_system;
