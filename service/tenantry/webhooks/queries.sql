-- Named statements of the webhooks module, the only writer of the webhook_* tables.
-- The tenant's statements run in its context (row-level security); the cross-tenant
-- ones call the functions in functions.sql beside this file.

-- Registrations of one tenant take turns (until their transactions end), so that the
-- count below and the insert after it cannot interleave past the limit.
-- name: lock_tenant_endpoints
SELECT pg_advisory_xact_lock(hashtextextended('tenantry.webhook_endpoints:' || $1::uuid, 0))

-- name: count_endpoints
SELECT count(*) FROM tenantry.webhook_endpoints WHERE tenant_id = $1::uuid

-- name: insert_endpoint
INSERT INTO tenantry.webhook_endpoints
       (tenant_id, id, url, description, event_types, headers, rate_limit,
        timeout_seconds, retry_schedule, secret)
VALUES ($1::uuid, $2::uuid, $3::text, $4::text, $5::text[], $6::jsonb, $7::integer,
        $8::integer, $9::integer[], $10::bytea)
RETURNING *

-- name: list_endpoints
SELECT * FROM tenantry.webhook_endpoints
 WHERE tenant_id = $1::uuid
 ORDER BY created_at, id
 LIMIT $2::integer

-- name: get_endpoint
SELECT * FROM tenantry.webhook_endpoints WHERE tenant_id = $1::uuid AND id = $2::uuid

-- The endpoint's last $3 circuit and disabling events, newest first (the outbox's
-- aggregate index, read backwards: a month of a flapping circuit costs no more).
-- name: endpoint_history
SELECT o.event_type, o.payload, o.created_at
  FROM tenantry.outbox o
 WHERE o.tenant_id = $1::uuid AND o.aggregate_type = 'webhook_endpoint'
   AND o.aggregate_id = $2::text AND starts_with(o.event_type, 'webhook.endpoint.')
 ORDER BY o.version DESC
 LIMIT $3::integer

-- name: lock_endpoint
SELECT * FROM tenantry.webhook_endpoints
 WHERE tenant_id = $1::uuid AND id = $2::uuid
   FOR UPDATE

-- Re-enabling clears the reason and starts the endpoint afresh (a closed circuit, no
-- failure streak), as a tenant who fixed their receiver expects.
-- name: update_endpoint
UPDATE tenantry.webhook_endpoints e
   SET url = $3::text, description = $4::text, event_types = $5::text[],
       headers = $6::jsonb, rate_limit = $7::integer, timeout_seconds = $8::integer,
       retry_schedule = $9::integer[],
       enabled = $10::boolean,
       disabled_reason = CASE WHEN $10::boolean THEN NULL
                              WHEN e.enabled THEN $11::text ELSE e.disabled_reason END,
       disabled_at = CASE WHEN $10::boolean THEN NULL
                          WHEN e.enabled THEN now() ELSE e.disabled_at END,
       circuit_state = CASE WHEN $10::boolean AND NOT e.enabled THEN 'closed'
                            ELSE e.circuit_state END,
       circuit_failures = CASE WHEN $10::boolean AND NOT e.enabled THEN 0
                               ELSE e.circuit_failures END,
       circuit_retry_at = CASE WHEN $10::boolean AND NOT e.enabled THEN NULL
                               ELSE e.circuit_retry_at END,
       failing_since = CASE WHEN $10::boolean AND NOT e.enabled THEN NULL
                            ELSE e.failing_since END,
       rate_tokens = NULL, rate_refilled_at = NULL,
       updated_at = now()
 WHERE e.tenant_id = $1::uuid AND e.id = $2::uuid
RETURNING *

-- name: rotate_secret
UPDATE tenantry.webhook_endpoints e
   SET previous_secret = e.secret,
       previous_secret_until = now() + make_interval(secs => $4::float8),
       secret = $3::bytea, updated_at = now()
 WHERE e.tenant_id = $1::uuid AND e.id = $2::uuid
RETURNING *

-- name: delete_endpoint
DELETE FROM tenantry.webhook_endpoints WHERE tenant_id = $1::uuid AND id = $2::uuid
RETURNING id

-- Deliveries of a deleted endpoint that were still waiting: cancelled, with the reason
-- (one already being sent finishes and records its attempt).
-- name: cancel_endpoint_deliveries
UPDATE tenantry.webhook_deliveries
   SET state = 'cancelled', reason = 'endpoint_deleted', finished_at = now(), updated_at = now()
 WHERE tenant_id = $1::uuid AND endpoint_id = $2::uuid AND state = 'pending'

-- The test event's delivery, made with the event (the fan-out then finds it made).
-- name: insert_test_delivery
INSERT INTO tenantry.webhook_deliveries (tenant_id, endpoint_id, event_id, event_type, body)
SELECT o.tenant_id, $2::uuid, o.id, o.event_type,
       tenantry.webhook_body(o.event_type, o.payload, o.created_at)
  FROM tenantry.outbox o
 WHERE o.tenant_id = $1::uuid AND o.id = $3::bigint
RETURNING id

-- name: wake_deliverers
SELECT pg_notify('tenantry_webhooks', 'deliveries')

-- The tenant's deliveries, newest first, a page after the keyset ($2, $3).
-- name: list_deliveries
SELECT d.id, d.endpoint_id, d.event_id, d.event_type, d.state, d.attempts,
       d.next_attempt_at, d.last_status, d.last_error, d.reason, d.created_at,
       d.updated_at, d.finished_at
  FROM tenantry.webhook_deliveries d
 WHERE d.tenant_id = $1::uuid
   AND (d.created_at, d.id) < ($2::timestamptz, $3::uuid)
   AND ($4::uuid IS NULL OR d.endpoint_id = $4::uuid)
   AND ($5::text IS NULL OR d.event_type = $5::text)
   AND ($6::text IS NULL OR d.state = $6::text)
   AND ($7::timestamptz IS NULL OR d.created_at >= $7::timestamptz)
 ORDER BY d.created_at DESC, d.id DESC
 LIMIT $8::integer

-- name: get_delivery
SELECT d.* FROM tenantry.webhook_deliveries d WHERE d.tenant_id = $1::uuid AND d.id = $2::uuid

-- name: delivery_attempts
SELECT a.* FROM tenantry.webhook_attempts a
 WHERE a.tenant_id = $1::uuid AND a.delivery_id = $2::uuid
 ORDER BY a.id

-- A replay sends a finished delivery again, with a fresh schedule and the same
-- webhook-id (receivers deduplicate by it; Svix resends the same way).
-- name: replay_delivery
UPDATE tenantry.webhook_deliveries d
   SET state = 'pending', attempts = 0, next_attempt_at = now(), reason = NULL,
       finished_at = NULL, updated_at = now()
 WHERE d.tenant_id = $1::uuid AND d.id = $2::uuid
   AND d.state IN ('delivered', 'dead', 'cancelled')
   AND EXISTS (SELECT 1 FROM tenantry.webhook_endpoints e
                WHERE e.tenant_id = d.tenant_id AND e.id = d.endpoint_id)
RETURNING d.id

-- Svix's recover: every failed delivery of the endpoint in the window is sent again
-- now: dead ones with a fresh schedule, those still retrying at once.
-- name: recover_deliveries
UPDATE tenantry.webhook_deliveries d
   SET state = 'pending',
       attempts = CASE WHEN d.state = 'dead' THEN 0 ELSE d.attempts END,
       next_attempt_at = now(), reason = NULL, finished_at = NULL, updated_at = now()
 WHERE d.tenant_id = $1::uuid AND d.endpoint_id = $2::uuid
   AND d.created_at >= $3::timestamptz
   AND ($4::timestamptz IS NULL OR d.created_at < $4::timestamptz)
   AND (d.state = 'dead' OR (d.state = 'pending' AND d.attempts > 0))

-- The worker's statements (cross-tenant functions).

-- name: fan_out
SELECT events, deliveries FROM tenantry.webhook_fan_out()

-- name: fanout_lag
SELECT events, oldest FROM tenantry.webhook_fanout_lag($1::integer)

-- name: claim
SELECT * FROM tenantry.webhook_claim($1::text, $2::integer, $3::uuid, $4::integer,
                                     $5::integer, $6::integer, $7::integer)

-- name: record
SELECT tenantry.webhook_record_leaving_held($1::text, $2::jsonb, $3::jsonb)

-- name: record_and_claim
SELECT * FROM tenantry.webhook_record_leaving_held_and_claim(
    $1::text, $2::jsonb, $3::jsonb, $4::integer, $5::uuid, $6::integer, $7::integer,
    $8::integer, $9::integer)

-- name: rescue
SELECT tenantry.webhook_rescue($1::integer, $2::integer)

-- name: prune
SELECT tenantry.webhook_prune($1::integer, $2::integer)

-- The operator's statements (cross-tenant functions).

-- name: ops_deliveries
SELECT * FROM tenantry.webhook_ops_deliveries($1::text, $2::uuid, $3::uuid, $4::text,
                                              $5::integer)

-- name: ops_delivery
SELECT tenantry.webhook_ops_delivery($1::uuid)

-- name: ops_act
SELECT tenantry.webhook_ops_act($1::text, $2::uuid, $3::text, $4::uuid, $5::uuid, $6::text,
                                $7::boolean)

-- name: ops_endpoints
SELECT * FROM tenantry.webhook_ops_endpoints($1::uuid, $2::integer)

-- name: ops_stats
SELECT * FROM tenantry.webhook_ops_stats()
