-- 0007: operations.  Queue controls that every process's claim respects, and the
-- operators of the dashboard with their sign-in links and sessions.  The functions live
-- in the repeatable tenantry/jobs/functions.sql (queue controls: the jobs module owns
-- that table, since its claim reads it) and tenantry/ops/functions.sql (operators,
-- sessions, the audit trail).  Neither table holds tenant data: no row-level security;
-- only tenantry_system reads or writes them, through those functions.

-- A queue's controls, one row per queue an operator touched (no row: not paused, each
-- process's own concurrency).  A row in the database, not a process flag, so that a
-- pause holds in every process, including those started after it.
CREATE TABLE tenantry.queue_controls (
    queue       text        PRIMARY KEY,
    paused      boolean     NOT NULL DEFAULT false,
    -- Jobs of this queue each process runs at once; NULL: the process's own setting
    -- (TENANTRY_QUEUES).
    concurrency integer,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text        NOT NULL,
    -- Any name a job's queue may have (tenantry.jobs: 1 to 100 characters).
    CONSTRAINT queue_controls_queue CHECK (length(queue) BETWEEN 1 AND 100),
    CONSTRAINT queue_controls_concurrency CHECK (concurrency BETWEEN 1 AND 10000)
);

-- Operators of the dashboard.  A key is kept only as its SHA-256 (keys are 256 random
-- bits: a slow hash buys nothing against guessing, and a lookup by hash is one probe).
CREATE TABLE tenantry.operators (
    name        text        PRIMARY KEY,
    role        text        NOT NULL,
    key_hash    bytea       NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz,
    CONSTRAINT operators_name CHECK (name ~ '^[A-Za-z0-9_.@-]{1,100}$'),
    CONSTRAINT operators_role CHECK (role IN ('read', 'admin'))
);

-- One-time sign-in links (`tenantry operators link`, and what `make run` prints): the
-- token's hash, used once, within minutes.
CREATE TABLE tenantry.operator_links (
    token_hash  bytea       PRIMARY KEY,
    operator    text        NOT NULL REFERENCES tenantry.operators (name) ON DELETE CASCADE,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX operator_links_operator_idx ON tenantry.operator_links (operator);

-- Signed-in browsers: the cookie's hash, and the CSRF token every action must carry.
CREATE TABLE tenantry.operator_sessions (
    token_hash  bytea       PRIMARY KEY,
    operator    text        NOT NULL REFERENCES tenantry.operators (name) ON DELETE CASCADE,
    csrf        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX operator_sessions_operator_idx ON tenantry.operator_sessions (operator);
CREATE INDEX operator_sessions_expires_idx ON tenantry.operator_sessions (expires_at);

GRANT SELECT, INSERT, UPDATE, DELETE
   ON tenantry.queue_controls, tenantry.operators, tenantry.operator_links,
      tenantry.operator_sessions
   TO tenantry_system;

ALTER TABLE tenantry.queue_controls OWNER TO tenantry_owner;
ALTER TABLE tenantry.operators OWNER TO tenantry_owner;
ALTER TABLE tenantry.operator_links OWNER TO tenantry_owner;
ALTER TABLE tenantry.operator_sessions OWNER TO tenantry_owner;

-- The dashboard pages the dead jobs newest first by (died_at, id), across tenants.
CREATE INDEX dead_jobs_newest_idx ON tenantry.dead_jobs (died_at DESC, id DESC);

-- The dashboard's periodic page reads when each handler last ran.
GRANT SELECT ON tenantry.periodic_runs TO tenantry_system;
