-- Named statements of the onboarding state machine, the only writer of
-- tenantry.onboardings and tenantry.onboarding_steps.  Every one runs in the
-- onboarding's tenant transaction (the accept's function opens its own context).

-- Accept: the idempotency key, the onboarding, its first event and the provisioning
-- job, in one call (tenantry.accept_onboarding in functions.sql): sent alone, it is its
-- own transaction and the accept's one round trip.
-- name: accept
SELECT a.outcome, a.tenant_id, a.onboarding_id, a.created_at
  FROM tenantry.accept_onboarding($1::uuid, $2::uuid, $3::text, $4::text, $5::text,
                                  $6::bytea, $7::bytea, $8::jsonb, $9::jsonb, $10::text) a

-- name: get
SELECT o.tenant_id, o.id, o.email, o.tenant_name, o.plan, o.state, o.version,
       o.failure_reason, o.created_at, o.updated_at
  FROM tenantry.onboardings o
 WHERE o.tenant_id = $1::uuid AND o.id = $2::uuid

-- name: steps
SELECT s.step, s.done_at
  FROM tenantry.onboarding_steps s
 WHERE s.tenant_id = $1::uuid AND s.onboarding_id = $2::uuid
 ORDER BY s.done_at, s.step

-- Lock the aggregate for one step, then read the ledger (tenantry.onboarding_lock in
-- functions.sql: the ledger must be read after the lock is granted): whoever else runs
-- this onboarding (a rescued job still finishing, say) waits here and then sees the
-- step done.
-- name: lock
SELECT l.state, l.version, l.email, l.tenant_name, l.plan, l.done
  FROM tenantry.onboarding_lock($1::uuid, $2::uuid) l

-- A step done, in one round trip: its ledger row (the time of recording, not the
-- transaction's start: the steps of a group share one transaction, provision.py, and
-- the ledger lists them by this time), the onboarding's next version and state, and
-- its event ($7: the payload but `done_at`, added here in the events' time format,
-- timefmt.py).  No row when the version moved on (the caller raises Conflict; its
-- transaction rolls back the ledger row with it).
-- name: step_done
WITH step AS (
    INSERT INTO tenantry.onboarding_steps (tenant_id, onboarding_id, step, done_at)
    VALUES ($1::uuid, $2::uuid, $3::text, clock_timestamp())
    RETURNING done_at
), moved AS (
    UPDATE tenantry.onboardings o
       SET state = $5::text, version = $4::integer + 1, failure_reason = NULL,
           updated_at = now()
     WHERE o.tenant_id = $1::uuid AND o.id = $2::uuid AND o.version = $4::integer
    RETURNING o.version
)
SELECT m.version,
       tenantry.emit($1::uuid, 'onboarding', $2::text, $6::text,
                     $7::jsonb || jsonb_build_object(
                         'done_at',
                         to_char(s.done_at AT TIME ZONE 'UTC',
                                 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
                     m.version) AS event_id
  FROM step s CROSS JOIN moved m

-- name: transition
UPDATE tenantry.onboardings o
   SET state = $4::text, version = $3::integer + 1, failure_reason = $5::text,
       updated_at = now()
 WHERE o.tenant_id = $1::uuid AND o.id = $2::uuid AND o.version = $3::integer
RETURNING o.version

-- name: prune_keys
SELECT tenantry.prune_idempotency_keys($1::integer, $2::integer)

-- name: of_tenant
-- A tenant's onboardings, newest first (the operators' dashboard, in the tenant's
-- context).
SELECT o.id
  FROM tenantry.onboardings o
 WHERE o.tenant_id = $1::uuid
 ORDER BY o.created_at DESC, o.id
 LIMIT $2::integer
