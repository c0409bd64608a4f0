-- 0003: the outbox (an append-only event log), tenant onboarding and its step ledger,
-- and the idempotency keys of the onboarding API.

-- The outbox.  Every state change that someone outside the writing transaction may
-- care about (a browser following an onboarding, a webhook endpoint, another service)
-- is a row here, committed with the change itself.  An aggregate's events carry a
-- version: a second writer racing on one aggregate hits the unique key and fails
-- instead of interleaving.
CREATE TABLE tenantry.outbox (
    tenant_id      uuid        NOT NULL,
    id             bigint      GENERATED ALWAYS AS IDENTITY,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    version        integer     NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- The writing transaction.  Ids are handed out before commit, so a reader that
    -- follows the log by id would skip a row whose transaction commits after a later
    -- id was read.  Every row a reader has not seen yet belongs to a transaction whose
    -- id is at least the xmin of the reader's last snapshot: following by that horizon
    -- misses nothing (see outbox_follow).
    xid            xid8        NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT outbox_version_positive CHECK (version >= 1),
    -- Types are names, not text: they travel in SSE `event:` lines and webhook headers,
    -- where a line break would let a writer forge fields.  Payloads are objects, so
    -- a follower can add its envelope (type, version, at) without a second encoding.
    CONSTRAINT outbox_aggregate_type CHECK (aggregate_type ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    CONSTRAINT outbox_aggregate_id CHECK (length(aggregate_id) BETWEEN 1 AND 200),
    CONSTRAINT outbox_event_type CHECK (event_type ~ '^[A-Za-z0-9_.:-]{1,200}$'),
    CONSTRAINT outbox_payload_object CHECK (jsonb_typeof(payload) = 'object')
);
CREATE UNIQUE INDEX outbox_aggregate_version_key
    ON tenantry.outbox (tenant_id, aggregate_type, aggregate_id, version);
CREATE INDEX outbox_xid_idx ON tenantry.outbox (xid);
CREATE INDEX outbox_created_idx ON tenantry.outbox (created_at);

-- Wake the followers (SSE hubs now, webhook fan-out later): statement-level and
-- throttled like the jobs trigger (the same in-memory try-lock per 5 ms bucket spares
-- most inserters the read of the throttle row); the payload names the channel's
-- content, never a row.
CREATE FUNCTION tenantry.outbox_notify() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_try_advisory_xact_lock(
           32331,
           hashtext('tenantry_outbox') # (floor(extract(epoch FROM clock_timestamp()) * 200)::bigint
                                         % 2147483647)::integer) THEN
        PERFORM tenantry.notify_throttled('tenantry_outbox', 'outbox', 5);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON tenantry.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION tenantry.outbox_notify();

-- The SQL interface for appending an event inside the caller's own transaction, which
-- must be in the tenant's context (row-level security applies: SECURITY INVOKER).
-- Without a version, the event takes the aggregate's next one; two transactions doing
-- that at once for one aggregate collide on the unique key, and the later one fails.
CREATE FUNCTION tenantry.emit(
    tenant_id      uuid,
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb   DEFAULT '{}'::jsonb,
    version        integer DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    IF tenant_id IS NULL OR aggregate_type IS NULL OR aggregate_id IS NULL
       OR event_type IS NULL THEN
        RAISE EXCEPTION 'tenantry.emit: tenant_id, aggregate_type, aggregate_id and event_type'
                        ' must not be null' USING ERRCODE = '22004';
    END IF;
    INSERT INTO tenantry.outbox AS o
           (tenant_id, aggregate_type, aggregate_id, version, event_type, payload)
    VALUES (emit.tenant_id, emit.aggregate_type, emit.aggregate_id,
            coalesce(emit.version,
                     (SELECT coalesce(max(x.version), 0) + 1 FROM tenantry.outbox x
                       WHERE x.tenant_id = emit.tenant_id
                         AND x.aggregate_type = emit.aggregate_type
                         AND x.aggregate_id = emit.aggregate_id)),
            emit.event_type, coalesce(emit.payload, '{}'::jsonb))
    RETURNING o.id INTO new_id;
    RETURN new_id;
END;
$$;

-- Onboardings: the state projection of one sign-up.  The tenant id is assigned when
-- the request is accepted (so every step can be replayed deterministically), and the
-- onboarding belongs to that tenant from the start; the tenants row comes later, hence
-- no foreign key.  Written by one module only (service/onboarding/machine.py).
CREATE TABLE tenantry.onboardings (
    tenant_id      uuid        NOT NULL,
    id             uuid        NOT NULL,
    email          text        NOT NULL,
    tenant_name    text        NOT NULL,
    plan           text        NOT NULL,
    state          text        NOT NULL DEFAULT 'accepted',
    version        integer     NOT NULL DEFAULT 1,
    failure_reason text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT onboardings_state CHECK (state IN ('accepted', 'provisioning', 'completed', 'failed')),
    CONSTRAINT onboardings_failure CHECK ((state = 'failed') = (failure_reason IS NOT NULL)),
    CONSTRAINT onboardings_email_format CHECK (email ~ '^[^@\s]+@[^@\s]+$' AND length(email) <= 254),
    CONSTRAINT onboardings_name_len CHECK (length(tenant_name) BETWEEN 3 AND 50),
    CONSTRAINT onboardings_plan CHECK (plan IN ('free', 'pro')),
    CONSTRAINT onboardings_version_positive CHECK (version >= 1)
);

-- The step ledger: a step is done when its row is here, committed with the step's own
-- rows and the onboarding's next version.
CREATE TABLE tenantry.onboarding_steps (
    tenant_id     uuid        NOT NULL,
    onboarding_id uuid        NOT NULL,
    step          text        NOT NULL,
    done_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, onboarding_id, step),
    FOREIGN KEY (tenant_id, onboarding_id) REFERENCES tenantry.onboardings (tenant_id, id)
        ON DELETE CASCADE
);

-- Idempotency keys of POST /v1/onboardings.  A request comes before its tenant exists,
-- so the key cannot be looked up in a tenant's context.  Instead the policy makes the
-- row visible to a transaction that presents the key itself (`app.idempotency_key`,
-- the key's SHA-256 in hex): whoever knows a key sees its row, nobody can list them.
-- Only hashes are stored.
CREATE TABLE tenantry.idempotency_keys (
    key_hash      bytea       PRIMARY KEY,
    request_hash  bytea       NOT NULL,
    tenant_id     uuid        NOT NULL,
    onboarding_id uuid        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT idempotency_keys_hash_len CHECK (length(key_hash) = 32 AND length(request_hash) = 32)
);
CREATE INDEX idempotency_keys_created_idx ON tenantry.idempotency_keys (created_at);

ALTER TABLE tenantry.outbox OWNER TO tenantry_owner;
ALTER TABLE tenantry.onboardings OWNER TO tenantry_owner;
ALTER TABLE tenantry.onboarding_steps OWNER TO tenantry_owner;
ALTER TABLE tenantry.idempotency_keys OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.outbox_notify() OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.emit(uuid, text, text, text, jsonb, integer) OWNER TO tenantry_owner;

-- Row-level security as in 0002 for the three tenant tables.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['outbox', 'onboardings', 'onboarding_steps'] LOOP
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

ALTER TABLE tenantry.idempotency_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenantry.idempotency_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY key_holder ON tenantry.idempotency_keys AS RESTRICTIVE FOR ALL TO PUBLIC
    USING (key_hash = (SELECT decode(nullif(current_setting('app.idempotency_key', true), ''), 'hex')))
    WITH CHECK (key_hash = (SELECT decode(nullif(current_setting('app.idempotency_key', true), ''), 'hex')));
CREATE POLICY key_rows ON tenantry.idempotency_keys AS PERMISSIVE FOR ALL TO PUBLIC
    USING (true) WITH CHECK (true);

-- The service's privileges.  The outbox is append-only for it: no UPDATE or DELETE,
-- and of the columns only those an event is made of (id, created_at and xid are the
-- database's, so that a follower can trust them).
GRANT SELECT, INSERT, UPDATE, DELETE ON tenantry.onboardings, tenantry.onboarding_steps
   TO tenantry_service;
GRANT SELECT ON tenantry.outbox TO tenantry_service;
GRANT INSERT (tenant_id, aggregate_type, aggregate_id, version, event_type, payload)
   ON tenantry.outbox TO tenantry_service;
GRANT SELECT, INSERT ON tenantry.idempotency_keys TO tenantry_service;
GRANT EXECUTE ON FUNCTION tenantry.emit(uuid, text, text, text, jsonb, integer)
   TO tenantry_service;
GRANT SELECT, DELETE ON tenantry.outbox, tenantry.idempotency_keys TO tenantry_system;

-- An event as its followers send it on: the payload with the envelope's keys (which
-- win over the payload's), as JSON text, so that no follower decodes and re-encodes it.
CREATE FUNCTION tenantry.event_data(
    payload jsonb, event_type text, version integer, created_at timestamptz
) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN (payload || jsonb_build_object('type', event_type, 'version', version,
                                      'at', created_at))::text;

-- Follow the outbox across tenants (the SSE hub of every process): the events of one
-- aggregate type written by transactions at or after `after_xmin`, and the horizon to
-- pass next time, which is the xmin of this statement's own snapshot: every
-- transaction not visible to it has an id at least that.  Rows of transactions that
-- were already visible last time are read again (those still running then): a
-- follower drops them by version.  The first row always carries the horizon, with
-- NULL event columns when there is no event.  No row limit: what a follower reads is
-- what was written since its last read (milliseconds, or its poll interval), unless a
-- long transaction holds the horizon back; the hub logs when a read grows large.
CREATE FUNCTION tenantry.outbox_follow(after_xmin xid8, aggregate_type text)
RETURNS TABLE (horizon xid8, tenant_id uuid, aggregate_id text, version integer,
               event_type text, data text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT h.horizon, e.tenant_id, e.aggregate_id, e.version, e.event_type, e.data
      FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon) h
      LEFT JOIN LATERAL (
            SELECT o.tenant_id, o.aggregate_id, o.version, o.event_type,
                   tenantry.event_data(o.payload, o.event_type, o.version, o.created_at)
                       AS data
              FROM tenantry.outbox o
             WHERE o.xid >= outbox_follow.after_xmin
               AND o.aggregate_type = outbox_follow.aggregate_type) e ON true
     ORDER BY e.tenant_id, e.aggregate_id, e.version;
END;
$$;

-- Retention: events and idempotency keys older than the given age go, oldest first,
-- a bounded batch per call (the maintenance task calls again while a batch is full).
CREATE FUNCTION tenantry.prune_outbox(retention_days integer, max_rows integer)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
BEGIN
    IF retention_days IS NULL OR retention_days < 1 THEN
        RAISE EXCEPTION 'tenantry.prune_outbox: retention_days must be >= 1' USING ERRCODE = '22023';
    END IF;
    DELETE FROM tenantry.outbox o
     WHERE o.ctid = ANY (ARRAY(
           SELECT x.ctid FROM tenantry.outbox x
            WHERE x.created_at < now() - make_interval(days => retention_days)
            ORDER BY x.created_at
            LIMIT max_rows));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;

CREATE FUNCTION tenantry.prune_idempotency_keys(retention_hours integer, max_rows integer)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
BEGIN
    IF retention_hours IS NULL OR retention_hours < 1 THEN
        RAISE EXCEPTION 'tenantry.prune_idempotency_keys: retention_hours must be >= 1'
            USING ERRCODE = '22023';
    END IF;
    DELETE FROM tenantry.idempotency_keys k
     WHERE k.ctid = ANY (ARRAY(
           SELECT x.ctid FROM tenantry.idempotency_keys x
            WHERE x.created_at < now() - make_interval(hours => retention_hours)
            ORDER BY x.created_at
            LIMIT max_rows));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;

ALTER FUNCTION tenantry.event_data(jsonb, text, integer, timestamptz) OWNER TO tenantry_owner;
GRANT EXECUTE ON FUNCTION tenantry.event_data(jsonb, text, integer, timestamptz)
   TO tenantry_service, tenantry_system;

GRANT CREATE ON SCHEMA tenantry TO tenantry_system;
ALTER FUNCTION tenantry.outbox_follow(xid8, text) OWNER TO tenantry_system;
ALTER FUNCTION tenantry.prune_outbox(integer, integer) OWNER TO tenantry_system;
ALTER FUNCTION tenantry.prune_idempotency_keys(integer, integer) OWNER TO tenantry_system;
REVOKE CREATE ON SCHEMA tenantry FROM tenantry_system;
REVOKE EXECUTE ON FUNCTION tenantry.outbox_follow(xid8, text),
                           tenantry.prune_outbox(integer, integer),
                           tenantry.prune_idempotency_keys(integer, integer),
                           tenantry.outbox_notify(),
                           tenantry.emit(uuid, text, text, text, jsonb, integer),
                           tenantry.event_data(jsonb, text, integer, timestamptz)
   FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.outbox_follow(xid8, text),
                          tenantry.prune_outbox(integer, integer),
                          tenantry.prune_idempotency_keys(integer, integer)
   TO tenantry_worker;
