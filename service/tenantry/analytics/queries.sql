-- Named statements of the analytics module.  The views they read are
-- schema/0009_analytics.sql's; the refresh is functions.sql's.  Every read but
-- `refresh` runs as the analyst's login, on a standby.

-- name: refresh
-- On the primary, as the worker's login: refresh unless refreshed less than $1 seconds
-- ago (by any process) or being refreshed now.
SELECT tenantry.refresh_analytics($1::double precision)

-- name: replica
-- Where the analyst's connection landed, and how far behind the primary it is: the
-- age of the last transaction replayed (which also grows while the primary is idle),
-- and the WAL received but not yet replayed.  NULLs on a primary.
SELECT pg_catalog.pg_is_in_recovery() AS in_recovery,
       CASE WHEN pg_catalog.pg_is_in_recovery() THEN
           extract(epoch FROM now() - pg_catalog.pg_last_xact_replay_timestamp())::double precision
       END AS lag_s,
       CASE WHEN pg_catalog.pg_is_in_recovery() THEN
           pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_last_wal_receive_lsn(),
                                      pg_catalog.pg_last_wal_replay_lsn())::bigint
       END AS behind_bytes

-- name: refreshed
-- When the views were last refreshed (NULL: only by the migration), and the last day
-- they cover (the refresh's UTC date).
SELECT (SELECT r.refreshed_at FROM tenantry_analytics.refresh_state r) AS refreshed_at,
       (SELECT max(o.day) FROM tenantry_analytics.onboarding_daily o) AS last_day

-- name: jobs
-- Per day and kind, summed over the tenants ($2: one tenant's only), the last $1 days
-- of the views (the 7-day sums need the six days before the first one shown).
WITH per_day AS (
    SELECT j.day, j.kind, sum(j.succeeded)::bigint AS succeeded,
           sum(j.failed_attempts)::bigint AS failed_attempts, sum(j.dead)::bigint AS dead
      FROM tenantry_analytics.jobs_daily j
     WHERE $2::uuid IS NULL OR j.tenant_id = $2::uuid
     GROUP BY j.day, j.kind
), windowed AS (
    SELECT p.*, (sum(p.succeeded) OVER w)::bigint AS succeeded_7d,
           (sum(p.dead) OVER w)::bigint AS dead_7d
      FROM per_day p
    WINDOW w AS (PARTITION BY p.kind ORDER BY p.day ROWS BETWEEN 6 PRECEDING AND CURRENT ROW)
)
SELECT w.day, w.kind, w.succeeded, w.failed_attempts, w.dead, w.succeeded_7d, w.dead_7d
  FROM windowed w
 WHERE w.day > (SELECT max(o.day) FROM tenantry_analytics.onboarding_daily o) - $1::integer
 ORDER BY w.day DESC, w.kind

-- name: webhooks
-- Per day, summed over the tenants ($2: one tenant's only); every day a row.
WITH per_day AS (
    SELECT w.day, sum(w.deliveries)::bigint AS deliveries, sum(w.delivered)::bigint AS delivered,
           sum(w.dead)::bigint AS dead, sum(w.attempts)::bigint AS attempts,
           sum(w.failed_attempts)::bigint AS failed_attempts
      FROM tenantry_analytics.webhooks_daily w
     WHERE $2::uuid IS NULL OR w.tenant_id = $2::uuid
     GROUP BY w.day
), filled AS (
    SELECT o.day, coalesce(p.deliveries, 0) AS deliveries,
           coalesce(p.delivered, 0) AS delivered, coalesce(p.dead, 0) AS dead,
           coalesce(p.attempts, 0) AS attempts, coalesce(p.failed_attempts, 0) AS failed_attempts
      FROM tenantry_analytics.onboarding_daily o
      LEFT JOIN per_day p ON p.day = o.day
), windowed AS (
    SELECT f.*,
           round(sum(f.failed_attempts) OVER w
                 / nullif(sum(f.attempts) OVER w, 0)::numeric, 4)::double precision
               AS failure_ratio_7d
      FROM filled f
    WINDOW w AS (ORDER BY f.day ROWS BETWEEN 6 PRECEDING AND CURRENT ROW)
)
SELECT w.day, w.deliveries, w.delivered, w.dead, w.attempts, w.failed_attempts,
       w.failure_ratio_7d
  FROM windowed w
 WHERE w.day > (SELECT max(o.day) FROM tenantry_analytics.onboarding_daily o) - $1::integer
 ORDER BY w.day DESC

-- name: onboarding
-- The funnel per day of acceptance, the last $1 days (all sign-ups: each makes its own
-- tenant).
SELECT o.day, o.accepted, o.completed, o.failed, o.in_progress,
       o.complete_p50_s, o.complete_p95_s,
       o.completion_ratio_7d::double precision AS completion_ratio_7d
  FROM tenantry_analytics.onboarding_daily o
 WHERE o.day > (SELECT max(x.day) FROM tenantry_analytics.onboarding_daily x) - $1::integer
 ORDER BY o.day DESC

-- name: refresh_timeout
-- A refresh rebuilds 90 days of three views: longer than the worker's own statements
-- may take (db.WORKER_TIMEOUTS), and it blocks no one (CONCURRENTLY), so its
-- transaction gets a bound of its own.
SELECT pg_catalog.set_config('statement_timeout', $1::text, true)
