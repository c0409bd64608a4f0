-- 0002: tenancy.  Roles, the tenant tables, row-level security on every tenant table
-- (the queue's included), and the few cross-tenant paths as SECURITY DEFINER functions.
--
-- Roles are cluster-wide, so this migration creates them only when missing (another
-- database of the same cluster may have created them, or be creating them right now):
--   tenantry_owner     NOLOGIN; owns the schema and every table.  Under FORCE ROW LEVEL
--                      SECURITY even the owner sees only the current tenant's rows.
--   tenantry_system    NOLOGIN, BYPASSRLS; owns the SECURITY DEFINER functions of the
--                      cross-tenant paths and nothing else.
--   tenantry_service   NOLOGIN; what tenant code may do: read and write the tenant
--                      tables, under the policies.  No cross-tenant function.
--   tenantry_worker    NOLOGIN; the worker's cross-tenant functions (claim, the batch
--                      statements on its leased jobs, rescue, pruning).
--   tenantry_operator  NOLOGIN; statistics and the dead-letter commands.
-- The logins are created by `tenantry migrate` from the URLs (names and passwords are
-- configuration, not schema): DATABASE_URL's user gets tenantry_service, the worker's
-- (TENANTRY_WORKER_URL) tenantry_worker and tenantry_operator.  Two logins, so that no
-- connection tenant code runs on (a handler's, an HTTP request's) can call a function
-- that sees across tenants.

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM (VALUES
        ('tenantry_owner', 'NOLOGIN'),
        ('tenantry_system', 'NOLOGIN BYPASSRLS'),
        ('tenantry_service', 'NOLOGIN'),
        ('tenantry_worker', 'NOLOGIN'),
        ('tenantry_operator', 'NOLOGIN')) AS v(name, options)
    LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r.name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I %s', r.name, r.options);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created concurrently by a migration of another database
            END;
        END IF;
    END LOOP;
    IF NOT (SELECT rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = 'tenantry_system') THEN
        RAISE EXCEPTION 'role tenantry_system exists without BYPASSRLS'
            USING HINT = 'ALTER ROLE tenantry_system BYPASSRLS (as a superuser), then migrate again';
    END IF;
    -- A migrating role that is not a superuser (a managed service's admin) must be a
    -- member of the roles it hands objects to (on PostgreSQL 16+ it is already, with
    -- ADMIN, for roles it created itself), and the new owner of a schema needs CREATE
    -- on the database.
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        IF NOT pg_catalog.pg_has_role(current_user, 'tenantry_owner', 'USAGE') THEN
            EXECUTE format('GRANT tenantry_owner TO %I', current_user);
        END IF;
        IF NOT pg_catalog.pg_has_role(current_user, 'tenantry_system', 'USAGE') THEN
            EXECUTE format('GRANT tenantry_system TO %I', current_user);
        END IF;
        EXECUTE format('GRANT CREATE ON DATABASE %I TO tenantry_owner', current_database());
    END IF;
END;
$$;

-- The queue's objects, created by 0001 as the migrating role, move to the owner role.
ALTER SCHEMA tenantry OWNER TO tenantry_owner;
ALTER TABLE tenantry.schema_migrations OWNER TO tenantry_owner;
ALTER TABLE tenantry.jobs OWNER TO tenantry_owner;
ALTER TABLE tenantry.dead_jobs OWNER TO tenantry_owner;
ALTER TABLE tenantry.job_counters OWNER TO tenantry_owner;
ALTER TABLE tenantry.periodic_runs OWNER TO tenantry_owner;
ALTER TABLE tenantry.notify_throttle OWNER TO tenantry_owner;
ALTER TYPE tenantry.job_state OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.notify_throttled(text, text, integer) OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.jobs_notify() OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.enqueue(uuid, text, jsonb, text, timestamptz, smallint, text, integer)
    OWNER TO tenantry_owner;

-- Job ids come from the sequence only: a tenant choosing the id of another tenant's job
-- would make the operator commands (by id) ambiguous.
ALTER TABLE tenantry.jobs ALTER COLUMN id SET GENERATED ALWAYS;

-- Nothing in the schema is anyone's by default: functions are executable by PUBLIC
-- unless revoked, and a schema created by a superuser may carry its default grants.
REVOKE ALL ON SCHEMA tenantry FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA tenantry FROM PUBLIC;

-- Tenants.  The id is the tenant id of every tenant-owned row.  The slug is a public
-- handle (a sub-domain, say) and unique across tenants by design: whether a slug is
-- taken is the one fact about other tenants the service admits to.
CREATE TABLE tenantry.tenants (
    id         uuid        PRIMARY KEY,
    slug       text        NOT NULL,
    name       text        NOT NULL,
    plan       text        NOT NULL DEFAULT 'free',
    state      text        NOT NULL DEFAULT 'active',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tenants_not_system CHECK (id <> '00000000-0000-0000-0000-000000000000'),
    CONSTRAINT tenants_slug_format CHECK (slug ~ '^[a-z0-9]([a-z0-9-]{0,48}[a-z0-9])?$'),
    CONSTRAINT tenants_name_len CHECK (length(name) BETWEEN 1 AND 100),
    CONSTRAINT tenants_plan CHECK (plan IN ('free', 'pro')),
    CONSTRAINT tenants_state CHECK (state IN ('provisioning', 'active', 'suspended'))
);
CREATE UNIQUE INDEX tenants_slug_key ON tenantry.tenants (slug);

-- Tenant-owned tables: tenant_id leads every key, and every foreign key is composite,
-- so that neither a unique nor a foreign-key violation can reveal another tenant's row
-- (the database checks constraints without row-level security).
CREATE TABLE tenantry.users (
    tenant_id  uuid        NOT NULL REFERENCES tenantry.tenants (id) ON DELETE CASCADE,
    id         uuid        NOT NULL,
    email      text        NOT NULL,
    -- lower() is not leakproof: under row-level security a predicate on lower(email)
    -- would be applied as a filter after the policy, never as an index condition.  A
    -- stored column compared with plain equality (leakproof) is.
    email_normalized text  GENERATED ALWAYS AS (lower(email)) STORED,
    display_name text      NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT users_email_format CHECK (email ~ '^[^@\s]+@[^@\s]+$' AND length(email) <= 254)
);
CREATE UNIQUE INDEX users_email_key ON tenantry.users (tenant_id, email_normalized);

CREATE TABLE tenantry.workspaces (
    tenant_id  uuid        NOT NULL REFERENCES tenantry.tenants (id) ON DELETE CASCADE,
    id         uuid        NOT NULL,
    slug       text        NOT NULL,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT workspaces_slug_format CHECK (slug ~ '^[a-z0-9]([a-z0-9-]{0,48}[a-z0-9])?$')
);
CREATE UNIQUE INDEX workspaces_slug_key ON tenantry.workspaces (tenant_id, slug);

CREATE TABLE tenantry.roles (
    tenant_id   uuid        NOT NULL REFERENCES tenantry.tenants (id) ON DELETE CASCADE,
    name        text        NOT NULL,
    permissions text[]      NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name),
    CONSTRAINT roles_name_format CHECK (name ~ '^[a-z][a-z0-9_]{0,39}$')
);

CREATE TABLE tenantry.memberships (
    tenant_id    uuid        NOT NULL,
    workspace_id uuid        NOT NULL,
    user_id      uuid        NOT NULL,
    role         text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, workspace_id, user_id),
    FOREIGN KEY (tenant_id, workspace_id) REFERENCES tenantry.workspaces (tenant_id, id)
        ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, user_id) REFERENCES tenantry.users (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, role) REFERENCES tenantry.roles (tenant_id, name)
);
-- "Which workspaces is this user in", and the foreign key's delete check.
CREATE INDEX memberships_user_idx ON tenantry.memberships (tenant_id, user_id);
CREATE INDEX memberships_role_idx ON tenantry.memberships (tenant_id, role);

-- API keys: only a SHA-256 of the secret is stored.  The key names its tenant
-- (`tnt_<tenant hex>_<secret>`), so authenticating is an ordinary tenant-scoped lookup
-- under row-level security, not a cross-tenant search.  A fast hash is enough: the
-- secret is 256 random bits, not a password.
CREATE TABLE tenantry.api_keys (
    tenant_id   uuid        NOT NULL REFERENCES tenantry.tenants (id) ON DELETE CASCADE,
    id          bigint      GENERATED ALWAYS AS IDENTITY,
    name        text        NOT NULL DEFAULT '',
    secret_hash bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT api_keys_hash_len CHECK (length(secret_hash) = 32),
    CONSTRAINT api_keys_name_len CHECK (length(name) <= 100)
);
CREATE UNIQUE INDEX api_keys_secret_key ON tenantry.api_keys (tenant_id, secret_hash);

-- Who belongs where, for a tenant's screens.  security_invoker: the view reads the
-- tables with the caller's rights, so their policies apply (a view normally runs with
-- its owner's, which would bypass them).
CREATE VIEW tenantry.members WITH (security_invoker = true) AS
SELECT m.tenant_id, m.workspace_id, w.slug AS workspace_slug, m.user_id, u.email,
       u.display_name, m.role, m.created_at
  FROM tenantry.memberships m
  JOIN tenantry.workspaces w ON w.tenant_id = m.tenant_id AND w.id = m.workspace_id
  JOIN tenantry.users u ON u.tenant_id = m.tenant_id AND u.id = m.user_id;

ALTER TABLE tenantry.tenants OWNER TO tenantry_owner;
ALTER TABLE tenantry.users OWNER TO tenantry_owner;
ALTER TABLE tenantry.workspaces OWNER TO tenantry_owner;
ALTER TABLE tenantry.roles OWNER TO tenantry_owner;
ALTER TABLE tenantry.memberships OWNER TO tenantry_owner;
ALTER TABLE tenantry.api_keys OWNER TO tenantry_owner;
ALTER VIEW tenantry.members OWNER TO tenantry_owner;

-- Row-level security, the same on every tenant table.  The RESTRICTIVE policy is the
-- rule: the row's tenant must be the transaction's `app.tenant_id`.  Unset (or empty)
-- compares with NULL, so a missing context sees and writes nothing.  Restrictive
-- policies are ANDed with everything else, so a permissive policy added later can
-- never widen access.  PostgreSQL grants nothing without at least one permissive
-- policy, hence `tenant_rows`, which admits every row the restrictive one lets through.
-- The setting is read in a scalar subquery: evaluated once per statement (an InitPlan)
-- and so usable as an index condition on the tenant_id that leads every index.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES
        ('tenants', 'id'), ('users', 'tenant_id'), ('workspaces', 'tenant_id'),
        ('roles', 'tenant_id'), ('memberships', 'tenant_id'), ('api_keys', 'tenant_id'),
        ('jobs', 'tenant_id'), ('dead_jobs', 'tenant_id'), ('job_counters', 'tenant_id'))
        AS v(tab, col)
    LOOP
        EXECUTE format('ALTER TABLE tenantry.%I ENABLE ROW LEVEL SECURITY', t.tab);
        EXECUTE format('ALTER TABLE tenantry.%I FORCE ROW LEVEL SECURITY', t.tab);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON tenantry.%I AS RESTRICTIVE FOR ALL TO PUBLIC'
            ' USING (%I = (SELECT nullif(current_setting(''app.tenant_id'', true), '''')::uuid))'
            ' WITH CHECK (%I = (SELECT nullif(current_setting(''app.tenant_id'', true), '''')::uuid))',
            t.tab, t.col, t.col);
        EXECUTE format(
            'CREATE POLICY tenant_rows ON tenantry.%I AS PERMISSIVE FOR ALL TO PUBLIC'
            ' USING (true) WITH CHECK (true)', t.tab);
    END LOOP;
END;
$$;

-- The service's privileges.  Row-level security decides which rows.
GRANT USAGE ON SCHEMA tenantry
   TO tenantry_service, tenantry_system, tenantry_worker, tenantry_operator;
GRANT SELECT ON tenantry.schema_migrations
   TO tenantry_service, tenantry_worker, tenantry_operator;
GRANT SELECT, INSERT, UPDATE, DELETE
   ON tenantry.tenants, tenantry.users, tenantry.workspaces, tenantry.roles,
      tenantry.memberships, tenantry.api_keys, tenantry.jobs, tenantry.job_counters
   TO tenantry_service;
-- Only the worker's bury writes dead jobs.
GRANT SELECT, DELETE ON tenantry.dead_jobs TO tenantry_service;
GRANT SELECT ON tenantry.members TO tenantry_service;
-- Not tenant data: handler names and wake-up timestamps.
GRANT SELECT, INSERT, UPDATE ON tenantry.periodic_runs TO tenantry_service;
GRANT SELECT, INSERT, UPDATE ON tenantry.notify_throttle TO tenantry_service, tenantry_system;
GRANT EXECUTE ON FUNCTION tenantry.notify_throttled(text, text, integer)
   TO tenantry_service, tenantry_system;
GRANT EXECUTE ON FUNCTION
   tenantry.enqueue(uuid, text, jsonb, text, timestamptz, smallint, text, integer)
   TO tenantry_service;
-- What the cross-tenant functions below touch, and nothing more.
GRANT SELECT, INSERT, UPDATE, DELETE ON tenantry.jobs, tenantry.dead_jobs, tenantry.job_counters
   TO tenantry_system;

-- The cross-tenant paths.  Each is one statement (a test EXPLAINs the bodies), owned by
-- tenantry_system, executable by tenantry_worker or tenantry_operator only, with a
-- fixed search_path.
-- None hands out rows for a caller to choose: the claim and the lease statements act
-- on the jobs this worker holds (`lease_owner`), rescue on expired leases, statistics
-- return counts, and the dead-letter commands act on one job by id for operators.
-- PL/pgSQL, not SQL functions: PL/pgSQL caches its plans on every supported version.
-- The worker's functions force generic plans.  Their statements are written so that
-- their plan does not depend on the values or on statistics (tests EXPLAIN their
-- generic plans under misleading statistics), and left to choose, PL/pgSQL re-planned
-- them on every call:
-- 0.16 ms per empty release against 0.06 ms with the generic plan (pgbench, PG 15),
-- about a tenth of a drain's throughput.

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
CREATE FUNCTION tenantry.claim_jobs(
    for_queue text, n integer, owner text, lease_s double precision, after_tenant uuid,
    tenant_cap integer, max_tenants integer)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, payload jsonb,
               priority smallint, attempts integer, max_attempts integer,
               created_at timestamptz, per_tenant integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
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
    SELECT w.tenant_id, w.np, w.run_at, w.id FROM walk w
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
),
claimed AS (
    UPDATE tenantry.jobs j
       SET state = 'running',
           attempts = j.attempts + 1,
           lease_owner = $3::text,
           lease_expires_at = now() + make_interval(secs => $4::double precision),
           started_at = now()
     WHERE j.ctid = ANY (ARRAY(SELECT p.tid FROM picked p))
    RETURNING j.tenant_id, j.id, j.queue, j.kind, j.payload, j.priority, j.attempts,
              j.max_attempts, j.created_at
)
SELECT c.tenant_id, c.id, c.queue, c.kind, c.payload, c.priority, c.attempts,
       c.max_attempts, c.created_at,
       -- How many rows each tenant could give: a tenant that gave fewer has no more
       -- runnable rows, so the worker knows whether to claim again.
       (SELECT s.per_tenant FROM share s)
  FROM claimed c;
END;
$$;

-- When the earliest delayed job of these queues becomes runnable (NULL: none waiting).
CREATE FUNCTION tenantry.next_due_job(queues text[])
RETURNS TABLE (due timestamptz, db_now timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
SELECT min(j.run_at), now()
  FROM tenantry.jobs j
 WHERE j.state = 'queued' AND j.queue = ANY ($1::text[]) AND j.run_at > now()
   -- Implied (created_at <= now() < run_at); lets jobs_due_idx serve it.
   AND j.run_at > j.created_at;
END;
$$;

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

-- Success: the rows leave the hot table and become counters.  Only the lease holder
-- may complete (a rescued job belongs to whoever holds it now).  Counter rows are
-- upserted in key order so concurrent batches cannot deadlock.
CREATE FUNCTION tenantry.complete_jobs(tenant_ids uuid[], ids bigint[], owner text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
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
SELECT d.tenant_id, d.queue, d.kind, date_trunc('minute', now()), count(*)
  FROM done d
 GROUP BY d.tenant_id, d.queue, d.kind
 ORDER BY d.tenant_id, d.queue, d.kind
ON CONFLICT (tenant_id, queue, kind, minute)
DO UPDATE SET succeeded = c.succeeded + excluded.succeeded;
END;
$$;

-- Retry (an attempt used, error recorded) or snooze (attempt refunded, no error).
CREATE FUNCTION tenantry.requeue_jobs(
    tenant_ids uuid[], ids bigint[], run_ats timestamptz[], errors text[],
    error_objs jsonb[], refunds boolean[], owner text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
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
SELECT m.tenant_id, m.queue, m.kind, date_trunc('minute', now()), count(*)
  FROM moved m
 WHERE m.failed
 GROUP BY m.tenant_id, m.queue, m.kind
 ORDER BY m.tenant_id, m.queue, m.kind
ON CONFLICT (tenant_id, queue, kind, minute)
DO UPDATE SET failed = c.failed + excluded.failed;
END;
$$;

-- Dead-letter: move the rows, with every error, to dead_jobs.
CREATE FUNCTION tenantry.bury_jobs(
    tenant_ids uuid[], ids bigint[], errors text[], error_objs jsonb[], reasons text[],
    owner text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
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
    SELECT g.tenant_id, g.id, g.queue, g.kind, g.payload, g.priority, g.attempts,
           g.max_attempts, g.error, g.errors || jsonb_build_array(g.error_obj), g.dedup_key,
           g.reason, g.created_at
      FROM gone g
    -- A dead row under this id already (a job retried from the dead-letter table keeps
    -- its id, or a row restored by hand): the latest death replaces it.  Without this
    -- the batch would fail and be retried forever, holding up its other outcomes.
    ON CONFLICT (tenant_id, id) DO UPDATE
       SET queue = excluded.queue, kind = excluded.kind, payload = excluded.payload,
           priority = excluded.priority, attempts = excluded.attempts,
           max_attempts = excluded.max_attempts, last_error = excluded.last_error,
           errors = excluded.errors, dedup_key = excluded.dedup_key,
           reason = excluded.reason, created_at = excluded.created_at, died_at = now()
)
INSERT INTO tenantry.job_counters AS c (tenant_id, queue, kind, minute, failed, dead)
SELECT g.tenant_id, g.queue, g.kind, date_trunc('minute', now()), count(*), count(*)
  FROM gone g
 GROUP BY g.tenant_id, g.queue, g.kind
 ORDER BY g.tenant_id, g.queue, g.kind
ON CONFLICT (tenant_id, queue, kind, minute)
DO UPDATE SET failed = c.failed + excluded.failed, dead = c.dead + excluded.dead;
END;
$$;

-- Shutdown: hand unfinished jobs back at once, the interrupted attempt refunded.
CREATE FUNCTION tenantry.release_jobs(tenant_ids uuid[], ids bigint[], owner text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
WITH mine AS (
    SELECT (SELECT j.ctid FROM tenantry.jobs j
             WHERE j.tenant_id = d.tenant_id AND j.id = d.id
               AND j.lease_owner = $3::text) AS tid
      FROM unnest($1::uuid[], $2::bigint[]) AS d(tenant_id, id)
)
UPDATE tenantry.jobs j
   SET state = 'queued', run_at = now(), attempts = greatest(j.attempts - 1, 0),
       lease_owner = NULL, lease_expires_at = NULL, started_at = NULL
 WHERE j.ctid = ANY (ARRAY(SELECT m.tid FROM mine m));
END;
$$;

-- Heartbeat: returns the jobs whose lease this worker still holds.
CREATE FUNCTION tenantry.extend_job_leases(
    tenant_ids uuid[], ids bigint[], owner text, lease_s double precision)
RETURNS TABLE (tenant_id uuid, id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH mine AS (
    SELECT (SELECT j.ctid FROM tenantry.jobs j
             WHERE j.tenant_id = d.tenant_id AND j.id = d.id
               AND j.lease_owner = $3::text) AS tid
      FROM unnest($1::uuid[], $2::bigint[]) AS d(tenant_id, id)
), extended AS (
    UPDATE tenantry.jobs j
       SET lease_expires_at = now() + make_interval(secs => $4::double precision)
     WHERE j.ctid = ANY (ARRAY(SELECT m.tid FROM mine m))
    RETURNING j.tenant_id, j.id
)
SELECT e.tenant_id, e.id FROM extended e;
END;
$$;

-- A running job whose lease expired lost its worker: requeue it now; the lost attempt
-- counts (the claim already counted it) and is recorded as an error.  A job that has
-- used all its attempts is dead-lettered by the worker that claims it next.
CREATE FUNCTION tenantry.rescue_expired_jobs(max_rows integer)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, attempts integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH expired AS (
    SELECT j.tenant_id, j.id
      FROM tenantry.jobs j
     WHERE j.state = 'running' AND j.lease_expires_at < now()
     ORDER BY j.lease_expires_at
     LIMIT $1::integer
       FOR UPDATE SKIP LOCKED
), rescued AS (
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
)
SELECT r.tenant_id, r.id, r.queue, r.kind, r.attempts FROM rescued r;
END;
$$;

CREATE FUNCTION tenantry.prune_job_counters(retention_days integer)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n bigint;
BEGIN
IF retention_days IS NULL OR retention_days < 1 THEN
    RAISE EXCEPTION 'retention_days must be at least 1' USING ERRCODE = '22023';
END IF;
DELETE FROM tenantry.job_counters c
 WHERE c.minute < now() - make_interval(days => $1::integer);
GET DIAGNOSTICS n = ROW_COUNT;
RETURN n;
END;
$$;

-- Per-queue figures over all tenants: counts only, never rows.
CREATE FUNCTION tenantry.queue_stats()
RETURNS TABLE (queue text, available bigint, scheduled bigint, running bigint,
               retrying bigint, oldest_age_s double precision, succeeded_1h bigint,
               failed_1h bigint, dead bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
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
       coalesce(l.available, 0),
       coalesce(l.scheduled, 0),
       coalesce(l.running, 0),
       coalesce(l.retrying, 0),
       coalesce(l.oldest_age_s, 0),
       coalesce(r.succeeded_1h, 0),
       coalesce(r.failed_1h, 0),
       coalesce(d.dead, 0)
  FROM (SELECT l.queue FROM live l UNION SELECT r.queue FROM recent r
        UNION SELECT d.queue FROM dead d) q
  LEFT JOIN live l ON l.queue = q.queue
  LEFT JOIN recent r ON r.queue = q.queue
  LEFT JOIN dead d ON d.queue = q.queue
 ORDER BY q.queue;
END;
$$;

-- Operators: the dead-letter table across tenants (`tenantry dead ...`).
CREATE FUNCTION tenantry.dead_jobs_list(max_rows integer)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, attempts integer,
               reason text, last_error text, died_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
SELECT d.tenant_id, d.id, d.queue, d.kind, d.attempts, d.reason, d.last_error, d.died_at
  FROM tenantry.dead_jobs d
 ORDER BY d.died_at DESC, d.id DESC
 LIMIT $1::integer;
END;
$$;

CREATE FUNCTION tenantry.dead_job_show(job_id bigint)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, payload jsonb,
               priority smallint, attempts integer, max_attempts integer, last_error text,
               errors jsonb, dedup_key text, reason text, created_at timestamptz,
               died_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
SELECT d.tenant_id, d.id, d.queue, d.kind, d.payload, d.priority, d.attempts,
       d.max_attempts, d.last_error, d.errors, d.dedup_key, d.reason, d.created_at, d.died_at
  FROM tenantry.dead_jobs d
 WHERE d.id = $1::bigint;
END;
$$;

-- Back to the queue with fresh attempts; the error history stays with the row.
CREATE FUNCTION tenantry.dead_job_retry(job_id bigint)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
WITH gone AS (
    DELETE FROM tenantry.dead_jobs d WHERE d.id = $1::bigint
    RETURNING d.*
)
INSERT INTO tenantry.jobs AS j (tenant_id, id, queue, kind, payload, priority, max_attempts,
                                errors, dedup_key, created_at)
OVERRIDING SYSTEM VALUE
SELECT g.tenant_id, g.id, g.queue, g.kind, g.payload, g.priority, g.max_attempts, g.errors,
       g.dedup_key, g.created_at
  FROM gone g
RETURNING j.id INTO new_id;
RETURN new_id;
END;
$$;

CREATE FUNCTION tenantry.dead_job_discard(job_id bigint)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    gone_id bigint;
BEGIN
DELETE FROM tenantry.dead_jobs d WHERE d.id = $1::bigint RETURNING d.id INTO gone_id;
RETURN gone_id;
END;
$$;

-- Hand the functions to tenantry_system (which needs CREATE on the schema for that,
-- for the moment of the hand-over only), and each to the role that may call it.
GRANT CREATE ON SCHEMA tenantry TO tenantry_system;
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig, p.proname::text AS name
               FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'tenantry'::regnamespace AND p.prosecdef
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO tenantry_system', f.sig);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f.sig);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f.sig,
                       CASE WHEN f.name IN ('queue_stats', 'dead_jobs_list', 'dead_job_show',
                                            'dead_job_retry', 'dead_job_discard')
                            THEN 'tenantry_operator' ELSE 'tenantry_worker' END);
    END LOOP;
END;
$$;
REVOKE CREATE ON SCHEMA tenantry FROM tenantry_system;
