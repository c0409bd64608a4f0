-- 0008: autoscaling.  A role for an autoscaler's metrics query (KEDA's `postgresql`
-- scaler, deploy/kubernetes/), and nothing else:
--   tenantry_metrics   NOLOGIN; may call tenantry.worker_demand (the jobs' functions.sql)
--                      and no other function, and read no table.
-- Its login is created by `tenantry migrate` from TENANTRY_METRICS_URL, as the service's
-- and the worker's are from theirs.  A login of its own, not the service's or the
-- worker's: the scaler's connection string lives in the cluster's autoscaler, outside
-- the service, so whoever reads it there can learn how much work is waiting and
-- nothing about any tenant's rows.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'tenantry_metrics') THEN
        BEGIN
            CREATE ROLE tenantry_metrics NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created concurrently by a migration of another database
        END;
    END IF;
    -- Unlike 0002's roles, nothing is handed to this one, so the migrating role need
    -- not be a member: granting it to the login takes CREATEROLE (PostgreSQL 15) or
    -- its ADMIN option (16+, which a role's creator holds).
END;
$$;

-- To name the function; the schema's tables stay unreadable (no table grant).
GRANT USAGE ON SCHEMA tenantry TO tenantry_metrics;
