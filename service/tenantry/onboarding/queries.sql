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

-- A group of provisioning steps, in one call (tenantry.onboarding_run_steps in
-- functions.sql): sent alone, it is its own transaction and the group's one round trip.
-- name: run_steps
SELECT r.state, r.version, r.email, r.tenant_name, r.plan, r.done, r.ran
  FROM tenantry.onboarding_run_steps($1::uuid, $2::uuid, $3::text[], $4::text[], $5::text[],
                                     $6::uuid, $7::text[], $8::text[], $9::uuid, $10::text,
                                     $11::bigint, $12::text, $13::jsonb) r

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
