-- Named statements of the jobs module, the only writer of tenantry.jobs,
-- tenantry.dead_jobs, tenantry.job_counters and tenantry.periodic_runs.
--
-- Tenant-scoped statements (enqueue, complete_one) run inside a tenant transaction,
-- under row-level security.  The cross-tenant ones (claim, the worker's batch
-- statements, rescue, statistics, the dead-letter commands) call SECURITY DEFINER
-- functions of schema/0002_tenancy.sql, where their SQL and its reasoning live.

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
SELECT * FROM tenantry.claim_jobs($1::text, $2::integer, $3::text, $4::double precision,
                                  $5::uuid, $6::integer, $7::integer)

-- name: next_due
SELECT due, db_now FROM tenantry.next_due_job($1::text[])

-- name: complete_many
SELECT tenantry.complete_jobs($1::uuid[], $2::bigint[], $3::text)

-- name: complete_one
-- Success for one job, inside the handler's own tenant transaction (exactly-once
-- effects): the tenant's rows only, under row-level security.
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
SELECT tenantry.requeue_jobs($1::uuid[], $2::bigint[], $3::timestamptz[], $4::text[],
                             $5::jsonb[], $6::boolean[], $7::text)

-- name: bury_many
SELECT tenantry.bury_jobs($1::uuid[], $2::bigint[], $3::text[], $4::jsonb[], $5::text[],
                          $6::text)

-- name: release_many
SELECT tenantry.release_jobs($1::uuid[], $2::bigint[], $3::text)

-- name: extend_leases
SELECT tenant_id, id
  FROM tenantry.extend_job_leases($1::uuid[], $2::bigint[], $3::text, $4::double precision)

-- name: rescue_expired
SELECT tenant_id, id, queue, kind, attempts FROM tenantry.rescue_expired_jobs($1::integer)

-- name: prune_counters
SELECT tenantry.prune_job_counters($1::integer)

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

-- name: dead_list
SELECT * FROM tenantry.dead_jobs_list($1::integer)

-- name: dead_show
SELECT * FROM tenantry.dead_job_show($1::bigint)

-- name: dead_retry
SELECT tenantry.dead_job_retry($1::bigint)

-- name: dead_discard
SELECT tenantry.dead_job_discard($1::bigint)
