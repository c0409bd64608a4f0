-- version: 25
-- The webhooks module's functions: the fan-out from the outbox, the claim of due
-- deliveries, the recording of attempts (with the circuit breaker), the rescue of
-- interrupted deliveries and retention.  A repeatable migration (tenantry/migrate.py),
-- applied again whenever this file changes (raise the version above with every
-- change).  The cross-tenant functions run as tenantry_system and are executable by
-- the worker's login only (the operator's by tenantry_operator).

GRANT CREATE ON SCHEMA tenantry TO tenantry_system;
-- The delivery functions append the endpoints' circuit and disabling events.
GRANT EXECUTE ON FUNCTION tenantry.emit(uuid, text, text, text, jsonb, integer)
    TO tenantry_system;

-- Whether an endpoint subscribed to an event type: no pattern (every event), the
-- exact type, `*`, or a prefix pattern `invoice.*` (matches `invoice.paid`).
CREATE OR REPLACE FUNCTION tenantry.webhook_matches(patterns text[], event_type text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN cardinality(patterns) = 0
    OR event_type = ANY (patterns)
    OR EXISTS (SELECT 1 FROM unnest(patterns) p
                WHERE p = '*' OR (right(p, 2) = '.*' AND starts_with(event_type, left(p, -1))));

-- The body of a delivery as Standard Webhooks has it: {"type", "timestamp", "data"},
-- the event's time in the interface's one time format (tenantry/timefmt.py).
CREATE OR REPLACE FUNCTION tenantry.webhook_body(
    event_type text, payload jsonb, created_at timestamptz
) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN jsonb_build_object(
    'type', event_type,
    'timestamp', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'data', payload)::text;

-- Fan the events committed since the stored position out to deliveries: one per
-- (event, enabled endpoint of its tenant whose filter matches), then store the new
-- position, in one transaction.  The position row's lock makes one follower at a time
-- do it (the others answer events = -1 and try again later); the unique key on (event,
-- endpoint) makes a repeat after a crash create nothing twice.  The position is a
-- snapshot, read as outbox_follow reads it (tenantry/outbox/functions.sql): every
-- event committed since belongs to a transaction that was running then (its xip list)
-- or had not started (at or above its xmax), so none is missed, whatever order
-- transactions commit in.  A `webhook.test` event goes only to the endpoint it names.
--
-- Cost.  The follower runs a pass on every (throttled) outbox notification and on
-- every poll, so a pass must cost what its new events cost, not what the outbox holds
-- (30 days of events by default):
-- - Every read of the outbox is bounded above as well as below by xid (`< xmax of the
--   statement's own snapshot`, which no row it can see reaches, so the bound filters
--   nothing).  PL/pgSQL moves to a generic plan after five calls, and a generic plan
--   guesses a third of the table for `xid >= $1` alone: it scanned the whole outbox on
--   every pass.  For a range it guesses a sliver, and reads outbox_xid_idx.
-- - A pass that finds no new event (the trailing pass after a wake-up, every idle
--   poll) stops after one index probe, before taking the position's lock: it stays a
--   read-only transaction, with no transaction id, no WAL and no commit flush.
CREATE OR REPLACE FUNCTION tenantry.webhook_fan_out(OUT events integer, OUT deliveries integer)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off  -- see the head of jobs/functions.sql
AS $$
DECLARE
    pos pg_snapshot;
    next_pos pg_snapshot;
BEGIN
    events := 0;
    deliveries := 0;
    -- Unlocked: a follower that is moving the position only makes the events seen
    -- here older, and this pass then takes the lock (or answers -1) below.
    SELECT p.snapshot INTO pos FROM tenantry.webhook_fanout_position p;
    -- min(), not EXISTS: EXISTS is planned for its first row, which leaves it free to
    -- pick a scan that bets on meeting a match soon; it cost 0.27 ms a pass in the
    -- drain benchmark.  min() reads the index from the low end (0.02 ms).
    IF (SELECT min(o.xid) FROM tenantry.outbox o
         WHERE o.xid >= pg_snapshot_xmax(pos)
           AND o.xid < pg_snapshot_xmax(pg_current_snapshot())) IS NULL
       AND (SELECT min(o.xid) FROM tenantry.outbox o
             WHERE o.xid = ANY (ARRAY(SELECT pg_snapshot_xip(pos)))) IS NULL THEN
        RETURN;
    END IF;
    SELECT p.snapshot INTO pos FROM tenantry.webhook_fanout_position p FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        events := -1;
        RETURN;
    END IF;
    -- One statement: the events it reads and the snapshot it stores are the same view.
    WITH ev AS (
        SELECT o.tenant_id, o.id, o.event_type, o.payload, o.created_at
          FROM tenantry.outbox o
         WHERE o.xid >= pg_snapshot_xmax(pos)
           AND o.xid < pg_snapshot_xmax(pg_current_snapshot())
        UNION ALL
        SELECT o.tenant_id, o.id, o.event_type, o.payload, o.created_at
          FROM tenantry.outbox o
         WHERE o.xid = ANY (ARRAY(SELECT pg_snapshot_xip(pos)))
    ), made AS (
        INSERT INTO tenantry.webhook_deliveries AS d
               (tenant_id, endpoint_id, event_id, event_type, body, created_at)
        SELECT ev.tenant_id, e.id, ev.id, ev.event_type,
               tenantry.webhook_body(ev.event_type, ev.payload, ev.created_at), now()
          FROM ev
          JOIN tenantry.webhook_endpoints e ON e.tenant_id = ev.tenant_id AND e.enabled
         WHERE CASE WHEN ev.event_type = 'webhook.test'
                    THEN ev.payload ->> 'endpoint_id' = e.id::text
                    -- An endpoint's own circuit and disabling news goes to the tenant's
                    -- other endpoints: sent to itself, a failing endpoint fed itself.
                    WHEN starts_with(ev.event_type, 'webhook.endpoint.')
                         AND ev.payload ->> 'endpoint_id' = e.id::text THEN false
                    ELSE tenantry.webhook_matches(e.event_types, ev.event_type) END
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ev)::integer, (SELECT count(*) FROM made)::integer,
           pg_current_snapshot()
      INTO events, deliveries, next_pos;
    UPDATE tenantry.webhook_fanout_position SET snapshot = next_pos, updated_at = now();
    IF deliveries > 0 THEN
        PERFORM pg_notify('tenantry_webhooks', 'deliveries');
    END IF;
END;
$$;

-- How far the fan-out is behind: events committed since its position (counted up to
-- `cap`, so that a large backlog costs a bounded read) and the oldest one's time.
CREATE OR REPLACE FUNCTION tenantry.webhook_fanout_lag(cap integer)
RETURNS TABLE (events bigint, oldest timestamptz)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pos pg_snapshot;
BEGIN
    SELECT p.snapshot INTO pos FROM tenantry.webhook_fanout_position p;
    RETURN QUERY
    -- Bounded above as the fan-out's reads are (see there), so that it reads the index.
    SELECT count(*), min(x.created_at)
      FROM (SELECT o.created_at FROM tenantry.outbox o
             WHERE o.xid >= pg_snapshot_xmax(pos)
               AND o.xid < pg_snapshot_xmax(pg_current_snapshot())
            UNION ALL
            SELECT o.created_at FROM tenantry.outbox o
             WHERE o.xid = ANY (ARRAY(SELECT pg_snapshot_xip(pos)))
             LIMIT cap) x;
END;
$$;

DROP FUNCTION IF EXISTS tenantry.webhook_claim(text, integer, uuid, integer, integer, integer);

-- Claim up to `max_rows` due deliveries for `owner`, at most `max_in_flight` in flight
-- per endpoint and `tenant_in_flight` per tenant across every process (claims take turns on an advisory lock, so the
-- count they see is exact), within an endpoint's rate limit (a token bucket), and only
-- for an endpoint whose circuit lets them through: closed; or open past its cool-down,
-- or half-open with nothing in flight, for one probe (the endpoint turns half-open).
-- The walk over endpoints starts at `pivot` (random per claim), so that when the
-- process has fewer slots than endpoints have work, no endpoint is always last.
-- Each claimed delivery is leased for its timeout plus `lease_margin` seconds.
-- Nothing in it waits for a row: an endpoint whose row it would write (a rate-limited
-- one's tokens, an open circuit's turn to half-open) is passed over while another
-- transaction holds that row.
CREATE OR REPLACE FUNCTION tenantry.webhook_claim(
    owner text, max_rows integer, pivot uuid, max_in_flight integer,
    default_timeout integer, lease_margin integer, tenant_in_flight integer
)
RETURNS TABLE (
    tenant_id uuid, id uuid, endpoint_id uuid, event_id bigint, event_type text,
    body text, attempts integer, url text, headers jsonb, secret bytea,
    previous_secret bytea, timeout_seconds integer, retry_schedule integer[], probe boolean
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off  -- see the head of jobs/functions.sql
-- The deliveries in flight are read through webhook_deliveries_sending_idx, whose
-- entries for rows that have left `sending` stay until VACUUM: a bitmap scan visits
-- every one of them on every claim (3,379 entries for 28 rows in flight, a third of
-- the claim, in a 10,000-delivery burst), a plain index scan marks them dead the first
-- time and skips them after.
SET enable_bitmapscan = off
AS $$
#variable_conflict use_column
DECLARE
    -- The endpoints whose rows the claim writes (`spent`), locked before its snapshot:
    -- their rows' places (an id alone is the tenant's own choice, and another tenant
    -- may choose the same).
    writable tid[];
BEGIN
    -- Claims take turns (0x7E4F, a lock class of its own: on 0x7E4B, the wake-up
    -- throttle's window try-lock, a window's key could meet it).
    PERFORM pg_advisory_xact_lock(32335, hashtext('tenantry.webhook_claim'));
    -- The rows of the endpoints the claim may spend tokens of or probe, with something
    -- due, skipping those held elsewhere: waiting for one that an operator's open
    -- transaction holds would hold the claims' lock as long, and with it every tenant's
    -- deliveries in every process (and the wait would come off the leases' margin).
    -- The claim passes those endpoints over this time.  Only those it may take from
    -- (a token left, a place free): locking the others would write their rows for
    -- nothing and make records of them wait.
    writable := ARRAY(
        SELECT e.ctid FROM tenantry.webhook_endpoints e
         WHERE e.enabled
           AND (e.rate_limit IS NOT NULL
                OR (e.circuit_state = 'open' AND e.circuit_retry_at <= now()))
           AND (e.rate_limit IS NULL
                OR least(e.rate_limit::float8,
                         coalesce(e.rate_tokens, e.rate_limit)
                         + e.rate_limit * extract(epoch FROM
                             now() - coalesce(e.rate_refilled_at, now()))) >= 1)
           AND EXISTS (SELECT 1 FROM tenantry.webhook_deliveries d
                        WHERE d.tenant_id = e.tenant_id AND d.endpoint_id = e.id
                          AND d.state = 'pending' AND d.next_attempt_at <= now())
           AND (SELECT count(*) FROM tenantry.webhook_deliveries d
                 WHERE d.tenant_id = e.tenant_id AND d.endpoint_id = e.id
                   AND d.state = 'sending')
               < CASE WHEN e.circuit_state = 'closed' THEN $4 ELSE 1 END
           FOR NO KEY UPDATE SKIP LOCKED);
    RETURN QUERY
    WITH busy AS (
        SELECT d.tenant_id, d.endpoint_id, count(*)::integer AS n
          FROM tenantry.webhook_deliveries d
         WHERE d.state = 'sending'
         GROUP BY d.tenant_id, d.endpoint_id
    ), tenant_busy AS (
        SELECT b.tenant_id, sum(b.n)::integer AS n FROM busy b GROUP BY b.tenant_id
    ), ep AS (
        SELECT e.tenant_id, e.id, e.circuit_state,
               $7 - coalesce(tb.n, 0) AS tenant_free,
               least(
                   CASE WHEN e.circuit_state = 'closed'
                            THEN $4 - coalesce(b.n, 0)
                        WHEN coalesce(b.n, 0) = 0
                             AND (e.circuit_state = 'half_open' OR e.circuit_retry_at <= now())
                            THEN 1
                        ELSE 0 END,
                   $7 - coalesce(tb.n, 0),
                   CASE WHEN e.rate_limit IS NULL THEN $2
                        ELSE floor(least(e.rate_limit::float8,
                                         coalesce(e.rate_tokens, e.rate_limit)
                                         + e.rate_limit * extract(epoch FROM
                                             now() - coalesce(e.rate_refilled_at, now()))))::integer
                   END) AS free
          FROM tenantry.webhook_endpoints e
          LEFT JOIN busy b ON b.tenant_id = e.tenant_id AND b.endpoint_id = e.id
          LEFT JOIN tenant_busy tb ON tb.tenant_id = e.tenant_id
         WHERE e.enabled
           -- `spent` writes no row that `writable` does not hold.
           -- (Locked, the row cannot move: its place is the one the snapshot sees.)
           AND ((e.rate_limit IS NULL AND e.circuit_state <> 'open') OR e.ctid = ANY (writable))
    ), walk AS (
        SELECT ep.*, row_number() OVER (ORDER BY ep.id < $3, ep.id) AS turn
          FROM ep WHERE ep.free > 0
    ), candidates AS (
        SELECT c.tenant_id, c.id, w.turn, w.tenant_free,
               -- A tenant's endpoints together stay within the tenant's places.
               row_number() OVER (PARTITION BY c.tenant_id ORDER BY w.turn, c.next_attempt_at)
                   AS nth_of_tenant
          FROM walk w
         CROSS JOIN LATERAL (
               SELECT d.tenant_id, d.id, d.next_attempt_at
                 FROM tenantry.webhook_deliveries d
                WHERE d.tenant_id = w.tenant_id AND d.endpoint_id = w.id
                  AND d.state = 'pending' AND d.next_attempt_at <= now()
                ORDER BY d.next_attempt_at
                LIMIT w.free
                  FOR UPDATE SKIP LOCKED) c
    ), picked AS (
        SELECT c.tenant_id, c.id FROM candidates c
         WHERE c.nth_of_tenant <= c.tenant_free
         ORDER BY c.turn
         LIMIT $2
    ), claimed AS (
        UPDATE tenantry.webhook_deliveries d
           SET state = 'sending', attempts = d.attempts + 1, lease_owner = $1,
               -- From the clock, not now(): the transaction may have begun long before
               -- (waiting for the claims' lock, or a record's rows in
               -- webhook_record_leaving_held_and_claim), and a lease short by that
               -- wait could run out while the attempt is still within its timeout:
               -- sent twice.  Nothing later in the statement waits (`writable`).
               lease_until = clock_timestamp() + make_interval(
                   secs => coalesce(e.timeout_seconds, $5) + $6),
               updated_at = now()
          FROM picked p, tenantry.webhook_endpoints e
         WHERE d.tenant_id = p.tenant_id AND d.id = p.id
           AND e.tenant_id = d.tenant_id AND e.id = d.endpoint_id
        RETURNING d.tenant_id, d.id, d.endpoint_id, d.event_id, d.event_type, d.body,
                  d.attempts
    ), per_endpoint AS (
        SELECT c.tenant_id, c.endpoint_id, count(*)::integer AS n
          FROM claimed c GROUP BY c.tenant_id, c.endpoint_id
    ), spent AS (
        UPDATE tenantry.webhook_endpoints e
           SET circuit_state = CASE WHEN e.circuit_state = 'open' THEN 'half_open'
                                    ELSE e.circuit_state END,
               rate_tokens = CASE WHEN e.rate_limit IS NULL THEN NULL
                   ELSE least(e.rate_limit::float8,
                              coalesce(e.rate_tokens, e.rate_limit)
                              + e.rate_limit * extract(epoch FROM
                                  now() - coalesce(e.rate_refilled_at, now()))) - pe.n END,
               rate_refilled_at = CASE WHEN e.rate_limit IS NULL THEN NULL ELSE now() END
          FROM per_endpoint pe
         WHERE e.tenant_id = pe.tenant_id AND e.id = pe.endpoint_id
           AND (e.circuit_state = 'open' OR e.rate_limit IS NOT NULL)
        RETURNING e.id
    )
    SELECT c.tenant_id, c.id, c.endpoint_id, c.event_id, c.event_type, c.body, c.attempts,
           e.url, e.headers, e.secret,
           CASE WHEN e.previous_secret_until > now() THEN e.previous_secret END,
           coalesce(e.timeout_seconds, $5), e.retry_schedule,
           e.circuit_state <> 'closed'
      FROM claimed c
      JOIN tenantry.webhook_endpoints e ON e.tenant_id = c.tenant_id AND e.id = c.endpoint_id;
END;
$$;

-- The finished attempts that webhook_record receives, as rows.
CREATE OR REPLACE FUNCTION tenantry.webhook_results(results jsonb)
RETURNS TABLE (
    tenant_id uuid, delivery_id uuid, endpoint_id uuid, attempt integer,
    attempted_at timestamptz, url text, result text, request_headers jsonb,
    request_body text, response_status integer, response_headers jsonb,
    response_body text, duration_ms double precision, error_class text, error text,
    next_state text, next_attempt_at timestamptz, reason text, success boolean
)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
SELECT * FROM jsonb_to_recordset(results) AS r (
    tenant_id uuid, delivery_id uuid, endpoint_id uuid, attempt integer,
    attempted_at timestamptz, url text, result text, request_headers jsonb,
    request_body text, response_status integer, response_headers jsonb,
    response_body text, duration_ms double precision, error_class text, error text,
    next_state text, next_attempt_at timestamptz, reason text, success boolean)
$$;

-- Record finished attempts, one JSON object each (tenantry/webhooks/deliverer.py
-- decides the outcome): the attempt row, the delivery's next state (only while the
-- recording process still holds its lease: a rescued and re-claimed delivery belongs
-- to its new holder), and each endpoint's circuit and health.  `cfg` holds the
-- breaker's settings: failures (consecutive failed attempts that open it), ratio and
-- volume (a failure ratio over at least that many attempts in the window opens it),
-- window_s, cooldown_s (open -> one probe), disable_after_s (failing without a single
-- success that long disables the endpoint); and lease_margin_s (below).  Circuit
-- changes and disabling append events to the outbox (aggregate `webhook_endpoint`):
-- the endpoint's history, and what the tenant's other endpoints and the operators hear.
--
-- It waits at most 50 ms for an endpoint's row: the results of an endpoint whose row
-- another transaction holds longer (an operator's open transaction) are left out, and
-- their deliveries returned, for the caller to send again later with the endpoint's
-- results that came after them.  Waiting held up the rest of the batch, other
-- tenants' results, and with them the places their deliveries hold.  A left-out
-- delivery's lease is kept ahead (see below).
CREATE OR REPLACE FUNCTION tenantry.webhook_record_leaving_held(
    owner text, results jsonb, cfg jsonb)
RETURNS uuid[]
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off  -- see the head of jobs/functions.sql
AS $$
DECLARE
    ep record;
    before record;
    after record;
    event text;
    fresh boolean;
    w_started timestamptz;
    w_attempts integer;
    w_failures integer;
    streak integer;
    failing timestamptz;
    new_state text;
    disable boolean;
    recorded uuid[];
    locked text[];  -- tenant and endpoint ids: an endpoint's id alone is not unique
    left_out uuid[];
    wait_before text := current_setting('lock_timeout');
BEGIN
    -- The two keys alone, not webhook_results: that copies every body out of the JSON.
    -- Whatever is free at once first (the usual case: no wait, no subtransaction).
    locked := ARRAY(
        SELECT e.tenant_id::text || e.id::text FROM tenantry.webhook_endpoints e
         WHERE (e.tenant_id, e.id) IN (SELECT (x ->> 'tenant_id')::uuid,
                                              (x ->> 'endpoint_id')::uuid
                                         FROM jsonb_array_elements(results) x)
           FOR UPDATE SKIP LOCKED);
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(results) x
                WHERE (x ->> 'tenant_id')::uuid::text || (x ->> 'endpoint_id')::uuid::text
                      <> ALL (locked)) THEN
        -- A row held a moment (another process's record or claim) is waited for, up
        -- to 50 ms, in one order; past that (or in a deadlock with another record,
        -- which the timeout ends long before the deadlock check) the rows still held
        -- are skipped.  Skipping at once left results out whenever a busy process's
        -- claims or records met them, and each left-out result waits 50 ms or more.
        BEGIN
            PERFORM set_config('lock_timeout', '50ms', true);
            locked := ARRAY(
                SELECT e.tenant_id::text || e.id::text FROM tenantry.webhook_endpoints e
                 WHERE (e.tenant_id, e.id) IN (SELECT (x ->> 'tenant_id')::uuid,
                                                      (x ->> 'endpoint_id')::uuid
                                                 FROM jsonb_array_elements(results) x)
                 ORDER BY e.tenant_id, e.id
                   FOR UPDATE);
            PERFORM set_config('lock_timeout', wait_before, true);
        EXCEPTION WHEN lock_not_available THEN  -- (the setting is undone with the block)
            locked := ARRAY(
                SELECT e.tenant_id::text || e.id::text FROM tenantry.webhook_endpoints e
                 WHERE (e.tenant_id, e.id) IN (SELECT (x ->> 'tenant_id')::uuid,
                                                      (x ->> 'endpoint_id')::uuid
                                                 FROM jsonb_array_elements(results) x)
                   FOR UPDATE SKIP LOCKED);
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(results) x
                WHERE (x ->> 'tenant_id')::uuid::text || (x ->> 'endpoint_id')::uuid::text
                      <> ALL (locked)) THEN
        -- Left out: the results of an endpoint that exists and was not locked (one
        -- deleted meanwhile has no row to move; its results are recorded).
        left_out := ARRAY(
            SELECT r.delivery_id FROM tenantry.webhook_results(results) r
             WHERE r.tenant_id::text || r.endpoint_id::text <> ALL (locked)
               AND EXISTS (SELECT 1 FROM tenantry.webhook_endpoints e
                            WHERE e.tenant_id = r.tenant_id AND e.id = r.endpoint_id));
    ELSE
        left_out := '{}';
    END IF;
    IF cardinality(left_out) > 0 THEN
        -- Still the recorder's while their results wait: their leases are kept a
        -- margin ahead (`lease_margin_s`, and 2 s more: the deliverer tries them again
        -- up to a second apart), so that the rescue does not take them for a stopped
        -- process's and send them again; moved once less than half of that is left,
        -- not at every try.
        UPDATE tenantry.webhook_deliveries d
           SET lease_until = clock_timestamp() + make_interval(secs => margin)
          FROM tenantry.webhook_results(results) r,
               LATERAL (SELECT coalesce((cfg ->> 'lease_margin_s')::float8, 30) + 2
                                   AS margin) m
         WHERE d.tenant_id = r.tenant_id AND d.id = r.delivery_id
           AND r.delivery_id = ANY (left_out)
           AND d.state = 'sending' AND d.lease_owner = owner
           AND d.lease_until < clock_timestamp() + make_interval(secs => margin / 2);
        results := coalesce((SELECT jsonb_agg(x) FROM jsonb_array_elements(results) x
                              WHERE (x ->> 'delivery_id')::uuid <> ALL (left_out)),
                            '[]');
    END IF;
    -- An attempt already on record is not recorded again, nor applied or counted
    -- again: a record whose answer was lost after its commit (the connection cut, the
    -- process stopped) is sent again with the same results, and its delivery may be
    -- out on its next attempt by then, leased to the same process.
    WITH inserted AS (
        INSERT INTO tenantry.webhook_attempts
               (tenant_id, delivery_id, endpoint_id, attempt, attempted_at, url, result,
                request_headers, request_body, response_status, response_headers,
                response_body, duration_ms, error_class, error)
        SELECT r.tenant_id, r.delivery_id, r.endpoint_id, r.attempt, r.attempted_at, r.url,
               r.result, r.request_headers, r.request_body, r.response_status,
               r.response_headers, r.response_body, r.duration_ms, r.error_class, r.error
          FROM tenantry.webhook_results(results) r
          -- A probe of the delivery's attempts per result (LATERAL with LIMIT: as NOT
          -- EXISTS, the planner read every attempt on record into a hash, 3.6 ms a
          -- batch in bench.webhooks against 0.45 without the check).
          LEFT JOIN LATERAL (
               SELECT 1 AS found FROM tenantry.webhook_attempts a
                WHERE a.tenant_id = r.tenant_id AND a.delivery_id = r.delivery_id
                  AND a.attempt = r.attempt AND a.attempted_at = r.attempted_at
                LIMIT 1) already ON true
         WHERE already.found IS NULL
        RETURNING delivery_id
    )
    SELECT array_agg(i.delivery_id) INTO recorded FROM inserted i;

    UPDATE tenantry.webhook_deliveries d
       SET state = r.next_state,
           next_attempt_at = coalesce(r.next_attempt_at, d.next_attempt_at),
           last_status = r.response_status,
           last_error = CASE WHEN r.success THEN NULL
                             ELSE coalesce(r.error, 'HTTP ' || r.response_status) END,
           reason = r.reason,
           lease_until = NULL, lease_owner = NULL, updated_at = now(),
           finished_at = CASE WHEN r.next_state IN ('delivered', 'dead') THEN now() END
      FROM tenantry.webhook_results(results) r
     WHERE d.tenant_id = r.tenant_id AND d.id = r.delivery_id
       AND r.delivery_id = ANY (recorded)
       -- The attempt the delivery is out on: a result that comes late (after the
       -- rescue put the delivery back, and this process claimed it again) is on
       -- record and counts toward the circuit, but does not move the delivery.
       AND d.state = 'sending' AND d.lease_owner = owner AND d.attempts = r.attempt;

    -- Each endpoint's attempts in this batch, in time order: what closes, opens or
    -- disables it (its row locked above).
    FOR ep IN
        WITH r AS (SELECT * FROM tenantry.webhook_results(results) x
                    WHERE x.delivery_id = ANY (recorded)),
        good AS (
            SELECT r.tenant_id, r.endpoint_id,
                   max(r.attempted_at) FILTER (WHERE r.success) AS last_ok
              FROM r GROUP BY r.tenant_id, r.endpoint_id
        )
        SELECT r.tenant_id, r.endpoint_id, g.last_ok,
               count(*) FILTER (WHERE r.success) AS ok,
               count(*) FILTER (WHERE NOT r.success) AS failed,
               -- The failures after the batch's last success: the streak it ends with.
               count(*) FILTER (WHERE NOT r.success
                                  AND r.attempted_at > coalesce(g.last_ok, '-infinity'))
                   AS trailing,
               min(r.attempted_at) FILTER (WHERE NOT r.success
                                             AND r.attempted_at > coalesce(g.last_ok, '-infinity'))
                   AS first_trailing,
               min(r.attempted_at) FILTER (WHERE NOT r.success) AS first_failed,
               bool_or(r.result = 'gone') AS gone
          FROM r
          JOIN good g ON g.tenant_id = r.tenant_id AND g.endpoint_id = r.endpoint_id
         GROUP BY r.tenant_id, r.endpoint_id, g.last_ok
         ORDER BY r.tenant_id, r.endpoint_id
    LOOP
        SELECT e.* INTO before FROM tenantry.webhook_endpoints e
         WHERE e.tenant_id = ep.tenant_id AND e.id = ep.endpoint_id FOR UPDATE;
        CONTINUE WHEN NOT FOUND;  -- deleted meanwhile
        fresh := before.window_started_at < now() - make_interval(
                     secs => (cfg ->> 'window_s')::float8);
        w_started := CASE WHEN fresh THEN now() ELSE before.window_started_at END;
        w_attempts := CASE WHEN fresh THEN 0 ELSE before.window_attempts END + ep.ok + ep.failed;
        w_failures := CASE WHEN fresh THEN 0 ELSE before.window_failures END + ep.failed;
        IF ep.ok > 0 THEN
            streak := ep.trailing;
            failing := ep.first_trailing;
        ELSE
            streak := before.circuit_failures + ep.failed;
            failing := coalesce(before.failing_since, ep.first_failed);
        END IF;
        new_state := CASE
            WHEN ep.ok > 0 AND ep.trailing = 0 THEN 'closed'
            WHEN before.circuit_state IN ('open', 'half_open') THEN 'open'
            WHEN streak >= (cfg ->> 'failures')::integer THEN 'open'
            WHEN w_attempts >= (cfg ->> 'volume')::integer
                 AND w_failures >= w_attempts * (cfg ->> 'ratio')::float8 THEN 'open'
            ELSE before.circuit_state END;
        disable := ep.gone OR (failing IS NOT NULL AND failing < now() - make_interval(
                       secs => (cfg ->> 'disable_after_s')::float8));
        UPDATE tenantry.webhook_endpoints e SET
               window_started_at = w_started,
               window_attempts = w_attempts,
               window_failures = w_failures,
               circuit_failures = streak,
               last_success_at = coalesce(ep.last_ok, e.last_success_at),
               failing_since = failing,
               circuit_state = new_state,
               circuit_opened_at = CASE WHEN new_state = 'open' AND e.circuit_state <> 'open'
                                        THEN now() ELSE e.circuit_opened_at END,
               circuit_retry_at = CASE
                   WHEN new_state = 'open' AND e.circuit_state <> 'open'
                       THEN now() + make_interval(secs => (cfg ->> 'cooldown_s')::float8)
                   WHEN new_state = 'closed' THEN NULL
                   ELSE e.circuit_retry_at END,
               enabled = e.enabled AND NOT disable,
               disabled_at = CASE WHEN e.enabled AND disable THEN now() ELSE e.disabled_at END,
               disabled_reason = CASE
                   WHEN NOT (e.enabled AND disable) THEN e.disabled_reason
                   WHEN ep.gone THEN 'the endpoint answered 410 Gone'
                   ELSE 'no successful delivery since '
                        || to_char(failing AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') END,
               updated_at = now()
         WHERE e.tenant_id = ep.tenant_id AND e.id = ep.endpoint_id
        RETURNING e.* INTO after;

        event := CASE
            WHEN before.enabled AND NOT after.enabled THEN 'webhook.endpoint.disabled'
            -- From closed only: a failed probe sends a half-open circuit back to open,
            -- which is no news (and, once a cool-down, would be news every cool-down).
            WHEN before.circuit_state = 'closed' AND after.circuit_state = 'open'
                THEN 'webhook.endpoint.circuit_opened'
            WHEN before.circuit_state <> 'closed' AND after.circuit_state = 'closed'
                THEN 'webhook.endpoint.circuit_closed'
        END;
        IF event IS NOT NULL THEN
            PERFORM tenantry.emit(ep.tenant_id, 'webhook_endpoint', ep.endpoint_id::text, event,
                jsonb_build_object(
                    'endpoint_id', ep.endpoint_id, 'url', after.url,
                    'circuit', after.circuit_state,
                    'consecutive_failures', after.circuit_failures,
                    'reason', after.disabled_reason));
        END IF;
    END LOOP;
    RETURN left_out;
END;
$$;

-- Record finished attempts (webhook_record_leaving_held), then claim up to `max_rows`
-- due deliveries (webhook_claim), in one transaction: a deliverer takes the places its
-- record freed in the same round trip, instead of a claim of its own after it (one
-- round trip and one claim fewer per batch; bench.webhooks made 1.4-1.7 claims per
-- record).  The claim only if the claims' lock is free at once: a record that waited
-- (for a delivery's row) must not hold up every claim meanwhile.  Returns the
-- claimed deliveries (`left_out` false), then a row for each delivery whose result
-- the record left out (`left_out` true, only `id` set).  No claimed row back:
-- nothing was due, or the claim did not run; the caller claims on its own then.
-- `max_rows` 0: only the record.
CREATE OR REPLACE FUNCTION tenantry.webhook_record_leaving_held_and_claim(
    owner text, results jsonb, cfg jsonb, max_rows integer, pivot uuid,
    max_in_flight integer, default_timeout integer, lease_margin integer,
    tenant_in_flight integer
)
RETURNS TABLE (
    left_out boolean,
    tenant_id uuid, id uuid, endpoint_id uuid, event_id bigint, event_type text,
    body text, attempts integer, url text, headers jsonb, secret bytea,
    previous_secret bytea, timeout_seconds integer, retry_schedule integer[], probe boolean
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off  -- see the head of jobs/functions.sql
AS $$
DECLARE
    later uuid[];
BEGIN
    later := tenantry.webhook_record_leaving_held(owner, results, cfg);
    IF max_rows > 0
       AND pg_try_advisory_xact_lock(32335, hashtext('tenantry.webhook_claim')) THEN
        RETURN QUERY SELECT false, c.* FROM tenantry.webhook_claim(
            owner, max_rows, pivot, max_in_flight, default_timeout, lease_margin,
            tenant_in_flight) c;
    END IF;
    RETURN QUERY SELECT true, NULL::uuid, l.id, NULL::uuid, NULL::bigint, NULL::text,
                        NULL::text, NULL::integer, NULL::text, NULL::jsonb, NULL::bytea,
                        NULL::bytea, NULL::integer, NULL::integer[], NULL::boolean
                   FROM unnest(later) l(id);
END;
$$;

-- The calls of the version before (webhook functions v19), kept with their shapes for
-- its processes still running while a newer one has migrated (a rolling deploy): they
-- wait for their endpoints' rows, as that version did, so that they leave nothing out
-- (that version would take a result left out for one recorded).  webhook_record's
-- count is not kept (that version read none).
DROP FUNCTION IF EXISTS tenantry.webhook_record(text, jsonb, jsonb);  -- v20-v22's shape
CREATE FUNCTION tenantry.webhook_record(owner text, results jsonb, cfg jsonb)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off  -- see the head of jobs/functions.sql
AS $$
BEGIN
    PERFORM 1 FROM tenantry.webhook_endpoints e
     WHERE (e.tenant_id, e.id) IN (SELECT (x ->> 'tenant_id')::uuid,
                                          (x ->> 'endpoint_id')::uuid
                                     FROM jsonb_array_elements(results) x)
     ORDER BY e.tenant_id, e.id
       FOR UPDATE;
    PERFORM tenantry.webhook_record_leaving_held(owner, results, cfg);
    RETURN NULL;
END;
$$;

DROP FUNCTION IF EXISTS tenantry.webhook_record_and_claim(
    text, jsonb, jsonb, integer, uuid, integer, integer, integer, integer);
CREATE FUNCTION tenantry.webhook_record_and_claim(
    owner text, results jsonb, cfg jsonb, max_rows integer, pivot uuid,
    max_in_flight integer, default_timeout integer, lease_margin integer,
    tenant_in_flight integer
)
RETURNS TABLE (
    tenant_id uuid, id uuid, endpoint_id uuid, event_id bigint, event_type text,
    body text, attempts integer, url text, headers jsonb, secret bytea,
    previous_secret bytea, timeout_seconds integer, retry_schedule integer[], probe boolean
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off  -- see the head of jobs/functions.sql
AS $$
BEGIN
    PERFORM tenantry.webhook_record(owner, results, cfg);
    IF max_rows > 0
       AND pg_try_advisory_xact_lock(32335, hashtext('tenantry.webhook_claim')) THEN
        RETURN QUERY SELECT * FROM tenantry.webhook_claim(
            owner, max_rows, pivot, max_in_flight, default_timeout, lease_margin,
            tenant_in_flight);
    END IF;
END;
$$;

-- Deliveries whose lease ran out (the sending process stopped mid-attempt) go back to
-- pending, due now, with an `interrupted` attempt on record; one that has used every
-- attempt of its schedule is dead-lettered.  Pending deliveries of an endpoint that
-- no longer exists are cancelled with the reason (a fan-out that raced the deletion).
-- Returns the number of deliveries changed.
CREATE OR REPLACE FUNCTION tenantry.webhook_rescue(default_attempts integer, max_rows integer)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
    m integer;
BEGIN
    WITH expired AS (
        -- Whether the schedule is used up, and the URL for the record, once per row.
        SELECT d.tenant_id, d.id, coalesce(e.url, '') AS url,
               d.attempts >= coalesce(cardinality(e.retry_schedule), default_attempts)
                   AS exhausted
          FROM tenantry.webhook_deliveries d
          LEFT JOIN tenantry.webhook_endpoints e
                 ON e.tenant_id = d.tenant_id AND e.id = d.endpoint_id
         WHERE d.state = 'sending' AND d.lease_until < now()
         ORDER BY d.lease_until
         LIMIT max_rows
           FOR UPDATE OF d SKIP LOCKED
    ), moved AS (
        UPDATE tenantry.webhook_deliveries d
           SET state = CASE WHEN x.exhausted THEN 'dead' ELSE 'pending' END,
               reason = CASE WHEN x.exhausted THEN 'exhausted' END,
               finished_at = CASE WHEN x.exhausted THEN now() END,
               next_attempt_at = now(), last_error = 'interrupted: the sending process stopped',
               lease_until = NULL, lease_owner = NULL, updated_at = now()
          FROM expired x
         WHERE d.tenant_id = x.tenant_id AND d.id = x.id
        RETURNING d.tenant_id, d.id, d.endpoint_id, d.attempts, x.url
    )
    INSERT INTO tenantry.webhook_attempts
           (tenant_id, delivery_id, endpoint_id, attempt, attempted_at, url, result,
            request_headers, request_body, duration_ms, error_class, error)
    SELECT m.tenant_id, m.id, m.endpoint_id, m.attempts, now(), m.url,
           'interrupted', '{}', '', 0, 'interrupted',
           'the process sending this attempt stopped before it recorded the outcome'
      FROM moved m;
    GET DIAGNOSTICS n = ROW_COUNT;

    UPDATE tenantry.webhook_deliveries d
       SET state = 'cancelled', reason = 'endpoint_deleted', finished_at = now(),
           updated_at = now()
     WHERE d.ctid = ANY (ARRAY(
           SELECT x.ctid FROM tenantry.webhook_deliveries x
            WHERE x.state = 'pending'
              AND NOT EXISTS (SELECT 1 FROM tenantry.webhook_endpoints e
                               WHERE e.tenant_id = x.tenant_id AND e.id = x.endpoint_id)
            LIMIT max_rows));
    GET DIAGNOSTICS m = ROW_COUNT;
    RETURN n + m;
END;
$$;

-- Retention: attempts older than `retention_days` (except those of dead deliveries,
-- kept until discarded), and delivered or cancelled deliveries finished that long
-- ago; a bounded batch per call.
CREATE OR REPLACE FUNCTION tenantry.webhook_prune(retention_days integer, max_rows integer)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
    m integer;
BEGIN
    IF retention_days IS NULL OR retention_days < 1 THEN
        RAISE EXCEPTION 'tenantry.webhook_prune: retention_days must be >= 1'
            USING ERRCODE = '22023';
    END IF;
    DELETE FROM tenantry.webhook_attempts a
     WHERE a.ctid = ANY (ARRAY(
           SELECT x.ctid FROM tenantry.webhook_attempts x
            WHERE x.attempted_at < now() - make_interval(days => retention_days)
              AND NOT EXISTS (SELECT 1 FROM tenantry.webhook_deliveries d
                               WHERE d.tenant_id = x.tenant_id AND d.id = x.delivery_id
                                 AND d.state = 'dead')
            ORDER BY x.attempted_at
            LIMIT max_rows));
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM tenantry.webhook_deliveries d
     WHERE d.ctid = ANY (ARRAY(
           SELECT x.ctid FROM tenantry.webhook_deliveries x
            WHERE x.state IN ('delivered', 'cancelled')
              AND x.finished_at < now() - make_interval(days => retention_days)
            ORDER BY x.finished_at
            LIMIT max_rows));
    GET DIAGNOSTICS m = ROW_COUNT;
    RETURN n + m;
END;
$$;

-- The operator's views and actions across tenants (`tenantry webhooks ...`).  Only
-- tenantry_operator may call them.

-- Deliveries newest first, filtered (NULL: any).
CREATE OR REPLACE FUNCTION tenantry.webhook_ops_deliveries(
    state text, tenant uuid, endpoint uuid, event_type text, max_rows integer
)
RETURNS TABLE (id uuid, tenant_id uuid, endpoint_id uuid, event_id bigint, event_type text,
               state text, attempts integer, next_attempt_at timestamptz,
               last_status integer, last_error text, reason text, created_at timestamptz,
               updated_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
SELECT d.id, d.tenant_id, d.endpoint_id, d.event_id, d.event_type, d.state, d.attempts,
       d.next_attempt_at, d.last_status, d.last_error, d.reason, d.created_at, d.updated_at
  FROM tenantry.webhook_deliveries d
 WHERE ($1 IS NULL OR d.state = $1) AND ($2 IS NULL OR d.tenant_id = $2)
   AND ($3 IS NULL OR d.endpoint_id = $3) AND ($4 IS NULL OR d.event_type = $4)
 ORDER BY d.updated_at DESC, d.id
 LIMIT $5
$$;

-- One delivery with its body and every attempt (oldest first), as JSON.
CREATE OR REPLACE FUNCTION tenantry.webhook_ops_delivery(delivery uuid)
RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
SELECT to_jsonb(d) - 'lease_owner'
       || jsonb_build_object('attempt_log', coalesce(
              (SELECT jsonb_agg(to_jsonb(a) - 'tenant_id' ORDER BY a.id)
                 FROM tenantry.webhook_attempts a
                WHERE a.tenant_id = d.tenant_id AND a.delivery_id = d.id), '[]'::jsonb))
  FROM tenantry.webhook_deliveries d
 WHERE d.id = $1
$$;

-- The deliveries an operator's replay or discard selects: the one `delivery`, or every
-- one the filter selects (NULL: any), in a state the action starts from (replay: dead,
-- cancelled or delivered, and only while its endpoint exists; discard: dead).  One
-- definition for the count shown first and the action taken after it.
CREATE OR REPLACE FUNCTION tenantry.webhook_ops_matching(
    action text, delivery uuid, state text, tenant uuid, endpoint uuid, event_type text
)
RETURNS TABLE (tenant_id uuid, id uuid)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
SELECT d.tenant_id, d.id
  FROM tenantry.webhook_deliveries d
 WHERE d.state = ANY (CASE $1 WHEN 'replay' THEN ARRAY['dead', 'cancelled', 'delivered']
                              WHEN 'discard' THEN ARRAY['dead'] END)
   AND ($2 IS NULL OR d.id = $2) AND ($3 IS NULL OR d.state = $3)
   AND ($4 IS NULL OR d.tenant_id = $4) AND ($5 IS NULL OR d.endpoint_id = $5)
   AND ($6 IS NULL OR d.event_type = $6)
   AND ($1 <> 'replay' OR EXISTS (
           SELECT 1 FROM tenantry.webhook_endpoints e
            WHERE e.tenant_id = d.tenant_id AND e.id = d.endpoint_id))
$$;

-- Replay (send again now, with a fresh schedule) or discard (a dead delivery becomes
-- cancelled, reason `discarded`: its record stays for the retention period) what
-- webhook_ops_matching selects; with `only_count`, how many, changing nothing.
CREATE OR REPLACE FUNCTION tenantry.webhook_ops_act(
    action text, delivery uuid, state text, tenant uuid, endpoint uuid, event_type text,
    only_count boolean
)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n integer;
BEGIN
    IF action IS NULL OR action NOT IN ('replay', 'discard') THEN
        RAISE EXCEPTION 'tenantry.webhook_ops_act: action must be replay or discard'
            USING ERRCODE = '22023';
    END IF;
    IF only_count THEN
        SELECT count(*) INTO n FROM tenantry.webhook_ops_matching($1, $2, $3, $4, $5, $6);
        RETURN n;
    END IF;
    UPDATE tenantry.webhook_deliveries d
       SET state = CASE action WHEN 'replay' THEN 'pending' ELSE 'cancelled' END,
           attempts = CASE action WHEN 'replay' THEN 0 ELSE d.attempts END,
           next_attempt_at = CASE action WHEN 'replay' THEN now() ELSE d.next_attempt_at END,
           reason = CASE action WHEN 'replay' THEN NULL ELSE 'discarded' END,
           finished_at = CASE action WHEN 'replay' THEN NULL ELSE now() END,
           updated_at = now()
      FROM tenantry.webhook_ops_matching($1, $2, $3, $4, $5, $6) m
     WHERE d.tenant_id = m.tenant_id AND d.id = m.id
       -- Checked again on the row as it is now: a delivery another action or a
       -- deliverer changed since the match keeps its new state.
       AND d.state = ANY (CASE action WHEN 'replay' THEN ARRAY['dead', 'cancelled', 'delivered']
                                      ELSE ARRAY['dead'] END);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF action = 'replay' AND n > 0 THEN
        PERFORM pg_notify('tenantry_webhooks', 'deliveries');
    END IF;
    RETURN n;
END;
$$;

-- Endpoints across tenants, with their circuit and health.
CREATE OR REPLACE FUNCTION tenantry.webhook_ops_endpoints(tenant uuid, max_rows integer)
RETURNS TABLE (id uuid, tenant_id uuid, url text, enabled boolean, disabled_reason text,
               circuit_state text, circuit_failures integer, last_success_at timestamptz,
               failing_since timestamptz, created_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
SELECT e.id, e.tenant_id, e.url, e.enabled, e.disabled_reason, e.circuit_state,
       e.circuit_failures, e.last_success_at, e.failing_since, e.created_at
  FROM tenantry.webhook_endpoints e
 WHERE $1 IS NULL OR e.tenant_id = $1
 ORDER BY e.created_at DESC, e.id
 LIMIT $2
$$;

-- Deliveries waiting, in flight and dead, and endpoints disabled or with an open
-- circuit (the partial indexes make the first three cheap).
CREATE OR REPLACE FUNCTION tenantry.webhook_ops_stats()
RETURNS TABLE (pending bigint, sending bigint, dead bigint, open_circuits bigint,
               disabled_endpoints bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
SELECT (SELECT count(*) FROM tenantry.webhook_deliveries d WHERE d.state = 'pending'),
       (SELECT count(*) FROM tenantry.webhook_deliveries d WHERE d.state = 'sending'),
       (SELECT count(*) FROM tenantry.webhook_deliveries d WHERE d.state = 'dead'),
       (SELECT count(*) FROM tenantry.webhook_endpoints e WHERE e.circuit_state <> 'closed'),
       (SELECT count(*) FROM tenantry.webhook_endpoints e WHERE NOT e.enabled)
$$;

-- The webhooks' numbers for the metrics, cheap at any size: deliveries waiting, in
-- flight and dead counted up to `cap` each (ranges of the partial indexes), endpoints
-- with an open or half-open circuit, and disabled ones.
CREATE OR REPLACE FUNCTION tenantry.webhook_gauges(cap integer)
RETURNS TABLE (pending bigint, sending bigint, dead bigint, open_circuits bigint,
               disabled_endpoints bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
SELECT (SELECT count(*) FROM (SELECT 1 FROM tenantry.webhook_deliveries d
                               WHERE d.state = 'pending' LIMIT $1) x),
       (SELECT count(*) FROM (SELECT 1 FROM tenantry.webhook_deliveries d
                               WHERE d.state = 'sending' LIMIT $1) x),
       (SELECT count(*) FROM (SELECT 1 FROM tenantry.webhook_deliveries d
                               WHERE d.state = 'dead' LIMIT $1) x),
       (SELECT count(*) FROM tenantry.webhook_endpoints e WHERE e.circuit_state <> 'closed'),
       (SELECT count(*) FROM tenantry.webhook_endpoints e WHERE NOT e.enabled)
$$;

ALTER FUNCTION tenantry.webhook_matches(text[], text) OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.webhook_body(text, jsonb, timestamptz) OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.webhook_fan_out() OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_fanout_lag(integer) OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_claim(text, integer, uuid, integer, integer, integer, integer)
    OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_results(jsonb) OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.webhook_record(text, jsonb, jsonb) OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_record_and_claim(
    text, jsonb, jsonb, integer, uuid, integer, integer, integer, integer)
    OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_record_leaving_held(text, jsonb, jsonb)
    OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_record_leaving_held_and_claim(
    text, jsonb, jsonb, integer, uuid, integer, integer, integer, integer)
    OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_rescue(integer, integer) OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_prune(integer, integer) OWNER TO tenantry_system;
REVOKE ALL ON FUNCTION tenantry.webhook_fan_out(),
                       tenantry.webhook_fanout_lag(integer),
                       tenantry.webhook_claim(text, integer, uuid, integer, integer, integer, integer),
                       tenantry.webhook_record(text, jsonb, jsonb),
                       tenantry.webhook_record_and_claim(
                           text, jsonb, jsonb, integer, uuid, integer, integer, integer, integer),
                       tenantry.webhook_record_leaving_held(text, jsonb, jsonb),
                       tenantry.webhook_record_leaving_held_and_claim(
                           text, jsonb, jsonb, integer, uuid, integer, integer, integer, integer),
                       tenantry.webhook_rescue(integer, integer),
                       tenantry.webhook_prune(integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.webhook_matches(text[], text),
                          tenantry.webhook_body(text, jsonb, timestamptz)
    TO tenantry_service, tenantry_system;
REVOKE ALL ON FUNCTION tenantry.webhook_results(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.webhook_results(jsonb) TO tenantry_system;
GRANT EXECUTE ON FUNCTION tenantry.webhook_fan_out(),
                          tenantry.webhook_fanout_lag(integer),
                          tenantry.webhook_claim(text, integer, uuid, integer, integer, integer, integer),
                          tenantry.webhook_record(text, jsonb, jsonb),
                          tenantry.webhook_record_and_claim(
                              text, jsonb, jsonb, integer, uuid, integer, integer, integer,
                              integer),
                          tenantry.webhook_record_leaving_held(text, jsonb, jsonb),
                          tenantry.webhook_record_leaving_held_and_claim(
                              text, jsonb, jsonb, integer, uuid, integer, integer, integer,
                              integer),
                          tenantry.webhook_rescue(integer, integer),
                          tenantry.webhook_prune(integer, integer)
    TO tenantry_worker;
GRANT EXECUTE ON FUNCTION tenantry.webhook_fanout_lag(integer) TO tenantry_operator;
ALTER FUNCTION tenantry.webhook_ops_deliveries(text, uuid, uuid, text, integer)
    OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_ops_delivery(uuid) OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_ops_matching(text, uuid, text, uuid, uuid, text)
    OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_ops_act(text, uuid, text, uuid, uuid, text, boolean)
    OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_ops_endpoints(uuid, integer) OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_ops_stats() OWNER TO tenantry_system;
ALTER FUNCTION tenantry.webhook_gauges(integer) OWNER TO tenantry_system;
REVOKE ALL ON FUNCTION tenantry.webhook_gauges(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.webhook_gauges(integer) TO tenantry_worker;
REVOKE ALL ON FUNCTION tenantry.webhook_ops_deliveries(text, uuid, uuid, text, integer),
                       tenantry.webhook_ops_delivery(uuid),
                       tenantry.webhook_ops_matching(text, uuid, text, uuid, uuid, text),
                       tenantry.webhook_ops_act(text, uuid, text, uuid, uuid, text, boolean),
                       tenantry.webhook_ops_endpoints(uuid, integer),
                       tenantry.webhook_ops_stats()
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.webhook_ops_deliveries(text, uuid, uuid, text, integer),
                          tenantry.webhook_ops_delivery(uuid),
                          tenantry.webhook_ops_act(text, uuid, text, uuid, uuid, text, boolean),
                          tenantry.webhook_ops_endpoints(uuid, integer),
                          tenantry.webhook_ops_stats()
    TO tenantry_operator;

REVOKE CREATE ON SCHEMA tenantry FROM tenantry_system;
