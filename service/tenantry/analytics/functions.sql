-- version: 1
-- The analytics module's function: the refresh of the materialised views of
-- tenantry_analytics (schema/0009_analytics.sql).  A repeatable migration
-- (tenantry/migrate.py), applied again whenever this file changes (raise the version
-- above with every change).  Owned by tenantry_system, which owns the views (a refresh
-- needs their owner), executable by the worker's login only: the service's login can
-- neither read the views nor make the primary rebuild them.

GRANT CREATE ON SCHEMA tenantry TO tenantry_system;

-- Refresh every view CONCURRENTLY (readers, on the primary and on the standbys, go on
-- reading the previous contents meanwhile), unless another process is refreshing now
-- or did less than min_interval_s ago.  True if this call refreshed.  The state row's
-- lock is the mutual exclusion: SKIP LOCKED makes a second refresher give up at once
-- rather than queue behind the first and then rebuild what was just rebuilt.
CREATE OR REPLACE FUNCTION tenantry.refresh_analytics(min_interval_s double precision)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    last timestamptz;
    began timestamptz := clock_timestamp();
BEGIN
    SELECT r.refreshed_at INTO last
      FROM tenantry_analytics.refresh_state r
       FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF last IS NOT NULL
       AND last > clock_timestamp() - make_interval(secs => min_interval_s) THEN
        RETURN false;
    END IF;
    REFRESH MATERIALIZED VIEW CONCURRENTLY tenantry_analytics.jobs_daily;
    REFRESH MATERIALIZED VIEW CONCURRENTLY tenantry_analytics.webhooks_daily;
    REFRESH MATERIALIZED VIEW CONCURRENTLY tenantry_analytics.onboarding_daily;
    UPDATE tenantry_analytics.refresh_state
       SET refreshed_at = clock_timestamp(),
           took_ms = extract(epoch FROM clock_timestamp() - began) * 1000;
    RETURN true;
END;
$$;

ALTER FUNCTION tenantry.refresh_analytics(double precision) OWNER TO tenantry_system;
REVOKE ALL ON FUNCTION tenantry.refresh_analytics(double precision) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.refresh_analytics(double precision) TO tenantry_worker;

REVOKE CREATE ON SCHEMA tenantry FROM tenantry_system;
