-- Named statements of the jobs module, the only writer of tenantry.jobs,
-- tenantry.dead_jobs, tenantry.job_counters, tenantry.periodic_runs and
-- tenantry.notify_throttle.
--
-- Tenant-scoped statements (enqueue, complete_one) run inside a tenant transaction,
-- under row-level security.  The cross-tenant ones (claim, outcomes, rescue,
-- statistics, the dead-letter commands) call the functions of functions.sql (beside
-- this file), where their SQL and its reasoning live.

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
-- Rows claimed, then one row with NULL job columns carrying cursor_after, more and capped.
SELECT tenant_id, id, queue, kind, payload, priority, attempts, max_attempts, created_at,
       unknown_kind_since, cursor_after, more, capped
  FROM tenantry.claim_jobs($1::text, $2::integer, $3::text, $4::double precision, $5::uuid,
                           $6::integer)

-- name: next_due
-- With the queue's controls (NULL: none set), read at the same poll.
SELECT n.due, n.db_now, c.paused, c.concurrency
  FROM tenantry.next_due_job($1::text) n
  LEFT JOIN tenantry.queue_controls_of(ARRAY[$1::text]) c ON true

-- name: ensure_wake_keys
SELECT tenantry.ensure_wake_keys($1::text[])

-- name: claim_rearming
-- The claim a NOTIFY prompted, re-arming the queue's wake-up throttle in the same
-- transaction (tenantry.rearm_wake: it gives up on a table lock after 10 ms, and the
-- worker then claims without it), one round trip instead of two.  The re-arm comes
-- FIRST: the claim takes the queue from the re-arm's row (LATERAL), so claim_jobs runs
-- after rearm_wake has re-armed the row and tried the gate, and each of its statements
-- takes a snapshot of its own (a volatile PL/pgSQL function under READ COMMITTED), later
-- than that try.  A producer that stayed quiet before the try is visible to the claim
-- when the gate was free (its commit was visible before it let go of the gate), or
-- waited for when not; one deciding while this transaction holds the gate notifies;
-- one deciding after the commit sees the row re-armed.  (Re-armed after the claim's
-- statements, a quiet commit that became visible between the claim's snapshot and the
-- re-arm's try was neither claimed nor waited for.)  gate_free, on the state row: false
-- when a producer that stayed quiet was still committing (the worker waits for it:
-- await_quiet_wakes).
WITH rearmed AS MATERIALIZED (
    SELECT $1::text AS queue, tenantry.rearm_wake($1::text) AS gate_free
)
SELECT c.tenant_id, c.id, c.queue, c.kind, c.payload, c.priority, c.attempts,
       c.max_attempts, c.created_at, c.unknown_kind_since, c.cursor_after, c.more,
       c.capped, CASE WHEN c.id IS NULL THEN r.gate_free END AS gate_free
  FROM rearmed r
 CROSS JOIN LATERAL tenantry.claim_jobs(r.queue, $2::integer, $3::text,
                                        $4::double precision, $5::uuid, $6::integer) c

-- name: await_quiet_wakes
-- Until the producers that stayed quiet behind the throttle's gate have committed, up
-- to $2 ms (false: the wait ran out).
SELECT tenantry.await_quiet_wakes($1::text, $2::integer)

-- name: record_outcomes
SELECT tenantry.record_job_outcomes(
    $1::text,
    $2::uuid[], $3::bigint[],
    $4::uuid[], $5::bigint[], $6::timestamptz[], $7::text[], $8::jsonb[], $9::boolean[],
    $10::boolean[],
    $11::uuid[], $12::bigint[], $13::text[], $14::jsonb[], $15::text[], $16::text[],
    $17::boolean[],
    $18::uuid[], $19::bigint[])

-- name: complete_one
-- Success for one job, inside the handler's own tenant transaction (exactly-once
-- effects): tenantry.complete_job in functions.sql.
SELECT CASE WHEN tenantry.complete_job($1::uuid, $2::bigint, $3::text) THEN 1 ELSE 0 END

-- name: extend_leases
SELECT tenant_id, id
  FROM tenantry.extend_job_leases($1::uuid[], $2::bigint[], $3::text, $4::double precision)

-- name: rescue_expired
SELECT tenant_id, id, queue, kind, attempts FROM tenantry.rescue_expired_jobs($1::integer)

-- name: prune_counters
SELECT tenantry.prune_job_counters($1::integer)

-- name: periodic_known
SELECT EXISTS (SELECT 1 FROM tenantry.periodic_runs WHERE name = $1::text)

-- name: advance_periodic
-- Compare-and-set on the period: exactly one process wins each period.
INSERT INTO tenantry.periodic_runs AS p (name, last_period)
VALUES ($1::text, $2::timestamptz)
ON CONFLICT (name) DO UPDATE
   SET last_period = excluded.last_period, updated_at = now()
 WHERE p.last_period < excluded.last_period
RETURNING p.name

-- name: stats
SELECT * FROM tenantry.queue_stats()

-- name: jobs_list
SELECT * FROM tenantry.jobs_list($1::integer, $2::text, $3::text, $4::uuid, $5::text)

-- name: job_show
SELECT * FROM tenantry.job_show($1::bigint, $2::uuid)

-- name: dead_count
SELECT tenantry.dead_jobs_count($1::text, $2::uuid, $3::text)

-- name: dead_retry_matching
SELECT tenantry.dead_jobs_retry($1::text, $2::uuid, $3::text)

-- name: dead_discard_matching
SELECT tenantry.dead_jobs_discard($1::text, $2::uuid, $3::text)

-- name: dead_show
-- The payload as text: an operator must see even one no decoder takes.
SELECT d.tenant_id, d.id, d.queue, d.kind, d.payload::text AS payload, d.priority,
       d.attempts, d.max_attempts, d.last_error, d.errors, d.dedup_key, d.reason,
       d.created_at, d.died_at
  FROM tenantry.dead_job_show($1::bigint, $2::uuid) d

-- name: dead_retry
SELECT tenantry.dead_job_retry($1::bigint, $2::uuid)

-- name: dead_discard
SELECT tenantry.dead_job_discard($1::bigint, $2::uuid)

-- name: queue_controls_of
SELECT queue, paused, concurrency FROM tenantry.queue_controls_of($1::text[])

-- name: queue_controls_list
SELECT queue, paused, concurrency, updated_at, updated_by FROM tenantry.queue_controls_list()

-- name: set_queue_control
SELECT queue, paused, concurrency, updated_at, updated_by
  FROM tenantry.set_queue_control($1::text, $2::boolean, $3::integer, $4::boolean, $5::text)

-- name: jobs_search
SELECT * FROM tenantry.jobs_search($1::text, $2::text, $3::text, $4::uuid, $5::bigint,
                                   $6::jsonb, $7::uuid, $8::bigint, $9::integer, $10::integer)

-- name: dead_page
SELECT * FROM tenantry.dead_jobs_page($1::text, $2::uuid, $3::text, $4::timestamptz,
                                      $5::bigint, $6::integer)

-- name: throughput
SELECT queue, bucket, succeeded, failed, dead
  FROM tenantry.queue_throughput($1::integer, $2::integer)

-- name: periodic_runs
SELECT name, last_period, updated_at FROM tenantry.periodic_runs_list()
