-- 0009: analytics for a read replica.  Materialised views of the last 90 days, per day
-- (UTC): jobs by tenant, kind and outcome; webhook deliveries and failures by tenant;
-- the onboarding funnel.  They live in a schema of their own, `tenantry_analytics`,
-- readable by one role only:
--   tenantry_analyst   NOLOGIN; SELECT on the views of tenantry_analytics and nothing
--                      else (no tenant table, no function of the tenantry schema).  Its
--                      login (TENANTRY_ANALYTICS_URL's user) is created by `tenantry
--                      migrate`, and reads on a standby.
-- The views are owned by tenantry_system (BYPASSRLS): a refresh runs their query as
-- their owner, and every tenant table forces row-level security on anyone else, the
-- tables' owner included.  They are refreshed by tenantry.refresh_analytics()
-- (service/tenantry/analytics/functions.sql), which only the worker may call.
-- Nothing here depends on migrations after 0007.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'tenantry_analyst') THEN
        BEGIN
            CREATE ROLE tenantry_analyst NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created concurrently by a migration of another database
        END;
    END IF;
END;
$$;

CREATE SCHEMA tenantry_analytics;
ALTER SCHEMA tenantry_analytics OWNER TO tenantry_owner;
REVOKE ALL ON SCHEMA tenantry_analytics FROM PUBLIC;

-- What the views read, as their owner.  (tenantry_system already reads the queue's
-- tables and the webhook tables for its functions.)
GRANT SELECT ON tenantry.onboardings TO tenantry_system;

-- Created as tenantry_system, so that it owns them from the start (a migrating
-- administrator that is not a superuser could not hand them over otherwise), and so
-- that the first, populating run is not filtered by row-level security.
GRANT USAGE, CREATE ON SCHEMA tenantry_analytics TO tenantry_system;
SET LOCAL ROLE tenantry_system;

-- When the views were last refreshed (one row), for readers to show how old they are,
-- and the lock that keeps two processes from refreshing at once.
CREATE TABLE tenantry_analytics.refresh_state (
    one          boolean     PRIMARY KEY DEFAULT true CHECK (one),
    refreshed_at timestamptz,
    took_ms      double precision
);
INSERT INTO tenantry_analytics.refresh_state (refreshed_at) VALUES (NULL);

-- Every name is schema-qualified: PostgreSQL 17 and later run a refresh with
-- search_path = pg_catalog, pg_temp.  Days are UTC days whatever the refreshing
-- session's TimeZone.  A (tenant, kind) with any count in the window has a row for
-- each of its 90 days, zeros included; job_counters keeps TENANTRY_COUNTER_RETENTION_DAYS
-- (14 by default), so older days read zero unless that retention is raised.
CREATE MATERIALIZED VIEW tenantry_analytics.jobs_daily AS
WITH bounds AS (
    SELECT (now() AT TIME ZONE 'UTC')::date AS last_day
), days AS (
    SELECT b.last_day - i AS day FROM bounds b, generate_series(0, 89) AS i
), counted AS (
    SELECT c.tenant_id, c.kind, (c.minute AT TIME ZONE 'UTC')::date AS day,
           sum(c.succeeded)::bigint AS succeeded,
           sum(c.failed)::bigint AS failed_attempts,
           sum(c.dead)::bigint AS dead
      FROM tenantry.job_counters c, bounds b
     WHERE c.minute >= ((b.last_day - 89)::timestamp AT TIME ZONE 'UTC')
     GROUP BY 1, 2, 3
), series AS (
    SELECT DISTINCT c.tenant_id, c.kind FROM counted c
), filled AS (
    SELECT s.tenant_id, s.kind, d.day,
           coalesce(c.succeeded, 0) AS succeeded,
           coalesce(c.failed_attempts, 0) AS failed_attempts,
           coalesce(c.dead, 0) AS dead
      FROM series s
     CROSS JOIN days d
      LEFT JOIN counted c ON c.tenant_id = s.tenant_id AND c.kind = s.kind AND c.day = d.day
)
SELECT f.tenant_id, f.kind, f.day, f.succeeded, f.failed_attempts, f.dead,
       sum(f.succeeded) OVER last_7_days AS succeeded_7d,
       sum(f.dead) OVER last_7_days AS dead_7d
  FROM filled f
WINDOW last_7_days AS (PARTITION BY f.tenant_id, f.kind ORDER BY f.day
                       ROWS BETWEEN 6 PRECEDING AND CURRENT ROW);
CREATE UNIQUE INDEX jobs_daily_key ON tenantry_analytics.jobs_daily (tenant_id, kind, day);
CREATE INDEX jobs_daily_day_idx ON tenantry_analytics.jobs_daily (day);

-- Per tenant and day: deliveries made (by creation), delivered and dead (by when they
-- ended), attempts and failed attempts (any result but `delivered`).  Webhook rows
-- are kept TENANTRY_WEBHOOK_RETENTION_DAYS (30 by default).
CREATE MATERIALIZED VIEW tenantry_analytics.webhooks_daily AS
WITH bounds AS (
    SELECT (now() AT TIME ZONE 'UTC')::date AS last_day,
           (((now() AT TIME ZONE 'UTC')::date - 89)::timestamp AT TIME ZONE 'UTC') AS since
), days AS (
    SELECT b.last_day - i AS day FROM bounds b, generate_series(0, 89) AS i
), events AS (
    SELECT w.tenant_id, (w.created_at AT TIME ZONE 'UTC')::date AS day,
           1 AS deliveries, 0 AS delivered, 0 AS dead, 0 AS attempts, 0 AS failed_attempts
      FROM tenantry.webhook_deliveries w, bounds b
     WHERE w.created_at >= b.since
    UNION ALL
    SELECT w.tenant_id, (coalesce(w.finished_at, w.updated_at) AT TIME ZONE 'UTC')::date,
           0, (w.state = 'delivered')::integer, (w.state = 'dead')::integer, 0, 0
      FROM tenantry.webhook_deliveries w, bounds b
     WHERE w.state IN ('delivered', 'dead')
       AND coalesce(w.finished_at, w.updated_at) >= b.since
    UNION ALL
    SELECT a.tenant_id, (a.attempted_at AT TIME ZONE 'UTC')::date,
           0, 0, 0, 1, (a.result <> 'delivered')::integer
      FROM tenantry.webhook_attempts a, bounds b
     WHERE a.attempted_at >= b.since
), counted AS (
    SELECT e.tenant_id, e.day,
           sum(e.deliveries)::bigint AS deliveries, sum(e.delivered)::bigint AS delivered,
           sum(e.dead)::bigint AS dead, sum(e.attempts)::bigint AS attempts,
           sum(e.failed_attempts)::bigint AS failed_attempts
      FROM events e
     GROUP BY 1, 2
), tenants AS (
    SELECT DISTINCT c.tenant_id FROM counted c
), filled AS (
    SELECT t.tenant_id, d.day,
           coalesce(c.deliveries, 0) AS deliveries, coalesce(c.delivered, 0) AS delivered,
           coalesce(c.dead, 0) AS dead, coalesce(c.attempts, 0) AS attempts,
           coalesce(c.failed_attempts, 0) AS failed_attempts
      FROM tenants t
     CROSS JOIN days d
      LEFT JOIN counted c ON c.tenant_id = t.tenant_id AND c.day = d.day
)
SELECT f.tenant_id, f.day, f.deliveries, f.delivered, f.dead, f.attempts, f.failed_attempts,
       -- Failed attempts per attempt over the last 7 days; NULL with no attempt.
       round(sum(f.failed_attempts) OVER last_7_days
             / nullif(sum(f.attempts) OVER last_7_days, 0)::numeric, 4) AS failure_ratio_7d
  FROM filled f
WINDOW last_7_days AS (PARTITION BY f.tenant_id ORDER BY f.day
                       ROWS BETWEEN 6 PRECEDING AND CURRENT ROW);
CREATE UNIQUE INDEX webhooks_daily_key ON tenantry_analytics.webhooks_daily (tenant_id, day);
CREATE INDEX webhooks_daily_day_idx ON tenantry_analytics.webhooks_daily (day);

-- The onboarding funnel per day of acceptance (a cohort: the sign-ups accepted that
-- day, and how they ended), every day of the window a row.  Not per tenant: each
-- onboarding makes its own tenant.  The time to complete is from acceptance to the
-- transition to `completed` (the row's last update: nothing changes it after that).
CREATE MATERIALIZED VIEW tenantry_analytics.onboarding_daily AS
WITH bounds AS (
    SELECT (now() AT TIME ZONE 'UTC')::date AS last_day
), days AS (
    SELECT b.last_day - i AS day FROM bounds b, generate_series(0, 89) AS i
), counted AS (
    SELECT (o.created_at AT TIME ZONE 'UTC')::date AS day,
           count(*) AS accepted,
           count(*) FILTER (WHERE o.state = 'completed') AS completed,
           count(*) FILTER (WHERE o.state = 'failed') AS failed,
           percentile_cont(0.5) WITHIN GROUP (
               ORDER BY extract(epoch FROM o.updated_at - o.created_at)::double precision)
               FILTER (WHERE o.state = 'completed') AS complete_p50_s,
           percentile_cont(0.95) WITHIN GROUP (
               ORDER BY extract(epoch FROM o.updated_at - o.created_at)::double precision)
               FILTER (WHERE o.state = 'completed') AS complete_p95_s
      FROM tenantry.onboardings o, bounds b
     WHERE o.created_at >= ((b.last_day - 89)::timestamp AT TIME ZONE 'UTC')
     GROUP BY 1
), filled AS (
    SELECT d.day, coalesce(c.accepted, 0) AS accepted, coalesce(c.completed, 0) AS completed,
           coalesce(c.failed, 0) AS failed, c.complete_p50_s, c.complete_p95_s
      FROM days d
      LEFT JOIN counted c ON c.day = d.day
)
SELECT f.day, f.accepted, f.completed, f.failed,
       f.accepted - f.completed - f.failed AS in_progress,
       f.complete_p50_s, f.complete_p95_s,
       sum(f.accepted) OVER last_7_days AS accepted_7d,
       -- Completed per accepted over the last 7 days; NULL with no sign-up.
       round(sum(f.completed) OVER last_7_days
             / nullif(sum(f.accepted) OVER last_7_days, 0)::numeric, 4) AS completion_ratio_7d
  FROM filled f
WINDOW last_7_days AS (ORDER BY f.day ROWS BETWEEN 6 PRECEDING AND CURRENT ROW);
CREATE UNIQUE INDEX onboarding_daily_key ON tenantry_analytics.onboarding_daily (day);

RESET ROLE;
REVOKE CREATE ON SCHEMA tenantry_analytics FROM tenantry_system;

-- The analyst reads the views and the refresh time; nobody else does (the service's
-- and the worker's logins hold no grant here, and their roles none either).
GRANT USAGE ON SCHEMA tenantry_analytics TO tenantry_analyst;
GRANT SELECT ON tenantry_analytics.jobs_daily, tenantry_analytics.webhooks_daily,
                tenantry_analytics.onboarding_daily, tenantry_analytics.refresh_state
   TO tenantry_analyst;
