-- version: 10
-- The outbox's functions and triggers.  A repeatable migration (tenantry/migrate.py),
-- applied again whenever this file changes (raise the version above with every
-- change).  The outbox module is the only writer of
-- tenantry.outbox, besides other services calling tenantry.emit in their own
-- transactions.

GRANT CREATE ON SCHEMA tenantry TO tenantry_system;

-- The SQL interface for appending an event inside the caller's own transaction, which
-- must be in the tenant's context (row-level security applies: SECURITY INVOKER).
-- Without a version, the event takes the aggregate's next one; two transactions doing
-- that at once for one aggregate collide on the unique key, and the later one fails.
CREATE OR REPLACE FUNCTION tenantry.emit(
    tenant_id      uuid,
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb   DEFAULT '{}'::jsonb,
    version        integer DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off  -- see the head of jobs/functions.sql
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

-- Several events in one statement, in the caller's transaction and tenant context
-- (SECURITY INVOKER, as emit): element i of the arrays is one event, appended in array
-- order (their ids follow it).  A NULL version takes the aggregate's next one (at most
-- one such event per aggregate in one call: the statement does not see its own rows).
-- Provisioning records a group of steps' events with it: one statement, where one call
-- of emit per event cost a statement and a function call each.  A generic plan, forced:
-- left to choose, PL/pgSQL planned the INSERT afresh on every call (a custom plan for
-- each set of arrays: 0.13 ms a call, 6,004 plans for 6,000 calls in pg_stat_statements
-- with track_planning during a provisioning drain), a third of the statement's cost.
CREATE OR REPLACE FUNCTION tenantry.emit_many(
    tenant_id       uuid,
    aggregate_types text[],
    aggregate_ids   text[],
    versions        integer[],
    event_types     text[],
    payloads        jsonb[]
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off SET jit = off  -- see the head of jobs/functions.sql
AS $$
#variable_conflict use_column
BEGIN
    IF tenant_id IS NULL THEN
        RAISE EXCEPTION 'tenantry.emit_many: tenant_id must not be null' USING ERRCODE = '22004';
    END IF;
    IF cardinality(aggregate_types) IS DISTINCT FROM cardinality(event_types)
       OR cardinality(aggregate_ids) IS DISTINCT FROM cardinality(event_types)
       OR cardinality(versions) IS DISTINCT FROM cardinality(event_types)
       OR cardinality(payloads) IS DISTINCT FROM cardinality(event_types) THEN
        RAISE EXCEPTION 'tenantry.emit_many: the arrays must be of one length'
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO tenantry.outbox AS o
           (tenant_id, aggregate_type, aggregate_id, version, event_type, payload)
    SELECT emit_many.tenant_id, e.a, e.i,
           coalesce(e.v, (SELECT coalesce(max(x.version), 0) + 1 FROM tenantry.outbox x
                           WHERE x.tenant_id = emit_many.tenant_id
                             AND x.aggregate_type = e.a AND x.aggregate_id = e.i)),
           e.t, coalesce(e.p, '{}'::jsonb)
      FROM unnest(aggregate_types, aggregate_ids, versions, event_types, payloads)
           WITH ORDINALITY AS e(a, i, v, t, p, n)
     ORDER BY e.n;
END;
$$;

-- Wake the followers (SSE hubs now, webhook fan-out later) when the inserting
-- transaction commits, throttled like the jobs' wake-up (tenantry.wake_at_commit in
-- tenantry/jobs/functions.sql); the payload names the channel's content, never a row.
SELECT tenantry.ensure_trigger('tenantry.outbox', 'outbox_wake', $trigger$
CREATE CONSTRAINT TRIGGER outbox_wake AFTER INSERT ON tenantry.outbox
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION tenantry.wake_at_commit('tenantry_outbox', 'outbox')
$trigger$);

-- An event as its followers send it on: the payload with the envelope's keys (which
-- win over the payload's), as JSON text, so that no follower decodes and re-encodes it.
CREATE OR REPLACE FUNCTION tenantry.event_data(
    payload jsonb, event_type text, version integer, created_at timestamptz
) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN (payload || jsonb_build_object(
            'type', event_type, 'version', version,
            -- The interface's one time format (tenantry/timefmt.py), whatever the
            -- session's time zone.
            'at', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')))::text;

-- Follow the outbox across tenants (the SSE hub of every process): the events of one
-- aggregate type that the follower's previous snapshot could not see, and the
-- snapshot to pass next time (the first row always carries it, with NULL event columns
-- when there is no event).
--
-- Ids are handed out before commit, so following by id would skip a row whose
-- transaction commits after a later id was read.  Every row committed since the
-- previous snapshot belongs to a transaction that was either still running then (in
-- its xip list) or had not started (an id at or above its xmax); rows of transactions
-- it saw as committed were read by the previous call.  So each event is read once,
-- and a read costs what was committed since the last one, whatever else runs: an old
-- transaction anywhere in the cluster only sits in the xip list (an index probe),
-- where a horizon-based read (xid >= xmin) re-read every event since that
-- transaction began on every wake-up.  The `xid` column holds the writer's top-level
-- transaction id (pg_current_xact_id), as the snapshot lists them.
CREATE OR REPLACE FUNCTION tenantry.outbox_follow(after_snapshot text, aggregate_type text)
RETURNS TABLE (snapshot text, tenant_id uuid, aggregate_id text, version integer,
               event_type text, data text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off SET jit = off  -- see the head of jobs/functions.sql
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT s.snap::text, e.tenant_id, e.aggregate_id, e.version, e.event_type, e.data
      FROM (SELECT pg_current_snapshot() AS snap) s
      LEFT JOIN LATERAL (
            SELECT o.tenant_id, o.aggregate_id, o.version, o.event_type,
                   tenantry.event_data(o.payload, o.event_type, o.version, o.created_at)
                       AS data
              FROM tenantry.outbox o
             WHERE o.xid >= pg_snapshot_xmax($1::pg_snapshot)
               AND o.aggregate_type = $2::text
            UNION ALL
            SELECT o.tenant_id, o.aggregate_id, o.version, o.event_type,
                   tenantry.event_data(o.payload, o.event_type, o.version, o.created_at)
              FROM tenantry.outbox o
             WHERE o.xid = ANY (ARRAY(SELECT pg_snapshot_xip($1::pg_snapshot)))
               AND o.aggregate_type = $2::text) e ON true
     ORDER BY e.tenant_id, e.aggregate_id, e.version;
END;
$$;

-- Retention: events older than the given age go, oldest first, a bounded batch per
-- call (the maintenance task calls again while a batch is full).
CREATE OR REPLACE FUNCTION tenantry.prune_outbox(retention_days integer, max_rows integer)
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

ALTER FUNCTION tenantry.emit(uuid, text, text, text, jsonb, integer) OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.emit_many(uuid, text[], text[], integer[], text[], jsonb[])
    OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.event_data(jsonb, text, integer, timestamptz) OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.outbox_follow(text, text) OWNER TO tenantry_system;
ALTER FUNCTION tenantry.prune_outbox(integer, integer) OWNER TO tenantry_system;
REVOKE ALL ON FUNCTION tenantry.emit(uuid, text, text, text, jsonb, integer),
                       tenantry.emit_many(uuid, text[], text[], integer[], text[], jsonb[]),
                       tenantry.event_data(jsonb, text, integer, timestamptz),
                       tenantry.outbox_follow(text, text),
                       tenantry.prune_outbox(integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.emit(uuid, text, text, text, jsonb, integer),
                          tenantry.emit_many(uuid, text[], text[], integer[], text[], jsonb[])
    TO tenantry_service;
GRANT EXECUTE ON FUNCTION tenantry.event_data(jsonb, text, integer, timestamptz)
    TO tenantry_service, tenantry_system;
GRANT EXECUTE ON FUNCTION tenantry.outbox_follow(text, text),
                          tenantry.prune_outbox(integer, integer)
    TO tenantry_worker;

REVOKE CREATE ON SCHEMA tenantry FROM tenantry_system;
