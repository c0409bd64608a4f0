-- Named statements of the jobs module, the only writer of tenantry.jobs,
-- tenantry.dead_jobs, tenantry.job_counters and tenantry.periodic_runs.
--
-- Batch statements on one worker's jobs take arrays of keys.  They find each row with
-- a correlated primary-key lookup that yields its ctid, then act on the rows with
-- `ctid = ANY (ARRAY(...))` (a Tid Scan), rather than joining the key array to the
-- table.  A join's plan depends on statistics that are nearly always wrong for a
-- queue: right after an ANALYZE no job runs, so "state = 'running'" or
-- "lease_owner = $me" look like one row, and the planner scans a whole index or the
-- whole table once per key.  Seen: a batch completion taking 48 s instead of 2 ms.  A
-- per-key lookup on the primary key is the only sensible plan for the subquery,
-- whatever the statistics say.  If a row changed meanwhile (rescued), it has a new
-- ctid and the recheck of `ctid = ANY (...)` skips it.  No other predicate on the
-- outer table, or the planner would estimate it as one row and seq-scan it again.
-- Matching `lease_owner = $me` without `state = 'running'` (a CHECK makes them
-- equivalent) also keeps the partial running index out of the picture.

-- name: enqueue
SELECT tenantry.enqueue(
    tenant_id    => $1::uuid,
    kind         => $2::text,
    payload      => $3::jsonb,
    queue        => $4::text,
    run_at       => $5::timestamptz,
    priority     => $6::smallint,
    dedup_key    => $7::text,
    max_attempts => $8::integer
)

-- name: claim
-- Fair claim.  Walk the tenants that have queued rows in this queue (a loose index
-- scan: one index probe per tenant, starting after the rotating cursor $5), give each
-- visited tenant an equal share of the free slots ($2), honour the per-tenant cap ($6),
-- then interleave: every tenant's most urgent row first, then every tenant's second...
-- A tenant with a deep backlog therefore cannot push another tenant's job back.
-- The walk remembers where each tenant's first queued row sits in the claim index
-- (its -priority, run_at, id), and the per-tenant fetch starts right there: the dead
-- entries that claimed rows leave at the front of a tenant's range (until VACUUM) are
-- stepped over once per claim, not twice.  The index orders by -priority so that this
-- position is a plain row comparison an index scan can start from.
WITH RECURSIVE walk(tenant_id, np, run_at, id, n) AS (
    (SELECT j.tenant_id, -j.priority::integer, j.run_at, j.id, 1
       FROM tenantry.jobs j
      WHERE j.state = 'queued' AND j.tenant_id > $5::uuid AND j.queue = $1::text
      -- The claim index's full order: only that index can serve it (the primary key
      -- also starts with tenant_id, but would read running rows from the heap).
      ORDER BY j.tenant_id, j.queue, -j.priority::integer, j.run_at, j.id
      LIMIT 1)
    UNION ALL
    SELECT x.tenant_id, x.np, x.run_at, x.id, w.n + 1
      FROM walk w
     CROSS JOIN LATERAL (
        SELECT j.tenant_id, -j.priority::integer AS np, j.run_at, j.id
          FROM tenantry.jobs j
         WHERE j.state = 'queued' AND j.tenant_id > w.tenant_id AND j.queue = $1::text
         ORDER BY j.tenant_id, j.queue, -j.priority::integer, j.run_at, j.id
         LIMIT 1
     ) x
     WHERE w.n < $7::integer
),
visited AS (
    SELECT tenant_id, np, run_at, id FROM walk
),
share AS (
    SELECT ceil($2::numeric / greatest(count(*), 1))::integer AS per_tenant FROM visited
),
candidates AS (
    SELECT c.tid, c.id, c.priority, c.run_at, c.rn
      FROM visited v
     CROSS JOIN share s
     CROSS JOIN LATERAL (
        SELECT j.ctid AS tid, j.id, j.priority, j.run_at,
               row_number() OVER (ORDER BY -j.priority::integer, j.run_at, j.id) AS rn
          FROM tenantry.jobs j
         WHERE j.tenant_id = v.tenant_id AND j.queue = $1::text
           AND j.state = 'queued' AND j.run_at <= now()
           AND (-j.priority::integer, j.run_at, j.id) >= (v.np, v.run_at, v.id)
         ORDER BY -j.priority::integer, j.run_at, j.id
         LIMIT CASE
                 WHEN $6::integer IS NULL THEN s.per_tenant
                 ELSE least(s.per_tenant, greatest(0, $6::integer - (
                        SELECT count(*) FROM tenantry.jobs r
                         WHERE r.tenant_id = v.tenant_id AND r.queue = $1::text
                           AND r.state = 'running'))::integer)
               END
     ) c
),
chosen AS (
    SELECT c.tid FROM candidates c
     ORDER BY c.priority DESC, c.rn, c.run_at, c.id
     LIMIT $2::integer
),
picked AS (
    -- Lock the chosen rows by ctid (a Tid Scan, no index descent per row).  A row
    -- another worker claimed since our snapshot has a new version at a new ctid, so
    -- the lock's recheck of `ctid = ANY (...)` skips it; a row locked right now by
    -- another claim is skipped too.  No `state = 'queued'` here: it would let the
    -- planner pick the partial claim index and scan it whole (see the batch
    -- statements below).
    SELECT j.ctid AS tid
      FROM tenantry.jobs j
     WHERE j.ctid = ANY (ARRAY(SELECT c.tid FROM chosen c))
       FOR UPDATE SKIP LOCKED
)
UPDATE tenantry.jobs j
   SET state = 'running',
       attempts = j.attempts + 1,
       lease_owner = $3::text,
       lease_expires_at = now() + make_interval(secs => $4::double precision),
       started_at = now()
 WHERE j.ctid = ANY (ARRAY(SELECT p.tid FROM picked p))
RETURNING j.tenant_id, j.id, j.queue, j.kind, j.payload, j.priority, j.attempts,
          j.max_attempts, j.created_at,
          -- How many rows each tenant could give: a tenant that gave fewer has no
          -- more runnable rows, so the worker knows whether to claim again.
          (SELECT s.per_tenant FROM share s) AS per_tenant

-- name: next_due
-- When the earliest delayed job of these queues becomes runnable (NULL: none waiting).
SELECT min(j.run_at) AS due, now() AS db_now
  FROM tenantry.jobs j
 WHERE j.state = 'queued' AND j.queue = ANY($1::text[]) AND j.run_at > now()
   -- Implied (created_at <= now() < run_at); lets jobs_due_idx serve it.
   AND j.run_at > j.created_at

-- name: complete_many
-- Success: the rows leave the hot table and become counters.  Only the lease holder
-- may complete (a rescued job belongs to whoever holds it now).  Counter rows are
-- upserted in key order so concurrent batches cannot deadlock.
WITH mine AS (
    SELECT (SELECT j.ctid FROM tenantry.jobs j
             WHERE j.tenant_id = d.tenant_id AND j.id = d.id
               AND j.lease_owner = $3::text) AS tid
      FROM unnest($1::uuid[], $2::bigint[]) AS d(tenant_id, id)
), done AS (
    DELETE FROM tenantry.jobs j
     WHERE j.ctid = ANY (ARRAY(SELECT m.tid FROM mine m))
    RETURNING j.tenant_id, j.queue, j.kind
)
INSERT INTO tenantry.job_counters AS c (tenant_id, queue, kind, minute, succeeded)
SELECT tenant_id, queue, kind, date_trunc('minute', now()), count(*)
  FROM done
 GROUP BY tenant_id, queue, kind
 ORDER BY tenant_id, queue, kind
ON CONFLICT (tenant_id, queue, kind, minute)
DO UPDATE SET succeeded = c.succeeded + excluded.succeeded

-- name: complete_one
-- The same for one job, inside a handler's own tenant transaction (exactly-once effects).
WITH done AS (
    DELETE FROM tenantry.jobs j
     WHERE j.tenant_id = $1::uuid AND j.id = $2::bigint
       AND j.lease_owner = $3::text
    RETURNING j.tenant_id, j.queue, j.kind
), counted AS (
    INSERT INTO tenantry.job_counters AS c (tenant_id, queue, kind, minute, succeeded)
    SELECT tenant_id, queue, kind, date_trunc('minute', now()), 1 FROM done
    ON CONFLICT (tenant_id, queue, kind, minute)
    DO UPDATE SET succeeded = c.succeeded + excluded.succeeded
)
SELECT count(*) FROM done

-- name: requeue_many
-- Retry (an attempt used, error recorded) or snooze (attempt refunded, no error).
WITH r AS (
    SELECT (SELECT j.ctid FROM tenantry.jobs j
             WHERE j.tenant_id = r.tenant_id AND j.id = r.id
               AND j.lease_owner = $7::text) AS tid,
           r.run_at, r.error, r.error_obj, r.refund
      FROM unnest($1::uuid[], $2::bigint[], $3::timestamptz[], $4::text[],
                  $5::jsonb[], $6::boolean[])
           AS r(tenant_id, id, run_at, error, error_obj, refund)
), moved AS (
    UPDATE tenantry.jobs j
       SET state = 'queued',
           run_at = r.run_at,
           attempts = CASE WHEN r.refund THEN greatest(j.attempts - 1, 0) ELSE j.attempts END,
           last_error = coalesce(r.error, j.last_error),
           errors = CASE WHEN r.error_obj IS NULL THEN j.errors
                         ELSE j.errors || jsonb_build_array(r.error_obj) END,
           lease_owner = NULL,
           lease_expires_at = NULL,
           started_at = NULL
      FROM r
     WHERE j.ctid = ANY (ARRAY(SELECT r.tid FROM r)) AND j.ctid = r.tid
    RETURNING j.tenant_id, j.queue, j.kind, r.error IS NOT NULL AS failed
)
INSERT INTO tenantry.job_counters AS c (tenant_id, queue, kind, minute, failed)
SELECT tenant_id, queue, kind, date_trunc('minute', now()), count(*)
  FROM moved
 WHERE failed
 GROUP BY tenant_id, queue, kind
 ORDER BY tenant_id, queue, kind
ON CONFLICT (tenant_id, queue, kind, minute)
DO UPDATE SET failed = c.failed + excluded.failed

-- name: bury_many
-- Dead-letter: move the rows, with every error, to dead_jobs.
WITH d AS (
    SELECT (SELECT j.ctid FROM tenantry.jobs j
             WHERE j.tenant_id = d.tenant_id AND j.id = d.id
               AND j.lease_owner = $6::text) AS tid,
           d.error, d.error_obj, d.reason
      FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::jsonb[], $5::text[])
           AS d(tenant_id, id, error, error_obj, reason)
), gone AS (
    DELETE FROM tenantry.jobs j
     USING d
     WHERE j.ctid = ANY (ARRAY(SELECT d.tid FROM d)) AND j.ctid = d.tid
    RETURNING j.tenant_id, j.id, j.queue, j.kind, j.payload, j.priority, j.attempts,
              j.max_attempts, j.dedup_key, j.created_at, j.errors, d.error, d.error_obj, d.reason
), buried AS (
    INSERT INTO tenantry.dead_jobs
           (tenant_id, id, queue, kind, payload, priority, attempts, max_attempts,
            last_error, errors, dedup_key, reason, created_at)
    SELECT tenant_id, id, queue, kind, payload, priority, attempts, max_attempts,
           error, errors || jsonb_build_array(error_obj), dedup_key, reason, created_at
      FROM gone
)
INSERT INTO tenantry.job_counters AS c (tenant_id, queue, kind, minute, failed, dead)
SELECT tenant_id, queue, kind, date_trunc('minute', now()), count(*), count(*)
  FROM gone
 GROUP BY tenant_id, queue, kind
 ORDER BY tenant_id, queue, kind
ON CONFLICT (tenant_id, queue, kind, minute)
DO UPDATE SET failed = c.failed + excluded.failed, dead = c.dead + excluded.dead

-- name: release_many
-- Shutdown: hand unfinished jobs back at once, the interrupted attempt refunded.
WITH mine AS (
    SELECT (SELECT j.ctid FROM tenantry.jobs j
             WHERE j.tenant_id = d.tenant_id AND j.id = d.id
               AND j.lease_owner = $3::text) AS tid
      FROM unnest($1::uuid[], $2::bigint[]) AS d(tenant_id, id)
)
UPDATE tenantry.jobs j
   SET state = 'queued', run_at = now(), attempts = greatest(j.attempts - 1, 0),
       lease_owner = NULL, lease_expires_at = NULL, started_at = NULL
 WHERE j.ctid = ANY (ARRAY(SELECT m.tid FROM mine m))

-- name: extend_leases
-- Heartbeat: returns the jobs whose lease this worker still holds.
WITH mine AS (
    SELECT (SELECT j.ctid FROM tenantry.jobs j
             WHERE j.tenant_id = d.tenant_id AND j.id = d.id
               AND j.lease_owner = $3::text) AS tid
      FROM unnest($1::uuid[], $2::bigint[]) AS d(tenant_id, id)
)
UPDATE tenantry.jobs j
   SET lease_expires_at = now() + make_interval(secs => $4::double precision)
 WHERE j.ctid = ANY (ARRAY(SELECT m.tid FROM mine m))
RETURNING j.tenant_id, j.id

-- name: rescue_expired
-- A running job whose lease expired lost its worker: requeue it now; the lost attempt
-- counts (the claim already counted it) and is recorded as an error.  A job that has
-- used all its attempts is dead-lettered by the worker that claims it next.
WITH expired AS (
    SELECT j.tenant_id, j.id
      FROM tenantry.jobs j
     WHERE j.state = 'running' AND j.lease_expires_at < now()
     ORDER BY j.lease_expires_at
     LIMIT $1::integer
       FOR UPDATE SKIP LOCKED
)
UPDATE tenantry.jobs j
   SET state = 'queued',
       run_at = now(),
       last_error = 'lease expired: worker ' || j.lease_owner || ' stopped heartbeating',
       errors = j.errors || jsonb_build_array(jsonb_build_object(
           'attempt', j.attempts, 'at', now(), 'worker', j.lease_owner,
           'error', 'lease expired: worker stopped heartbeating')),
       lease_owner = NULL,
       lease_expires_at = NULL,
       started_at = NULL
  FROM expired e
 WHERE j.tenant_id = e.tenant_id AND j.id = e.id
RETURNING j.tenant_id, j.id, j.queue, j.kind, j.attempts

-- name: prune_counters
DELETE FROM tenantry.job_counters WHERE minute < now() - make_interval(days => $1::integer)

-- name: advance_periodic
-- Compare-and-set on the period: exactly one process wins each period.
INSERT INTO tenantry.periodic_runs AS p (name, last_period)
VALUES ($1::text, $2::timestamptz)
ON CONFLICT (name) DO UPDATE
   SET last_period = excluded.last_period, updated_at = now()
 WHERE p.last_period < excluded.last_period
RETURNING p.name

-- name: stats
WITH live AS (
    SELECT j.queue,
           count(*) FILTER (WHERE j.state = 'queued' AND j.run_at <= now()) AS available,
           count(*) FILTER (WHERE j.state = 'queued' AND j.run_at > now()) AS scheduled,
           count(*) FILTER (WHERE j.state = 'running') AS running,
           count(*) FILTER (WHERE j.state = 'queued' AND j.attempts > 0) AS retrying,
           extract(epoch FROM now() - min(j.run_at)
                   FILTER (WHERE j.state = 'queued' AND j.run_at <= now()))::float8
               AS oldest_age_s
      FROM tenantry.jobs j
     GROUP BY j.queue
), recent AS (
    SELECT c.queue,
           sum(c.succeeded)::bigint AS succeeded_1h,
           sum(c.failed)::bigint AS failed_1h
      FROM tenantry.job_counters c
     WHERE c.minute >= now() - interval '1 hour'
     GROUP BY c.queue
), dead AS (
    SELECT d.queue, count(*) AS dead FROM tenantry.dead_jobs d GROUP BY d.queue
)
SELECT q.queue,
       coalesce(l.available, 0) AS available,
       coalesce(l.scheduled, 0) AS scheduled,
       coalesce(l.running, 0) AS running,
       coalesce(l.retrying, 0) AS retrying,
       coalesce(l.oldest_age_s, 0) AS oldest_age_s,
       coalesce(r.succeeded_1h, 0) AS succeeded_1h,
       coalesce(r.failed_1h, 0) AS failed_1h,
       coalesce(d.dead, 0) AS dead
  FROM (SELECT queue FROM live UNION SELECT queue FROM recent UNION SELECT queue FROM dead) q
  LEFT JOIN live l USING (queue)
  LEFT JOIN recent r USING (queue)
  LEFT JOIN dead d USING (queue)
 ORDER BY q.queue

-- name: dead_list
SELECT d.tenant_id, d.id, d.queue, d.kind, d.attempts, d.reason, d.last_error, d.died_at
  FROM tenantry.dead_jobs d
 ORDER BY d.died_at DESC, d.id DESC
 LIMIT $1::integer

-- name: dead_show
SELECT d.tenant_id, d.id, d.queue, d.kind, d.payload, d.priority, d.attempts,
       d.max_attempts, d.last_error, d.errors, d.dedup_key, d.reason, d.created_at, d.died_at
  FROM tenantry.dead_jobs d
 WHERE d.id = $1::bigint

-- name: dead_retry
-- Back to the queue with fresh attempts; the error history stays with the row.
WITH gone AS (
    DELETE FROM tenantry.dead_jobs d WHERE d.id = $1::bigint
    RETURNING d.*
)
INSERT INTO tenantry.jobs (tenant_id, id, queue, kind, payload, priority, max_attempts,
                           errors, dedup_key, created_at)
SELECT tenant_id, id, queue, kind, payload, priority, max_attempts, errors, dedup_key,
       created_at
  FROM gone
RETURNING id

-- name: dead_discard
DELETE FROM tenantry.dead_jobs d WHERE d.id = $1::bigint RETURNING d.id
