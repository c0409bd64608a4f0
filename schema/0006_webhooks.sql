-- 0006: webhooks.  A tenant's endpoints, one delivery per (event, endpoint) fanned out
-- from the outbox, every attempt with its request and response, and the follower's
-- stored position in the outbox.  The functions live in the repeatable
-- tenantry/webhooks/functions.sql; the webhooks module is the only writer of these
-- tables.

CREATE TABLE tenantry.webhook_endpoints (
    tenant_id        uuid        NOT NULL REFERENCES tenantry.tenants (id) ON DELETE CASCADE,
    id               uuid        NOT NULL DEFAULT gen_random_uuid(),
    url              text        NOT NULL,
    description      text        NOT NULL DEFAULT '',
    -- Exact event types and prefixes (`invoice.*`); empty: every event.
    event_types      text[]      NOT NULL DEFAULT '{}',
    -- Extra request headers, name -> value.
    headers          jsonb       NOT NULL DEFAULT '{}',
    -- Deliveries per second at most; NULL: no limit.
    rate_limit       integer,
    -- Per-endpoint overrides of the service's defaults; NULL: the default.
    timeout_seconds  integer,
    retry_schedule   integer[],
    -- The signing secret, encrypted (AES-GCM under TENANTRY_SECRET_KEY, bound to the
    -- endpoint: tenantry/webhooks/secrets.py), and the one it replaced, which keeps
    -- signing beside it until `previous_secret_until`.
    secret           bytea       NOT NULL,
    previous_secret  bytea,
    previous_secret_until timestamptz,
    enabled          boolean     NOT NULL DEFAULT true,
    disabled_reason  text,
    disabled_at      timestamptz,
    -- The circuit breaker: closed (deliver), open (park the endpoint's deliveries until
    -- circuit_retry_at), half_open (one probe in flight).
    circuit_state    text        NOT NULL DEFAULT 'closed',
    circuit_failures integer     NOT NULL DEFAULT 0,  -- consecutive failed attempts
    circuit_opened_at timestamptz,
    circuit_retry_at timestamptz,
    -- The failure ratio's window: attempts and failures since window_started_at.
    window_started_at timestamptz NOT NULL DEFAULT now(),
    window_attempts  integer     NOT NULL DEFAULT 0,
    window_failures  integer     NOT NULL DEFAULT 0,
    last_success_at  timestamptz,
    -- The first failure after the last success (auto-disable counts from it).
    failing_since    timestamptz,
    -- The rate limit's token bucket.
    rate_tokens      double precision,
    rate_refilled_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT webhook_endpoints_url CHECK (url ~ '^https?://' AND length(url) <= 2000),
    CONSTRAINT webhook_endpoints_description CHECK (length(description) <= 500),
    CONSTRAINT webhook_endpoints_event_types CHECK (cardinality(event_types) <= 100),
    CONSTRAINT webhook_endpoints_headers CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT webhook_endpoints_rate_limit CHECK (rate_limit BETWEEN 1 AND 10000),
    CONSTRAINT webhook_endpoints_timeout CHECK (timeout_seconds BETWEEN 1 AND 60),
    CONSTRAINT webhook_endpoints_schedule CHECK (cardinality(retry_schedule) BETWEEN 1 AND 30),
    CONSTRAINT webhook_endpoints_circuit
        CHECK (circuit_state IN ('closed', 'open', 'half_open'))
);
-- The claim walks the enabled endpoints.
CREATE INDEX webhook_endpoints_enabled_idx ON tenantry.webhook_endpoints (tenant_id, id)
    WHERE enabled;

CREATE TABLE tenantry.webhook_deliveries (
    tenant_id       uuid        NOT NULL,
    -- Sent as `webhook-id` (msg_<hex>) on every attempt, so receivers can deduplicate.
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    -- No foreign key: a delivery outlives its endpoint (cancelled, with the reason)
    -- and its event (the outbox keeps events for a retention period).
    endpoint_id     uuid        NOT NULL,
    event_id        bigint      NOT NULL,
    event_type      text        NOT NULL,
    -- The body as signed and sent, the same bytes on every attempt.
    body            text        NOT NULL,
    -- pending (due at next_attempt_at), sending (leased to a process until
    -- lease_until), delivered, dead (retries exhausted or aborted: the dead letters),
    -- cancelled (its endpoint was deleted, or an operator discarded it).
    state           text        NOT NULL DEFAULT 'pending',
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    lease_owner     text,
    last_status     integer,
    last_error      text,
    reason          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT webhook_deliveries_state
        CHECK (state IN ('pending', 'sending', 'delivered', 'dead', 'cancelled'))
);
-- Exactly once per (event, endpoint), however many followers run and whatever crashes.
CREATE UNIQUE INDEX webhook_deliveries_event_endpoint_key
    ON tenantry.webhook_deliveries (tenant_id, event_id, endpoint_id);
-- The claim: an endpoint's due deliveries, oldest first.
CREATE INDEX webhook_deliveries_due_idx
    ON tenantry.webhook_deliveries (tenant_id, endpoint_id, next_attempt_at)
    WHERE state = 'pending';
-- In flight: the per-endpoint limit, and the rescue of expired leases.
CREATE INDEX webhook_deliveries_sending_idx
    ON tenantry.webhook_deliveries (lease_until) WHERE state = 'sending';
-- The tenant's listing (keyset, newest first) and an endpoint's.
CREATE INDEX webhook_deliveries_created_idx
    ON tenantry.webhook_deliveries (tenant_id, created_at, id);
CREATE INDEX webhook_deliveries_endpoint_created_idx
    ON tenantry.webhook_deliveries (tenant_id, endpoint_id, created_at, id);
-- Operators' dead letters, and retention of finished rows.
CREATE INDEX webhook_deliveries_dead_idx ON tenantry.webhook_deliveries (updated_at)
    WHERE state = 'dead';
CREATE INDEX webhook_deliveries_finished_idx ON tenantry.webhook_deliveries (finished_at)
    WHERE state IN ('delivered', 'cancelled');

CREATE TABLE tenantry.webhook_attempts (
    tenant_id        uuid        NOT NULL,
    id               bigint      GENERATED ALWAYS AS IDENTITY,
    delivery_id      uuid        NOT NULL,
    endpoint_id      uuid        NOT NULL,
    attempt          integer     NOT NULL,
    attempted_at     timestamptz NOT NULL,
    url              text        NOT NULL,
    -- delivered, failed (retried), gone (410: the endpoint was disabled), aborted
    -- (the endpoint asked not to retry), refused (the address is not allowed),
    -- interrupted (the sending process stopped mid-attempt).
    result           text        NOT NULL,
    request_headers  jsonb       NOT NULL,
    request_body     text        NOT NULL,
    response_status  integer,
    response_headers jsonb,
    response_body    text,
    duration_ms      double precision NOT NULL,
    -- Without a response: timeout, dns, connect, tls, reset, refused, interrupted.
    error_class      text,
    error            text,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX webhook_attempts_delivery_idx
    ON tenantry.webhook_attempts (tenant_id, delivery_id, id);
CREATE INDEX webhook_attempts_time_idx ON tenantry.webhook_attempts (attempted_at);

-- The fan-out's position in the outbox: the snapshot of its last read (see
-- tenantry.webhook_fan_out).  One row; a follower holds its lock while it fans out.
CREATE TABLE tenantry.webhook_fanout_position (
    one        boolean     PRIMARY KEY DEFAULT true CHECK (one),
    snapshot   pg_snapshot NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- Events committed before this migration had no endpoint to go to.
INSERT INTO tenantry.webhook_fanout_position (snapshot) VALUES (pg_current_snapshot());

ALTER TABLE tenantry.webhook_endpoints OWNER TO tenantry_owner;
ALTER TABLE tenantry.webhook_deliveries OWNER TO tenantry_owner;
ALTER TABLE tenantry.webhook_attempts OWNER TO tenantry_owner;
ALTER TABLE tenantry.webhook_fanout_position OWNER TO tenantry_owner;

-- Row-level security as in 0002 for the three tenant tables.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['webhook_endpoints', 'webhook_deliveries', 'webhook_attempts'] LOOP
        EXECUTE format('ALTER TABLE tenantry.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE tenantry.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON tenantry.%I AS RESTRICTIVE FOR ALL TO PUBLIC'
            ' USING (tenant_id = (SELECT nullif(current_setting(''app.tenant_id'', true), '''')::uuid))'
            ' WITH CHECK (tenant_id = (SELECT nullif(current_setting(''app.tenant_id'', true), '''')::uuid))',
            t);
        EXECUTE format(
            'CREATE POLICY tenant_rows ON tenantry.%I AS PERMISSIVE FOR ALL TO PUBLIC'
            ' USING (true) WITH CHECK (true)', t);
    END LOOP;
END;
$$;

-- Tenant code manages its endpoints and reads its deliveries and attempts; the
-- replay, test and recover routes change deliveries under the policies.  Attempts are
-- written only by the delivery functions (tenantry_system).
GRANT SELECT, INSERT, UPDATE, DELETE ON tenantry.webhook_endpoints TO tenantry_service;
GRANT SELECT, INSERT, UPDATE ON tenantry.webhook_deliveries TO tenantry_service;
GRANT SELECT ON tenantry.webhook_attempts TO tenantry_service;
GRANT SELECT, INSERT, UPDATE, DELETE
   ON tenantry.webhook_endpoints, tenantry.webhook_deliveries, tenantry.webhook_attempts,
      tenantry.webhook_fanout_position
   TO tenantry_system;
-- The delivery functions append the endpoints' circuit and disabling events.
GRANT INSERT (tenant_id, aggregate_type, aggregate_id, version, event_type, payload)
   ON tenantry.outbox TO tenantry_system;
