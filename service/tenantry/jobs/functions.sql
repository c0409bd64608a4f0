-- version: 21
-- The job queue's functions and triggers.  A repeatable migration (tenantry/migrate.py):
-- `tenantry migrate` applies this file again whenever it changes (raise the version
-- above with every change), so every statement of the queue is read and changed here.  The jobs module is the only writer of
-- tenantry.jobs, dead_jobs, job_counters, periodic_runs and notify_throttle.
--
-- The cross-tenant functions are SECURITY DEFINER, owned by tenantry_system (which
-- bypasses row-level security), executable by tenantry_worker (or tenantry_operator)
-- only, with a fixed search_path.  None hands out rows for a caller to choose: the
-- claim and the outcome statements act on the jobs this worker holds (`lease_owner`),
-- rescue on expired leases, statistics return counts, and the dead-letter commands
-- act on one job by id for operators.
--
-- Each function but the claim's driver runs one statement, written so that its plan
-- does not depend on the values or on statistics (tests EXPLAIN the statements of this
-- file under misleading statistics).  PL/pgSQL rather than SQL functions: PL/pgSQL
-- caches its plans on every supported version.  The worker's functions force generic
-- plans: left to choose, PL/pgSQL re-planned them on every call (0.16 ms against
-- 0.06 ms per empty release, pgbench on PostgreSQL 15: a tenth of a drain).
--
-- The functions on the hot paths (enqueue, the claims, outcomes, leases and rescue
-- here; the webhook claim, record and fan-out; emit, emit_many and outbox_follow; the
-- sign-up's accept, lock and run_steps) run with enable_seqscan off.  A connection keeps
-- a statement's plan until the table's statistics change, and a plan made while the
-- table had no pages, after a VACUUM or ANALYZE had found it empty (a first deploy's
-- VACUUM ANALYZE, a quiet queue emptied and vacuumed), costs a sequential scan at
-- nothing: kept through a burst, it read the whole table on every call until autovacuum
-- next analyzed it, up to a minute later (bench.webhooks: one deliverer's connection at
-- 0.8 of a core, 8 ms a claim, in half the runs; test_plans_on_small_tables.py).  Off,
-- the planner takes the index these statements are written for whatever the table's
-- size; a statement with no index to use still scans.  And with JIT off: before
-- PostgreSQL 18 such a scan is costed at 10^10, past jit_above_cost, and each call was
-- JIT-compiled (webhook_fan_out's idle pass, reading its one-row position table: 0.2 ->
-- 15 ms on PostgreSQL 15).
--
-- Job states: `scheduled` (due later: delayed, or waiting out a retry's backoff),
-- `queued` (runnable now), `running` (leased by a worker).  A scheduled job is staged
-- to `queued` when it falls due, so the claim only ever sees rows it can run.

-- The new owner of a function needs CREATE on its schema for the moment of the
-- hand-over; revoked at the end of this file.
GRANT CREATE ON SCHEMA tenantry TO tenantry_system;

-- Triggers are (re)created only when their definition changed.  CREATE and DROP
-- TRIGGER lock the table against every insert, and wait first for each open
-- transaction that touched it: re-applying this file for a function's sake would stall
-- every producer behind the longest transaction on the table.  The definition's md5 is
-- kept as the trigger's comment.  For this file and the other modules' (the outbox's).
CREATE OR REPLACE FUNCTION tenantry.ensure_trigger(
    on_table regclass, trigger_name name, definition text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tag text := 'definition md5 ' || md5(definition);
    held text;
BEGIN
    -- Created again, too, when it was disabled by hand: the file says it fires.  (Set
    -- to fire ALWAYS or on REPLICA sessions by an operator, it is left as it is.)
    SELECT obj_description(t.oid, 'pg_trigger') INTO held
      FROM pg_trigger t
     WHERE t.tgrelid = on_table AND t.tgname = trigger_name AND t.tgenabled <> 'D';
    IF FOUND AND held IS NOT DISTINCT FROM tag THEN
        RETURN;
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', trigger_name, on_table);
    EXECUTE definition;
    EXECUTE format('COMMENT ON TRIGGER %I ON %s IS %L', trigger_name, on_table, tag);
END;
$$;

-- --- Enqueue and wake-ups -------------------------------------------------------------

-- The state follows run_at when a producer sets it: a row inserted as runnable but due
-- later (a plain INSERT with a future run_at), or a queued row moved into the future (a
-- debounce: ON CONFLICT ... DO UPDATE SET run_at = later), is scheduled; a scheduled
-- row moved into the past is runnable.  (The worker's own statements set the state
-- themselves.)  The WHEN clause is evaluated without calling the function, so a row due
-- now costs nothing here, nor does an update of other columns.  The clock, not the
-- transaction's start: a row due "now" by a clock read during a long transaction is
-- runnable, not scheduled (a scheduled row gets no wake-up, and would wait for a
-- worker's poll).
CREATE OR REPLACE FUNCTION tenantry.jobs_schedule_delayed() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    NEW.state := CASE WHEN NEW.run_at > clock_timestamp() THEN 'scheduled' ELSE 'queued' END;
    RETURN NEW;
END;
$$;

SELECT tenantry.ensure_trigger('tenantry.jobs', 'jobs_schedule_delayed', $trigger$
CREATE TRIGGER jobs_schedule_delayed BEFORE INSERT OR UPDATE OF run_at ON tenantry.jobs
    FOR EACH ROW
    WHEN ((NEW.state = 'queued' AND NEW.run_at > clock_timestamp())
          OR (NEW.state = 'scheduled' AND NEW.run_at <= clock_timestamp()))
    EXECUTE FUNCTION tenantry.jobs_schedule_delayed()
$trigger$);

-- Wake-ups: a throttled NOTIFY, decided when the inserting transaction commits (the
-- triggers are deferred).  A NOTIFY takes a cluster-wide lock at commit, so a burst of
-- concurrent inserters must not all send one: at most one per 5 ms per key (channel
-- and payload: for jobs the queue, for the outbox 'outbox').  TG_ARGV: the channel,
-- then the payload (none: the row's queue).
--
-- Deciding at commit is what keeps the throttle from silencing anyone for long.
-- Decided earlier, the transaction that won the window kept the throttle row locked
-- until it committed, and its own notification came only then, so one producer's open
-- transaction silenced everyone else's wake-ups (and the first enqueue of a new queue
-- blocked other producers on the row's insert).  Now a committing transaction stays
-- quiet only when:
-- - a wake-up for the key committed within the window (workers fetch again 11 ms and
--   101 ms after each wake-up, WorkerConfig.trailing_fetch and late_trailing_fetch,
--   and find this commit too, unless it takes longer than that to become visible
--   after this decision: then the poll does), or
-- - another transaction of this same window holds the in-memory try-lock on (key,
--   window): it is committing a wake-up right now (or, having set its constraints
--   IMMEDIATE, did this at its INSERT and holds it: the one case that can stay silent,
--   for commits within that very window only, until that transaction commits, or for
--   good if it rolls back or its commit fails: the workers' poll, 0.5-1.5 s by
--   default, finds those jobs; test_atk3_findings.py keeps the case as a known limit).
-- A throttle row locked by another transaction may be held for long (a slow commit, an
-- IMMEDIATE transaction): the winner of a later window then notifies without updating
-- it, never silently.  Rows are created by the workers for their queues
-- (ensure_wake_keys), never by a producer, so no producer waits on another; a key
-- without a row (a queue no worker has announced) notifies in every window.
--
-- The gate: a transaction that stays quiet holds a shared advisory lock (class 0x7E4D,
-- the key's hash) from before the read it decided on until its commit has become
-- visible (transaction locks are released after the commit is visible to new
-- snapshots).  The decision comes at commit but the commit becomes visible later (the
-- WAL flush: milliseconds on a busy disk), so a worker's re-arm (tenantry.rearm_wake)
-- and the claim after it could run between the two: the claim's snapshot without the
-- job, the job without a NOTIFY, found only by a trailing fetch 11 ms later (the p99
-- of bench.latency --background-rate 1000).  The re-arm tries the lock exclusively,
-- before the claim's statements take their snapshots (queries.sql claim_rearming), and
-- holds it until its commit has made the re-armed row visible: when a quiet
-- transaction holds it, the worker claims, then waits for the lock
-- (tenantry.await_quiet_wakes), which it gets once every such commit is visible, and
-- claims again.  A transaction that meets the lock held exclusively (a re-arm or a
-- wait at this moment) does not wait: it notifies.  So a commit never stays quiet
-- unseen: it is either visible to a claim that a re-arm or a wait preceded, or it
-- notifies.  The lock is tried first and the throttle row read once, after it: a
-- re-arm that committed before the lock was granted released its own lock only once
-- its -infinity was visible, so the read sees it.  (Reading first and taking the lock
-- on the quiet path only, as before version 15, cost a second read of the row on every
-- quiet commit, the common case.)  A notifying transaction holds the lock too, while
-- it commits: a re-arm meeting it waits for a commit whose NOTIFY was on its way
-- anyway, a wait of one commit (the NOTIFY that prompts a re-arm is sent after the
-- notifying commit let go of its locks).  Under REPEATABLE READ the row is read from
-- the transaction's snapshot, which may predate a re-arm: such a commit can still stay
-- quiet unseen, and waits for the trailing fetch.
--
-- Per row, but cheap: the WHEN clause is checked without a call; the common case is one
-- read of the throttle row (a wake-up committed within the window, or this very
-- transaction's own).  The keys this transaction has decided on are listed in one
-- setting (a setting per key stays defined for the session's life, and PostgreSQL 15
-- scans them all on every change: quadratic in the queues of one transaction) while
-- the list is under 2,000 characters (16 keys at least: a queue's name is at most 100);
-- beyond that a transaction notifies without the list or the try-lock (PostgreSQL
-- drops a transaction's duplicate notifications itself, and one inserting into
-- thousands of queues must not fill the server's lock table).
--
-- Under REPEATABLE READ or SERIALIZABLE the throttle row is read from the
-- transaction's snapshot, and locking or updating a version newer than that snapshot
-- fails the commit ("could not serialize access"): such a transaction only reads the
-- row, as of its snapshot, so the throttle holds for it only against commits at the
-- same moment (the try-lock): such producers may notify once per commit (16 of them
-- on one queue: about 1,300 notifications a second, against 210 under READ COMMITTED).
--
-- No SET search_path (it doubles the cost of a call, a fifth of the insert rate), so
-- every name in it is qualified, operators and types included (OPERATOR(pg_catalog.=),
-- pg_catalog.text): it runs inside the commit of whoever inserted, superusers and the
-- SECURITY DEFINER functions' owner among them, and a schema ahead of pg_catalog on
-- that session's search_path must not lend it an operator.  (integer, boolean and
-- interval are keywords, always pg_catalog's.)  The lock classes 0x7E4B (the window's
-- try-lock; the webhook claim's turn-taking has 0x7E4F since jobs version 17), 0x7E4D
-- (the gate) and 0x7E4E (the window gate: a producer that met the gate held by a re-arm
-- and stays quiet behind another's wake-up of its window) are ours (migrations use
-- 0x7E4A).  The gate has a
-- class of its own: on 0x7E4C, the capped claim's (claim_jobs), a capped queue named
-- 'tenantry_jobs:<B>', or any whose hashtext met that of another's gate key, had its
-- claims wait behind queue B's quiet producers (an IMMEDIATE one: for its whole
-- transaction, past the worker's lock_timeout).
CREATE OR REPLACE FUNCTION tenantry.wake_at_commit() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    channel pg_catalog.text := TG_ARGV[0];
    payload pg_catalog.text;
    k pg_catalog.text;
    quiet_since pg_catalog.timestamptz := pg_catalog.clock_timestamp()
        OPERATOR(pg_catalog.-) interval '5 milliseconds';
    last pg_catalog.timestamptz;
    has_row boolean;
    gated boolean;
    woke pg_catalog.text;
    entry pg_catalog.text;
BEGIN
    IF TG_NARGS OPERATOR(pg_catalog.>) 1 THEN
        payload := TG_ARGV[1];
    ELSE
        payload := NEW.queue;
    END IF;
    k := pg_catalog.concat(channel, ':', payload);
    -- The gate first, then one read of the throttle row: holding the gate, the read
    -- sees every re-arm that tried the gate before (its commit was visible before it
    -- let go), and a re-arm trying it from now on finds it held and waits for this
    -- commit.  (Read first, the row was read twice on every quiet commit: once to
    -- decide, once more inside the gate.)
    gated := pg_catalog.pg_try_advisory_xact_lock_shared(32333, pg_catalog.hashtext(k));
    SELECT t.last_at INTO last FROM tenantry.notify_throttle t
     WHERE t.key OPERATOR(pg_catalog.=) k;
    has_row := FOUND;
    IF gated AND has_row AND last OPERATOR(pg_catalog.>) quiet_since THEN
        RETURN NULL;
    END IF;
    IF NOT gated THEN
        -- A re-arm holds the gate through its claim (or a wait is at it): the row may
        -- not show its re-arm yet, so this commit does not stay quiet on the row's
        -- word.  It may still stay quiet behind another transaction's wake-up of this
        -- window (below), sheltered by the window gate: the re-arm that wake-up
        -- prompts tries this one too before its claim.  (Each of these notified
        -- before: a notification per commit for as long as a claim takes.)
        gated := pg_catalog.pg_try_advisory_xact_lock_shared(32334, pg_catalog.hashtext(k));
    END IF;
    -- The keys decided on, one per line, each with its backslashes and line breaks
    -- escaped (a queue's name may hold them); '' (not NULL) once a transaction has
    -- ended.
    woke := coalesce(pg_catalog.current_setting('tenantry.woke', true), '');
    entry := pg_catalog.concat(
        pg_catalog.replace(pg_catalog.replace(k, E'\\', E'\\\\'), E'\n', E'\\n'), E'\n');
    IF pg_catalog.strpos(pg_catalog.concat(E'\n', woke), pg_catalog.concat(E'\n', entry))
           OPERATOR(pg_catalog.>) 0 THEN
        RETURN NULL;
    END IF;
    IF pg_catalog.length(woke) OPERATOR(pg_catalog.<) 2000 THEN
        PERFORM pg_catalog.set_config('tenantry.woke', pg_catalog.concat(woke, entry), true);
        -- The window's key hashes the key and the window together: as the key's hash
        -- XOR the window's number, two queues whose names hashed alike (or differed in
        -- the low bits, at adjacent windows) shared every window, and a producer of one
        -- stayed quiet behind the other's wake-up, which wakes only that queue's workers
        -- (test_atk3_findings.py, other-queue-winner-commits).  Now such a meeting is
        -- one window's chance, 2^-32.
        IF NOT pg_catalog.pg_try_advisory_xact_lock(
               32331,
               pg_catalog.hashtext(pg_catalog.concat(k, E'\n', pg_catalog.int8(
                   pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp())
                                    OPERATOR(pg_catalog.*) 200::double precision))))) THEN
            -- Another transaction is committing this window's wake-up: quiet, behind
            -- the gate or the window gate (its NOTIFY arrives after that commit, so the
            -- re-arm of the claim it prompts comes after the gate was taken here, and
            -- sees it held).
            IF gated THEN
                RETURN NULL;
            END IF;
        END IF;
    END IF;
    IF has_row AND pg_catalog.current_setting('transaction_isolation')
                   OPERATOR(pg_catalog.=) 'read committed' THEN
        PERFORM 1 FROM tenantry.notify_throttle t
         WHERE t.key OPERATOR(pg_catalog.=) k
           AND t.last_at OPERATOR(pg_catalog.<=) quiet_since
           FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            UPDATE tenantry.notify_throttle t SET last_at = pg_catalog.clock_timestamp()
             WHERE t.key OPERATOR(pg_catalog.=) k;
        END IF;
    END IF;
    PERFORM pg_catalog.pg_notify(channel, payload);
    RETURN NULL;
END;
$$;

SELECT tenantry.ensure_trigger('tenantry.jobs', 'jobs_wake', $trigger$
CREATE CONSTRAINT TRIGGER jobs_wake AFTER INSERT ON tenantry.jobs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.state = 'queued')
    EXECUTE FUNCTION tenantry.wake_at_commit('tenantry_jobs')
$trigger$);

-- The worker announces its queues: throttle rows exist before any producer needs one.
CREATE OR REPLACE FUNCTION tenantry.ensure_wake_keys(queues text[])
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
INSERT INTO tenantry.notify_throttle (key)
SELECT 'tenantry_jobs:' || q FROM unnest($1::text[]) q
ON CONFLICT (key) DO NOTHING;
END;
$$;

-- Before a claim that a NOTIFY prompted (queries.sql claim_rearming: in the claim's
-- transaction, before the claim's statements take their snapshots): the queue's
-- throttle row back to "no wake-up pending", so that a producer committing from then on
-- notifies even within the throttle's window (its commit may come after the claim's
-- snapshot: then it is that claim's NOTIFY, not a trailing fetch 11 ms later, that
-- finds it); until this transaction's commit makes the row visible, the gate it holds
-- makes such a producer notify.  A row a producer
-- holds is skipped: that producer is notifying right now.  No write when the row is
-- armed already.  Returns false when a producer is still committing behind the gate (see
-- wake_at_commit): one that stayed quiet may have a job invisible to the claim that
-- follows, and the worker waits for it (await_quiet_wakes) and claims again.  The gate
-- is only tried: the claim never waits for a commit here.  Best effort, and the claim
-- waits for it: a lock on the table (an operator's VACUUM FULL or LOCK, an ALTER) is
-- given up on after 10 ms instead of holding the queue's claims for the worker's 5 s
-- lock_timeout.
-- Version 11 of this file made it return that boolean: the void one goes first.
DO $$
DECLARE
    sig regprocedure := to_regprocedure('tenantry.rearm_wake(text)');
BEGIN
    IF sig IS NOT NULL AND (SELECT p.prorettype FROM pg_catalog.pg_proc p WHERE p.oid = sig)
                           = 'void'::regtype THEN
        EXECUTE format('DROP FUNCTION %s', sig);
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION tenantry.rearm_wake(queue text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET lock_timeout = '10ms'
AS $$
DECLARE
    gate integer := hashtext('tenantry_jobs:' || queue);
    window_free boolean;
BEGIN
UPDATE tenantry.notify_throttle t SET last_at = '-infinity'
  FROM (SELECT n.key FROM tenantry.notify_throttle n
         WHERE n.key = 'tenantry_jobs:' || queue AND n.last_at > '-infinity'
           FOR UPDATE SKIP LOCKED) armed
 WHERE t.key = armed.key;
IF NOT pg_try_advisory_xact_lock(32333, gate) THEN
    RETURN false;
END IF;
-- The window gate is only probed: held through the claim, it would make every producer
-- meanwhile notify.  Its lock goes with the block's subtransaction, rolled back on
-- purpose (an error or a cancel in between cannot leave it held, as a session lock's
-- unlock could).
BEGIN
    window_free := pg_try_advisory_xact_lock(32334, gate);
    RAISE SQLSTATE 'TQ001';
EXCEPTION WHEN SQLSTATE 'TQ001' THEN
    NULL;
END;
RETURN window_free;
END;
$$;

-- After a re-arm found the gate held: wait until every producer that stayed quiet
-- behind it has committed (visible to the next claim's snapshot), up to `wait_ms`.
-- Producers that arrive while this waits do not queue behind it: they notify (the
-- gate's try fails against a waiting exclusive request).  False: the wait ran out (a
-- transaction that set its constraints IMMEDIATE holds the gate until it ends), and
-- the worker's trailing fetches are left to find its job.
CREATE OR REPLACE FUNCTION tenantry.await_quiet_wakes(queue text, wait_ms integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET lock_timeout = '10ms'
AS $$
BEGIN
    -- Restored when the function returns (its SET clause).
    PERFORM set_config('lock_timeout', greatest(wait_ms, 1)::text, true);
    BEGIN
        PERFORM pg_advisory_xact_lock(32333, hashtext('tenantry_jobs:' || queue));
        PERFORM pg_advisory_xact_lock(32334, hashtext('tenantry_jobs:' || queue));
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
    RETURN true;
END;
$$;

-- The SQL interface for other services: enqueue inside the caller's own transaction
-- (in the job's tenant context: row-level security applies).  With a dedup key,
-- enqueuing a job that is still live returns the live job's id.  A run_at in the
-- future makes it `scheduled` (jobs_schedule_delayed).
CREATE OR REPLACE FUNCTION tenantry.enqueue(
    tenant_id    uuid,
    kind         text,
    payload      jsonb       DEFAULT '{}'::jsonb,
    queue        text        DEFAULT 'default',
    run_at       timestamptz DEFAULT NULL,
    priority     smallint    DEFAULT 0,
    dedup_key    text        DEFAULT NULL,
    max_attempts integer     DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off  -- see the head of this file
AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    IF tenant_id IS NULL THEN
        RAISE EXCEPTION 'tenantry.enqueue: tenant_id must not be null' USING ERRCODE = '22004';
    END IF;
    IF kind IS NULL THEN
        RAISE EXCEPTION 'tenantry.enqueue: kind must not be null' USING ERRCODE = '22004';
    END IF;
    LOOP
        INSERT INTO tenantry.jobs AS j
               (tenant_id, kind, payload, queue, run_at, priority, dedup_key, max_attempts)
        VALUES (enqueue.tenant_id, enqueue.kind, coalesce(enqueue.payload, '{}'::jsonb),
                coalesce(enqueue.queue, 'default'), coalesce(enqueue.run_at, now()),
                coalesce(enqueue.priority, 0), enqueue.dedup_key, enqueue.max_attempts)
        ON CONFLICT (tenant_id, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
        RETURNING j.id INTO new_id;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
        -- A live job holds the key.  It may finish between the two statements, in which
        -- case the insert is tried again.
        SELECT j.id INTO new_id FROM tenantry.jobs j
         WHERE j.tenant_id = enqueue.tenant_id AND j.dedup_key = enqueue.dedup_key;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
    END LOOP;
END;
$$;

-- Success for one job inside its handler's own tenant transaction (the exactly-once
-- effects of Job.complete_in_tx, and handlers whose whole transaction is one function
-- call, such as provisioning's tenantry.onboarding_run_steps): the job's row goes, its
-- tenant's minute counter counts it.  False when this worker no longer holds the lease
-- (the job was rescued after a stall): the caller must then roll its effects back.  The
-- caller's rights: row-level security applies.
CREATE OR REPLACE FUNCTION tenantry.complete_job(for_tenant uuid, job_id bigint,
                                                 lease_owner text)
RETURNS boolean
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off  -- see the head of this file
AS $$
WITH done AS (
    DELETE FROM tenantry.jobs j
     WHERE j.tenant_id = for_tenant AND j.id = job_id AND j.lease_owner = complete_job.lease_owner
    RETURNING j.tenant_id, j.queue, j.kind
), counted AS (
    INSERT INTO tenantry.job_counters AS c (tenant_id, queue, kind, minute, succeeded)
    SELECT tenant_id, queue, kind, date_trunc('minute', now()), 1 FROM done
    ON CONFLICT (tenant_id, queue, kind, minute)
    DO UPDATE SET succeeded = c.succeeded + excluded.succeeded
)
SELECT count(*) = 1 FROM done
$$;

-- --- The claim ------------------------------------------------------------------------

-- The claim's parts (stage_due_jobs, claim_jobs_at, claim_jobs_of) run inside
-- claim_jobs only, as its owner and under its settings (search_path, generic plans):
-- they have no SECURITY DEFINER or SET clause of their own, which would save and
-- restore the settings on every call, and nobody else may execute them.

-- Staging: scheduled rows of a queue that have fallen due become runnable, a bounded
-- batch per call.  Locked rows are skipped: another claim is staging them.
CREATE OR REPLACE FUNCTION tenantry.stage_due_jobs(for_queue text, max_rows integer)
RETURNS integer
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    n integer;
BEGIN
WITH due AS (
    SELECT j.ctid AS tid
      FROM tenantry.jobs j
     WHERE j.state = 'scheduled' AND j.queue = $1::text AND j.run_at <= now()
     ORDER BY j.queue, j.run_at
     LIMIT $2::integer
       FOR UPDATE SKIP LOCKED
)
UPDATE tenantry.jobs j
   SET state = 'queued'
 WHERE j.ctid = ANY (ARRAY(SELECT d.tid FROM due d));
GET DIAGNOSTICS n = ROW_COUNT;
RETURN n;
END;
$$;

-- One round of the claim at one priority: up to n runnable rows of that priority,
-- shared fairly among the tenants that have some.
--
-- The walk visits the tenants with runnable rows at this priority (a loose index scan
-- on jobs_claim_idx: one index probe per tenant) in circular order, starting after the
-- cursor: the tenants after it, then from the first tenant up to the cursor itself.
-- With no cursor it starts at the first tenant, so the system tenant (the nil UUID,
-- the first of all) is reached like any other.  A tenant at its cap is stepped over
-- without taking a place; the walk stops after max_tenants tenants with room.  Each of
-- those gets an equal share of the n slots (at most its room under the cap), and the
-- candidates are taken in rounds: every tenant's first row in walk order, then every
-- tenant's second...  So a tenant with 50,000 runnable rows delays another's new row
-- by one claim, not by 50,000 rows.
--
-- The walk remembers each tenant's first runnable row (where it sits in the index, and
-- its ctid): that row is the tenant's first candidate, and the per-tenant fetch of the
-- rest of its share starts right after it, so the dead entries that claimed rows leave
-- at the front of a tenant's range (until VACUUM) are stepped over once per claim, not
-- twice, and a tenant whose share is one row (more tenants than slots) costs the walk's
-- probe alone.
--
-- The last row returned says how the round ended (its job columns are NULL):
-- cursor_after, the tenant served last (where the next claim goes on), and level_done,
-- true when the walk went round the whole circle, no candidate was left out for want
-- of slots, and no tenant left a row behind for want of share, so that no runnable row
-- of this priority remains for a tenant with room (but rows that other claims have
-- locked at this moment); and capped, true when a tenant with runnable rows of this
-- priority was held back by the cap (skipped, or given fewer rows than its share).
--
-- Version 2 of this file added `capped` to what the claim returns: the functions of
-- version 1 are dropped first (CREATE OR REPLACE cannot change what a function
-- returns), in this same transaction.
DO $$
DECLARE
    sig regprocedure;
BEGIN
    FOREACH sig IN ARRAY ARRAY[
        to_regprocedure('tenantry.claim_jobs_at(text, smallint, integer, text,'
                        ' double precision, uuid, integer, integer)'),
        to_regprocedure('tenantry.claim_jobs(text, integer, text, double precision, uuid,'
                        ' integer)')]
    LOOP
        IF sig IS NOT NULL AND NOT EXISTS (
               SELECT 1 FROM pg_catalog.pg_proc p
                WHERE p.oid = sig AND 'capped' = ANY (p.proargnames)) THEN
            EXECUTE format('DROP FUNCTION %s', sig);
        END IF;
    END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION tenantry.claim_jobs_at(
    for_queue text, level smallint, n integer, owner text, lease_s double precision,
    after_tenant uuid, tenant_cap integer, max_tenants integer)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, payload text,
               priority smallint, attempts integer, max_attempts integer,
               created_at timestamptz, unknown_kind_since timestamptz,
               cursor_after uuid, level_done boolean, capped boolean)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH RECURSIVE walk(tenant_id, run_at, id, tid, wrapped, pos, running, open, taken) AS (
    -- Not a tenant: where the walk starts (after it).  No cursor: after the largest
    -- UUID, which wraps round to the first tenant.
    SELECT coalesce($6::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid),
           NULL::timestamptz, NULL::bigint, NULL::tid, false, 0, 0::bigint, false, 0
    UNION ALL
    SELECT x.tenant_id, x.run_at, x.id, x.tid, x.wrapped, w.pos + 1, x.running,
           $7::integer IS NULL OR x.running < $7::integer,
           w.taken + CASE WHEN $7::integer IS NULL OR x.running < $7::integer THEN 1 ELSE 0 END
      FROM walk w
     CROSS JOIN LATERAL (
        SELECT y.tenant_id, y.run_at, y.id, y.tid, y.wrapped,
               CASE WHEN $7::integer IS NULL THEN 0::bigint
                    ELSE (SELECT count(*) FROM tenantry.jobs r
                           WHERE r.tenant_id = y.tenant_id AND r.queue = $1::text
                             AND r.state = 'running')
               END AS running
          FROM (
            -- The next tenant after this one, before wrapping round...
            (SELECT j.tenant_id, j.run_at, j.id, j.ctid AS tid, false AS wrapped
               FROM tenantry.jobs j
              WHERE NOT w.wrapped
                AND j.state = 'queued' AND j.queue = $1::text AND j.priority = $2::smallint
                AND j.tenant_id > w.tenant_id
              ORDER BY j.queue, j.priority DESC, j.tenant_id, j.run_at, j.id
              LIMIT 1)
            UNION ALL
            -- ...or, when none is left, the first tenant (up to the cursor)...
            (SELECT j.tenant_id, j.run_at, j.id, j.ctid, true
               FROM tenantry.jobs j
              WHERE NOT w.wrapped
                AND j.state = 'queued' AND j.queue = $1::text AND j.priority = $2::smallint
                AND j.tenant_id <= coalesce($6::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid)
              ORDER BY j.queue, j.priority DESC, j.tenant_id, j.run_at, j.id
              LIMIT 1)
            UNION ALL
            -- ...and after wrapping, the next tenant up to the cursor.
            (SELECT j.tenant_id, j.run_at, j.id, j.ctid, true
               FROM tenantry.jobs j
              WHERE w.wrapped
                AND j.state = 'queued' AND j.queue = $1::text AND j.priority = $2::smallint
                AND j.tenant_id > w.tenant_id
                AND j.tenant_id <= coalesce($6::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid)
              ORDER BY j.queue, j.priority DESC, j.tenant_id, j.run_at, j.id
              LIMIT 1)
            LIMIT 1
          ) y
     ) x
     WHERE w.taken < $8::integer
),
visited AS (
    SELECT w.tenant_id, w.run_at, w.id, w.tid, w.pos, w.running
      FROM walk w
     WHERE w.pos > 0 AND w.open
),
walked AS (
    -- ended: the walk stopped for want of tenants, not at max_tenants.
    SELECT max(w.taken) < $8::integer AS ended,
           ceil($3::numeric / greatest(max(w.taken), 1))::integer AS share
      FROM walk w
),
limits AS (
    SELECT v.tenant_id, v.run_at, v.id, v.tid, v.pos,
           CASE WHEN $7::integer IS NULL THEN s.share
                ELSE least(s.share, $7::integer - v.running::integer) END AS lim,
           -- Whether the share, not the cap, limits it: such a tenant may have more.
           $7::integer IS NULL OR s.share < $7::integer - v.running AS share_bound
      FROM visited v
     CROSS JOIN walked s
),
candidates AS (
    -- Each tenant's first row is the one the walk found (lim is at least 1); the rest
    -- of its share follows it in the index.  With more tenants than slots the share is
    -- one row, LIMIT 0 reads nothing, and the walk's probe was the only one.
    SELECT l.tid, l.id, l.tenant_id, 1::bigint AS rn, l.pos, l.lim, l.share_bound
      FROM limits l
    UNION ALL
    SELECT c.tid, c.id, l.tenant_id, c.rn + 1, l.pos, l.lim, l.share_bound
      FROM limits l
     CROSS JOIN LATERAL (
        SELECT j.ctid AS tid, j.id, row_number() OVER (ORDER BY j.run_at, j.id) AS rn
          FROM tenantry.jobs j
         WHERE j.state = 'queued' AND j.queue = $1::text AND j.priority = $2::smallint
           AND j.tenant_id = l.tenant_id
           AND (j.run_at, j.id) > (l.run_at, l.id)
         ORDER BY j.queue, j.priority DESC, j.tenant_id, j.run_at, j.id
         LIMIT l.lim - 1
     ) c
),
chosen AS (
    SELECT c.tid, c.id, c.tenant_id, c.rn, c.pos
      FROM candidates c
     ORDER BY c.rn, c.pos
     LIMIT $3::integer
),
picked AS (
    -- Lock the chosen rows by ctid (a Tid Scan, no index descent per row).  A row
    -- another worker claimed since our snapshot has a new version at a new ctid, so
    -- the lock's recheck of `ctid = ANY (...)` skips it; a row locked right now by
    -- another claim is skipped too.  No `state = 'queued'` here: it would let the
    -- planner pick the partial claim index and scan it whole (see the outcome
    -- statement below).
    SELECT j.ctid AS tid
      FROM tenantry.jobs j
     WHERE j.ctid = ANY (ARRAY(SELECT c.tid FROM chosen c))
       FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE tenantry.jobs j
       SET state = 'running',
           attempts = j.attempts + 1,
           lease_owner = $4::text,
           lease_expires_at = now() + make_interval(secs => $5::double precision),
           started_at = now()
     WHERE j.ctid = ANY (ARRAY(SELECT p.tid FROM picked p))
    -- The payload as text: the worker decodes each job's on its own, so that one it
    -- cannot read (a number no double holds, nesting deeper than its parser takes)
    -- costs that job and not the whole claim.
    RETURNING j.tenant_id, j.id, j.queue, j.kind, j.payload::text AS payload, j.priority,
              j.attempts, j.max_attempts, j.created_at, j.unknown_kind_since
)
(SELECT c.tenant_id, c.id, c.queue, c.kind, c.payload, c.priority, c.attempts,
        c.max_attempts, c.created_at, c.unknown_kind_since, NULL::uuid, NULL::boolean,
        NULL::boolean
   FROM claimed c
   -- In the order chosen: the worker starts them in this order.
   JOIN chosen o ON o.tenant_id = c.tenant_id AND o.id = c.id
  ORDER BY o.rn, o.pos)
UNION ALL
SELECT NULL::uuid, NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::smallint,
       NULL::integer, NULL::integer, NULL::timestamptz, NULL::timestamptz,
       (SELECT c.tenant_id FROM chosen c ORDER BY c.rn DESC, c.pos DESC LIMIT 1),
       -- Done: the walk went round, no candidate was left out for want of slots, and
       -- no tenant stopped at its share with more rows possibly behind it.
       (SELECT s.ended FROM walked s)
       AND (SELECT count(*) FROM candidates) <= $3::integer
       AND NOT EXISTS (
           SELECT 1 FROM candidates c
            WHERE c.share_bound
            GROUP BY c.tenant_id
           HAVING count(*) >= min(c.lim)),
       -- Capped: a tenant skipped at its cap, or stopped at the cap with more rows
       -- possibly behind it.
       $7::integer IS NOT NULL
       AND (EXISTS (SELECT 1 FROM walk w WHERE w.pos > 0 AND NOT w.open)
            OR EXISTS (
                SELECT 1 FROM candidates c
                 WHERE NOT c.share_bound
                 GROUP BY c.tenant_id
                HAVING count(*) >= min(c.lim)));
END;
$$;

-- One round of the claim at one priority when a single tenant has runnable rows there
-- (and no cap applies): that tenant's fair share is every slot, and its rows in its own
-- order (run_at, id), so the round is a FIFO over its range of the claim index.  One
-- index range scan that locks as it goes (rows locked by another claim are stepped
-- over, not chosen and then lost), instead of the walk, the candidates and a lock by
-- ctid: the general round's plan for one tenant costs about as much again as this one.
-- The scan starts at the tenant's first runnable row as the caller found it, so the
-- dead entries that claimed rows leave at the front of the range (until VACUUM) are
-- stepped over once per claim, by that probe, not twice.  Returns the claimed rows in
-- that order; fewer than n means no unlocked runnable row of this tenant is left at
-- this priority from there on.
CREATE OR REPLACE FUNCTION tenantry.claim_jobs_of(
    for_queue text, level smallint, for_tenant uuid, from_run_at timestamptz, from_id bigint,
    n integer, owner text, lease_s double precision)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, payload text,
               priority smallint, attempts integer, max_attempts integer,
               created_at timestamptz, unknown_kind_since timestamptz)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH picked AS (
    SELECT j.ctid AS tid
      FROM tenantry.jobs j
     WHERE j.state = 'queued' AND j.queue = $1::text AND j.priority = $2::smallint
       AND j.tenant_id = $3::uuid AND (j.run_at, j.id) >= ($4::timestamptz, $5::bigint)
     ORDER BY j.queue, j.priority DESC, j.tenant_id, j.run_at, j.id
     LIMIT $6::integer
       FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE tenantry.jobs j
       SET state = 'running',
           attempts = j.attempts + 1,
           lease_owner = $7::text,
           lease_expires_at = now() + make_interval(secs => $8::double precision),
           started_at = now()
     WHERE j.ctid = ANY (ARRAY(SELECT p.tid FROM picked p))
    RETURNING j.tenant_id, j.id, j.queue, j.kind, j.payload::text AS payload, j.priority,
              j.attempts, j.max_attempts, j.created_at, j.unknown_kind_since, j.run_at
)
SELECT c.tenant_id, c.id, c.queue, c.kind, c.payload, c.priority, c.attempts,
       c.max_attempts, c.created_at, c.unknown_kind_since
  FROM claimed c
 -- In the tenant's order: the worker starts them in this order.
 ORDER BY c.run_at, c.id;
END;
$$;

-- Claim up to n runnable rows of a queue: higher priority first across all tenants,
-- and among the tenants of one priority a fair share each (claim_jobs_at; or
-- claim_jobs_of when a single tenant has runnable rows there and no cap applies: its
-- share is every slot).  The whole
-- protocol lives here: the caller passes how many rows it can take and the cursor it
-- was given last time, and gets the rows, then one last row (job columns NULL) with
-- the cursor to pass next time and `more`: false when no runnable row is left for a
-- tenant with room; true when rows may remain (the n slots were filled, or rows were
-- taken by a concurrent claim), so that a caller with free slots claims again; and
-- `capped`: runnable rows were left behind because their tenants are at the cap, so
-- that the caller claims again when a job of this queue finishes (not only at its poll).
CREATE OR REPLACE FUNCTION tenantry.claim_jobs(
    for_queue text, n integer, owner text, lease_s double precision, after_tenant uuid,
    tenant_cap integer)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, payload text,
               priority smallint, attempts integer, max_attempts integer,
               created_at timestamptz, unknown_kind_since timestamptz,
               cursor_after uuid, more boolean, capped boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off SET jit = off  -- see the head of this file
AS $$
#variable_conflict use_column
DECLARE
    -- The walk's reach per round: enough tenants for one row each, at most 100 (a
    -- probe each).  The next round, or claim, goes on from where this one stopped.
    tenant_limit constant integer := 100;
    -- Rounds per call: each takes a priority level or a further share of one.
    round_limit constant integer := 16;
    lvl smallint;
    remaining integer := n;
    cur uuid := after_tenant;
    rounds integer := 0;
    got integer;
    done boolean;
    held_back boolean := false;
    -- The first runnable row at this priority (its tenant, and where it sits in the
    -- index), and the last tenant with runnable rows there.
    first_tenant uuid;
    first_run_at timestamptz;
    first_id bigint;
    last_tenant uuid;
    r record;
BEGIN
    -- A paused queue (tenantry.queue_controls, set by an operator) hands out nothing,
    -- in every process: the row is the pause, not a flag of the process that set it.
    IF EXISTS (SELECT 1 FROM tenantry.queue_controls c
                WHERE c.queue = for_queue AND c.paused) THEN
        cursor_after := after_tenant;
        more := false;
        capped := false;
        RETURN NEXT;
        RETURN;
    END IF;
    IF tenant_cap IS NOT NULL THEN
        -- With a cap, claims of a queue take turns: each counts a tenant's running rows
        -- in its own snapshot, and two at once could each take a row of a tenant that
        -- has room for one.  Every statement below sees the claims committed before
        -- (READ COMMITTED, a snapshot per statement).  0x7E4C: our lock class for it.
        PERFORM pg_advisory_xact_lock(32332, hashtext(for_queue));
    END IF;
    PERFORM tenantry.stage_due_jobs(for_queue, 1000);
    SELECT j.priority, j.tenant_id, j.run_at, j.id
      INTO lvl, first_tenant, first_run_at, first_id
      FROM tenantry.jobs j
     WHERE j.state = 'queued' AND j.queue = for_queue
     ORDER BY j.queue, j.priority DESC, j.tenant_id, j.run_at, j.id
     LIMIT 1;
    WHILE lvl IS NOT NULL AND remaining > 0 AND rounds < round_limit LOOP
        rounds := rounds + 1;
        got := 0;
        done := false;
        last_tenant := NULL;
        IF tenant_cap IS NULL AND first_tenant IS NOT NULL THEN
            -- The last tenant at this priority (the index read backwards, where no
            -- claimed rows leave dead entries): the same as the first when a single
            -- tenant has rows here, the common case of a backlog (a bulk import, one
            -- busy tenant).
            SELECT j.tenant_id INTO last_tenant
              FROM tenantry.jobs j
             WHERE j.state = 'queued' AND j.queue = for_queue AND j.priority = lvl
             ORDER BY j.queue DESC, j.priority, j.tenant_id DESC, j.run_at DESC, j.id DESC
             LIMIT 1;
        END IF;
        IF last_tenant = first_tenant THEN
            RETURN QUERY
            SELECT o.*, NULL::uuid, NULL::boolean, NULL::boolean
              FROM tenantry.claim_jobs_of(for_queue, lvl, first_tenant, first_run_at,
                                          first_id, remaining, owner, lease_s) o;
            GET DIAGNOSTICS got = ROW_COUNT;
            cur := first_tenant;
            done := got < remaining;
        ELSE
        FOR r IN SELECT * FROM tenantry.claim_jobs_at(
                     for_queue, lvl, remaining, owner, lease_s, cur, tenant_cap,
                     least(remaining, tenant_limit)) LOOP
            IF r.id IS NULL THEN
                cur := coalesce(r.cursor_after, cur);
                done := r.level_done;
                held_back := held_back OR r.capped;
            ELSE
                tenant_id := r.tenant_id; id := r.id; queue := r.queue; kind := r.kind;
                payload := r.payload; priority := r.priority; attempts := r.attempts;
                max_attempts := r.max_attempts; created_at := r.created_at;
                unknown_kind_since := r.unknown_kind_since;
                cursor_after := NULL; more := NULL; capped := NULL;
                RETURN NEXT;
                got := got + 1;
            END IF;
        END LOOP;
        END IF;
        remaining := remaining - got;
        -- Known only for a level just found: a further round at this one walks.
        first_tenant := NULL;
        IF done THEN
            -- This priority is exhausted: the next lower one.
            SELECT j.priority, j.tenant_id, j.run_at, j.id
              INTO lvl, first_tenant, first_run_at, first_id
              FROM tenantry.jobs j
             WHERE j.state = 'queued' AND j.queue = for_queue AND j.priority < lvl
             ORDER BY j.queue, j.priority DESC, j.tenant_id, j.run_at, j.id
             LIMIT 1;
        ELSIF got = 0 THEN
            -- Everything it chose was taken by concurrent claims: let the caller decide
            -- when to come back rather than spin here.
            EXIT;
        END IF;
    END LOOP;
    tenant_id := NULL; id := NULL; queue := NULL; kind := NULL; payload := NULL;
    priority := NULL; attempts := NULL; max_attempts := NULL; created_at := NULL;
    unknown_kind_since := NULL;
    cursor_after := cur;
    more := lvl IS NOT NULL;
    capped := held_back;
    RETURN NEXT;
END;
$$;

-- When the earliest scheduled job of a queue falls due (NULL: none waiting), and the
-- database's clock, which set run_at.
CREATE OR REPLACE FUNCTION tenantry.next_due_job(for_queue text)
RETURNS TABLE (due timestamptz, db_now timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off SET jit = off  -- see the head of this file
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
SELECT (SELECT j.run_at FROM tenantry.jobs j
         WHERE j.state = 'scheduled' AND j.queue = $1::text
         ORDER BY j.queue, j.run_at
         LIMIT 1),
       now();
END;
$$;

-- --- Queue controls -------------------------------------------------------------------

-- The controls of the given queues (a queue without a row: not paused, the process's
-- own concurrency).  The worker reads them at every poll and when told of a change.
CREATE OR REPLACE FUNCTION tenantry.queue_controls_of(queues text[])
RETURNS TABLE (queue text, paused boolean, concurrency integer)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
SELECT c.queue, c.paused, c.concurrency
  FROM tenantry.queue_controls c
 WHERE c.queue = ANY ($1::text[]);
END;
$$;

-- Every queue an operator set, or that has runnable or scheduled jobs, with its
-- controls (the dashboard and `tenantry queues list`).  The queues come from the heads
-- of the two partial indexes that lead with the queue (jobs_claim_idx for runnable
-- rows, jobs_scheduled_idx for scheduled ones): one index probe per queue (a skip
-- scan), whatever the table holds.  A probe without the state would match neither
-- index and read the table once per queue.  (A queue whose jobs are all running right
-- now is not listed unless it has controls: no index leads with the queue there.)
CREATE OR REPLACE FUNCTION tenantry.queue_controls_list()
RETURNS TABLE (queue text, paused boolean, concurrency integer, updated_at timestamptz,
               updated_by text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH RECURSIVE runnable(queue) AS (
    (SELECT j.queue FROM tenantry.jobs j WHERE j.state = 'queued' ORDER BY j.queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM tenantry.jobs j
             WHERE j.state = 'queued' AND j.queue > s.queue
             ORDER BY j.queue LIMIT 1)
      FROM runnable s
     WHERE s.queue IS NOT NULL
),
waiting(queue) AS (
    (SELECT j.queue FROM tenantry.jobs j WHERE j.state = 'scheduled' ORDER BY j.queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM tenantry.jobs j
             WHERE j.state = 'scheduled' AND j.queue > s.queue
             ORDER BY j.queue LIMIT 1)
      FROM waiting s
     WHERE s.queue IS NOT NULL
)
SELECT q.queue, coalesce(c.paused, false), c.concurrency, c.updated_at, c.updated_by
  FROM (SELECT r.queue FROM runnable r WHERE r.queue IS NOT NULL
        UNION
        SELECT w.queue FROM waiting w WHERE w.queue IS NOT NULL
        UNION
        SELECT c2.queue FROM tenantry.queue_controls c2) q
  LEFT JOIN tenantry.queue_controls c ON c.queue = q.queue
 ORDER BY q.queue;
END;
$$;

-- Pause or resume a queue, or set (or, with clear_concurrency, unset) the
-- concurrency of its every process.  NULL leaves a control as it is.  Tells every
-- process at commit (channel tenantry_controls, the queue as payload), and the worker
-- also reads the controls at every poll, so a process that missed the notification
-- follows within a poll interval.  Returns the row as it now is.
CREATE OR REPLACE FUNCTION tenantry.set_queue_control(
    for_queue text, pause boolean, new_concurrency integer, clear_concurrency boolean,
    actor text)
RETURNS TABLE (queue text, paused boolean, concurrency integer, updated_at timestamptz,
               updated_by text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    INSERT INTO tenantry.queue_controls AS c (queue, paused, concurrency, updated_by)
    VALUES ($1::text, coalesce($2::boolean, false),
            CASE WHEN $4::boolean THEN NULL ELSE $3::integer END, $5::text)
    ON CONFLICT ON CONSTRAINT queue_controls_pkey DO UPDATE
       SET paused = coalesce($2::boolean, c.paused),
           concurrency = CASE WHEN $4::boolean THEN NULL
                              ELSE coalesce($3::integer, c.concurrency) END,
           updated_at = now(),
           updated_by = $5::text
    RETURNING c.queue, c.paused, c.concurrency, c.updated_at, c.updated_by;
    PERFORM pg_notify('tenantry_controls', for_queue);
END;
$$;

-- --- Search for operators ---------------------------------------------------------------

-- A page of live jobs matching a filter (NULL: any), for the dashboard, in primary-key
-- order (tenant, id), after the keyset cursor (after_tenant, after_id); never OFFSET.
-- A page reads at most `scan_cap` rows of the key range, whatever the filter: a rare
-- filter (a payload containment no row matches) would otherwise read the whole table
-- for every page.  The last row (job columns NULL) carries the key to go on from
-- (NULL: the table is read to its end), so the next page continues the scan.
CREATE OR REPLACE FUNCTION tenantry.jobs_search(
    of_queue text, of_kind text, in_state text, of_tenant uuid, of_id bigint,
    payload_contains jsonb, after_tenant uuid, after_id bigint, max_rows integer,
    scan_cap integer)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, state text,
               priority smallint, attempts integer, max_attempts integer, run_at timestamptz,
               lease_owner text, last_error text, created_at timestamptz,
               next_tenant uuid, next_id bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH scanned AS (
    SELECT j.tenant_id, j.id, j.queue, j.kind, j.state, j.priority, j.attempts,
           j.max_attempts, j.run_at, j.lease_owner, j.last_error, j.created_at, j.payload
      FROM tenantry.jobs j
     WHERE (j.tenant_id, j.id) > (coalesce($7::uuid, '00000000-0000-0000-0000-000000000000'),
                                  coalesce($8::bigint, -1))
       AND ($4::uuid IS NULL OR j.tenant_id = $4::uuid)
     ORDER BY j.tenant_id, j.id
     LIMIT $10::integer
),
matched AS (
    SELECT s.* FROM scanned s
     WHERE ($1::text IS NULL OR s.queue = $1::text)
       AND ($2::text IS NULL OR s.kind = $2::text)
       AND ($3::text IS NULL OR s.state::text = $3::text)
       AND ($5::bigint IS NULL OR s.id = $5::bigint)
       AND ($6::jsonb IS NULL OR s.payload @> $6::jsonb)
     ORDER BY s.tenant_id, s.id
     LIMIT $9::integer
),
last_shown AS (
    SELECT m.tenant_id, m.id FROM matched m ORDER BY m.tenant_id DESC, m.id DESC LIMIT 1
),
last_read AS (
    SELECT s.tenant_id, s.id FROM scanned s ORDER BY s.tenant_id DESC, s.id DESC LIMIT 1
),
stop AS (
    -- Where the next page starts: after the last row shown when the page is full,
    -- else after the last row read when the read stopped at its cap; else nowhere.
    SELECT CASE WHEN (SELECT count(*) FROM matched) >= $9::integer
                THEN (SELECT l.tenant_id FROM last_shown l)
                WHEN (SELECT count(*) FROM scanned) >= $10::integer
                THEN (SELECT l.tenant_id FROM last_read l) END AS t,
           CASE WHEN (SELECT count(*) FROM matched) >= $9::integer
                THEN (SELECT l.id FROM last_shown l)
                WHEN (SELECT count(*) FROM scanned) >= $10::integer
                THEN (SELECT l.id FROM last_read l) END AS i
)
(SELECT m.tenant_id, m.id, m.queue, m.kind, m.state::text, m.priority, m.attempts,
        m.max_attempts, m.run_at, m.lease_owner, m.last_error, m.created_at,
        NULL::uuid, NULL::bigint
   FROM matched m
  ORDER BY m.tenant_id, m.id)
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, s.t, s.i
  FROM stop s;
END;
$$;

-- A page of the dead-letter table across tenants (`tenantry dead list`, the
-- dashboard), filtered by kind, tenant and reason (NULL: any), newest first, before the
-- keyset cursor (before_died_at, before_id; NULL: the first page): a range of
-- dead_jobs_newest_idx.
CREATE OR REPLACE FUNCTION tenantry.dead_jobs_page(
    of_kind text, of_tenant uuid, of_reason text, before_died_at timestamptz,
    before_id bigint, max_rows integer)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, attempts integer,
               reason text, last_error text, died_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
SELECT d.tenant_id, d.id, d.queue, d.kind, d.attempts, d.reason, d.last_error, d.died_at
  FROM tenantry.dead_jobs d
 WHERE tenantry.dead_job_matches(d.kind, d.tenant_id, d.reason, $1::text, $2::uuid, $3::text)
   AND ($4::timestamptz IS NULL OR (d.died_at, d.id) < ($4::timestamptz, $5::bigint))
 ORDER BY d.died_at DESC, d.id DESC
 LIMIT $6::integer;
END;
$$;

-- Jobs completed, attempts failed and jobs dead-lettered per queue and time bucket
-- (bucket_seconds wide) over the last since_seconds, from the per-minute counters (a
-- range of job_counters_minute_idx).  Buckets without a count are not returned.
CREATE OR REPLACE FUNCTION tenantry.queue_throughput(since_seconds integer,
                                                     bucket_seconds integer)
RETURNS TABLE (queue text, bucket timestamptz, succeeded bigint, failed bigint, dead bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
SELECT c.queue,
       to_timestamp(floor(extract(epoch FROM c.minute) / $2::integer) * $2::integer),
       sum(c.succeeded)::bigint, sum(c.failed)::bigint, sum(c.dead)::bigint
  FROM tenantry.job_counters c
 WHERE c.minute >= now() - make_interval(secs => $1::integer)
 GROUP BY 1, 2
 ORDER BY 1, 2;
END;
$$;

-- The period each periodic handler last enqueued, and when (the dashboard).
CREATE OR REPLACE FUNCTION tenantry.periodic_runs_list()
RETURNS TABLE (name text, last_period timestamptz, updated_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY SELECT p.name, p.last_period, p.updated_at FROM tenantry.periodic_runs p;
END;
$$;

-- --- Outcomes -------------------------------------------------------------------------

-- Every outcome of a batch in one statement: successes leave the table (and become
-- counters), retries and snoozes go back (scheduled when due later), dead jobs move to
-- dead_jobs with every error (and, for a kind with a dead-letter hook, enqueue its hook
-- job), and jobs handed back at shutdown are runnable again with their attempt
-- refunded.  Only the lease holder acts on a job: a rescued job belongs to whoever
-- holds it now.
--
-- The counters of the whole batch are upserted last, by one INSERT in key order, so
-- that two processes writing batches at once lock counter rows in the same order and
-- cannot deadlock (with one statement per outcome kind, each in key order, a batch of
-- two kinds could: A's successes then B's deaths against B's successes then A's deaths).
--
-- Each row is found by a correlated primary-key lookup that yields its ctid, then acted
-- on by `ctid = ANY (ARRAY(...))` (a Tid Scan), rather than by joining the key array to
-- the table.  A join's plan depends on statistics that are nearly always wrong for a
-- queue: right after an ANALYZE no job runs, so "lease_owner = $me" looks like one row,
-- and the planner scans a whole index or the whole table once per key.  Seen: a batch
-- completion taking 48 s instead of 2 ms.  If a row changed meanwhile (rescued), it has
-- a new ctid and the recheck of `ctid = ANY (...)` skips it.  Matching
-- `lease_owner = $me` without `state = 'running'` (a CHECK makes them equivalent) keeps
-- the partial running index out of the picture.
CREATE OR REPLACE FUNCTION tenantry.record_job_outcomes(
    owner text,
    done_tenants uuid[], done_ids bigint[],
    retry_tenants uuid[], retry_ids bigint[], retry_at timestamptz[], retry_errors text[],
    retry_error_objs jsonb[], retry_refunds boolean[], retry_unknown_kind boolean[],
    dead_tenants uuid[], dead_ids bigint[], dead_errors text[], dead_error_objs jsonb[],
    dead_reasons text[], dead_hooks text[], dead_unrun boolean[],
    back_tenants uuid[], back_ids bigint[])
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off SET jit = off  -- see the head of this file
AS $$
#variable_conflict use_column
BEGIN
WITH done_rows AS (
    SELECT (SELECT j.ctid FROM tenantry.jobs j
             WHERE j.tenant_id = d.tenant_id AND j.id = d.id
               AND j.lease_owner = $1::text) AS tid
      FROM unnest($2::uuid[], $3::bigint[]) AS d(tenant_id, id)
), done AS (
    DELETE FROM tenantry.jobs j
     WHERE j.ctid = ANY (ARRAY(SELECT d.tid FROM done_rows d))
    RETURNING j.tenant_id, j.queue, j.kind
), retry_rows AS (
    SELECT (SELECT j.ctid FROM tenantry.jobs j
             WHERE j.tenant_id = r.tenant_id AND j.id = r.id
               AND j.lease_owner = $1::text) AS tid,
           r.run_at, r.error, r.error_obj, r.refund, r.unknown_kind
      FROM unnest($4::uuid[], $5::bigint[], $6::timestamptz[], $7::text[], $8::jsonb[],
                  $9::boolean[], $10::boolean[])
           AS r(tenant_id, id, run_at, error, error_obj, refund, unknown_kind)
), retried AS (
    UPDATE tenantry.jobs j
       SET state = CASE WHEN r.run_at > now() THEN 'scheduled'
                        ELSE 'queued' END::tenantry.job_state,
           run_at = r.run_at,
           attempts = CASE WHEN r.refund THEN greatest(j.attempts - 1, 0) ELSE j.attempts END,
           last_error = coalesce(r.error, j.last_error),
           errors = CASE WHEN r.error_obj IS NULL THEN j.errors
                         ELSE j.errors || jsonb_build_array(r.error_obj) END,
           unknown_kind_since = CASE WHEN r.unknown_kind
                                     THEN coalesce(j.unknown_kind_since, now()) END,
           lease_owner = NULL,
           lease_expires_at = NULL,
           started_at = NULL
      FROM retry_rows r
     WHERE j.ctid = ANY (ARRAY(SELECT r.tid FROM retry_rows r)) AND j.ctid = r.tid
    RETURNING j.tenant_id, j.queue, j.kind, r.error IS NOT NULL AND NOT r.refund AS failed
), dead_rows AS (
    SELECT (SELECT j.ctid FROM tenantry.jobs j
             WHERE j.tenant_id = d.tenant_id AND j.id = d.id
               AND j.lease_owner = $1::text) AS tid,
           d.error, d.error_obj, d.reason, d.hook, d.unrun
      FROM unnest($11::uuid[], $12::bigint[], $13::text[], $14::jsonb[], $15::text[],
                  $16::text[], $17::boolean[])
           AS d(tenant_id, id, error, error_obj, reason, hook, unrun)
), gone AS (
    DELETE FROM tenantry.jobs j
     USING dead_rows d
     WHERE j.ctid = ANY (ARRAY(SELECT d.tid FROM dead_rows d)) AND j.ctid = d.tid
    -- A job found past its last attempt (rescued after its worker died) is buried
    -- without running: the claim that found it does not count as an attempt.
    RETURNING j.tenant_id, j.id, j.queue, j.kind, j.payload, j.priority,
              j.attempts - d.unrun::integer AS attempts, j.max_attempts, j.dedup_key,
              j.created_at, j.errors, d.error, d.error_obj, d.reason, d.hook
), buried AS (
    INSERT INTO tenantry.dead_jobs
           (tenant_id, id, queue, kind, payload, priority, attempts, max_attempts,
            last_error, errors, dedup_key, reason, created_at)
    SELECT g.tenant_id, g.id, g.queue, g.kind, g.payload, g.priority, g.attempts,
           g.max_attempts, g.error, g.errors || jsonb_build_array(g.error_obj), g.dedup_key,
           g.reason, g.created_at
      FROM gone g
    -- A dead row under this id already (a job retried from the dead-letter table keeps
    -- its id): the latest death replaces it.  Without this the batch would fail and be
    -- retried forever, holding up its other outcomes.
    ON CONFLICT (tenant_id, id) DO UPDATE
       SET queue = excluded.queue, kind = excluded.kind, payload = excluded.payload,
           priority = excluded.priority, attempts = excluded.attempts,
           max_attempts = excluded.max_attempts, last_error = excluded.last_error,
           errors = excluded.errors, dedup_key = excluded.dedup_key,
           reason = excluded.reason, created_at = excluded.created_at, died_at = now()
), hooked AS (
    -- The dead-letter hook runs as a job of its own: retried like any job, and
    -- committed with the death, so that a crash cannot lose it.  The dead job's
    -- payload goes as its JSON text: one the worker could not decode must not make
    -- the hook's own payload undecodable.
    INSERT INTO tenantry.jobs (tenant_id, queue, kind, priority, payload)
    SELECT g.tenant_id, g.queue, g.hook, g.priority,
           jsonb_build_object('job_id', g.id, 'kind', g.kind, 'payload', g.payload::text,
                              'reason', g.reason, 'error', g.error, 'attempts', g.attempts,
                              'created_at', g.created_at)
      FROM gone g
     WHERE g.hook IS NOT NULL
), back_rows AS (
    SELECT (SELECT j.ctid FROM tenantry.jobs j
             WHERE j.tenant_id = b.tenant_id AND j.id = b.id
               AND j.lease_owner = $1::text) AS tid
      FROM unnest($18::uuid[], $19::bigint[]) AS b(tenant_id, id)
), back AS (
    UPDATE tenantry.jobs j
       SET state = 'queued', run_at = now(), attempts = greatest(j.attempts - 1, 0),
           lease_owner = NULL, lease_expires_at = NULL, started_at = NULL
     WHERE j.ctid = ANY (ARRAY(SELECT b.tid FROM back_rows b))
), counts AS (
    SELECT x.tenant_id, x.queue, x.kind,
           sum(x.succeeded) AS succeeded, sum(x.failed) AS failed, sum(x.dead) AS dead
      FROM (SELECT d.tenant_id, d.queue, d.kind, 1 AS succeeded, 0 AS failed, 0 AS dead
              FROM done d
            UNION ALL
            SELECT r.tenant_id, r.queue, r.kind, 0, 1, 0 FROM retried r WHERE r.failed
            UNION ALL
            SELECT g.tenant_id, g.queue, g.kind, 0, 1, 1 FROM gone g) x
     GROUP BY x.tenant_id, x.queue, x.kind
)
INSERT INTO tenantry.job_counters AS c (tenant_id, queue, kind, minute, succeeded, failed, dead)
SELECT n.tenant_id, n.queue, n.kind, date_trunc('minute', now()), n.succeeded, n.failed, n.dead
  FROM counts n
 ORDER BY n.tenant_id, n.queue, n.kind
ON CONFLICT (tenant_id, queue, kind, minute)
DO UPDATE SET succeeded = c.succeeded + excluded.succeeded,
              failed = c.failed + excluded.failed,
              dead = c.dead + excluded.dead;
END;
$$;

-- Heartbeat: returns the jobs whose lease this worker still holds.
CREATE OR REPLACE FUNCTION tenantry.extend_job_leases(
    tenant_ids uuid[], ids bigint[], owner text, lease_s double precision)
RETURNS TABLE (tenant_id uuid, id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off SET jit = off  -- see the head of this file
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

-- A running job whose lease expired lost its worker: runnable again now; the lost
-- attempt counts (the claim counted it) and is recorded as an error.  A job that has
-- used all its attempts is dead-lettered (with its hook) by the worker that claims it
-- next.
CREATE OR REPLACE FUNCTION tenantry.rescue_expired_jobs(max_rows integer)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, attempts integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off SET jit = off  -- see the head of this file
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

CREATE OR REPLACE FUNCTION tenantry.prune_job_counters(retention_days integer)
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

-- --- Operators ------------------------------------------------------------------------

-- Per-queue figures over all tenants: counts only, never rows.
-- In the last hour: jobs that succeeded, attempts that failed (retried or not), jobs
-- that died; `dead`: what the dead-letter table holds now.  (Until version 3 one
-- `failed_1h` column counted failed attempts, retries that later succeeded included.)
DROP FUNCTION IF EXISTS tenantry.queue_stats();
CREATE FUNCTION tenantry.queue_stats()
RETURNS TABLE (queue text, available bigint, scheduled bigint, running bigint,
               retrying bigint, oldest_age_s double precision, succeeded_1h bigint,
               attempts_failed_1h bigint, died_1h bigint, dead bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH live AS (
    SELECT j.queue,
           count(*) FILTER (WHERE j.state = 'queued') AS available,
           count(*) FILTER (WHERE j.state = 'scheduled') AS scheduled,
           count(*) FILTER (WHERE j.state = 'running') AS running,
           count(*) FILTER (WHERE j.state <> 'running' AND j.attempts > 0) AS retrying,
           extract(epoch FROM now() - min(j.run_at) FILTER (WHERE j.state = 'queued'))::float8
               AS oldest_age_s
      FROM tenantry.jobs j
     GROUP BY j.queue
), recent AS (
    SELECT c.queue,
           sum(c.succeeded)::bigint AS succeeded_1h,
           sum(c.failed)::bigint AS attempts_failed_1h,
           sum(c.dead)::bigint AS died_1h
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
       coalesce(r.attempts_failed_1h, 0),
       coalesce(r.died_1h, 0),
       coalesce(d.dead, 0)
  FROM (SELECT l.queue FROM live l UNION SELECT r.queue FROM recent r
        UNION SELECT d.queue FROM dead d) q
  LEFT JOIN live l ON l.queue = q.queue
  LEFT JOIN recent r ON r.queue = q.queue
  LEFT JOIN dead d ON d.queue = q.queue
 ORDER BY q.queue;
END;
$$;

-- The live jobs across tenants (`tenantry jobs list`), oldest due first, filtered by
-- queue, kind, tenant and state (NULL: any).
CREATE OR REPLACE FUNCTION tenantry.jobs_list(max_rows integer, of_queue text, of_kind text,
                                              of_tenant uuid, in_state text)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, state text,
               priority smallint, attempts integer, max_attempts integer, run_at timestamptz,
               lease_owner text, lease_expires_at timestamptz, last_error text,
               created_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
SELECT j.tenant_id, j.id, j.queue, j.kind, j.state::text, j.priority, j.attempts,
       j.max_attempts, j.run_at, j.lease_owner, j.lease_expires_at, j.last_error,
       j.created_at
  FROM tenantry.jobs j
 WHERE ($2::text IS NULL OR j.queue = $2::text)
   AND ($3::text IS NULL OR j.kind = $3::text)
   AND ($4::uuid IS NULL OR j.tenant_id = $4::uuid)
   AND ($5::text IS NULL OR j.state::text = $5::text)
 ORDER BY j.run_at, j.id
 LIMIT $1::integer;
END;
$$;

-- One live job in full (`tenantry jobs show`); every row with that id (the tenant
-- narrows it: a database from before ids were reserved to the sequence may hold one
-- id in two tenants).  The payload as its JSON text.
CREATE OR REPLACE FUNCTION tenantry.job_show(job_id bigint, for_tenant uuid)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, state text,
               payload text, priority smallint, attempts integer, max_attempts integer,
               run_at timestamptz, lease_owner text, lease_expires_at timestamptz,
               last_error text, errors jsonb, dedup_key text, created_at timestamptz,
               started_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
SELECT j.tenant_id, j.id, j.queue, j.kind, j.state::text, j.payload::text, j.priority,
       j.attempts, j.max_attempts, j.run_at, j.lease_owner, j.lease_expires_at,
       j.last_error, j.errors, j.dedup_key, j.created_at, j.started_at
  FROM tenantry.jobs j
 WHERE j.id = $1::bigint AND ($2::uuid IS NULL OR j.tenant_id = $2::uuid);
END;
$$;

-- Whether a dead job matches an operator's filter (NULL: any): one predicate for the
-- list, the count and the bulk retry and discard below.  Inlined by the planner.
CREATE OR REPLACE FUNCTION tenantry.dead_job_matches(kind text, tenant_id uuid, reason text,
                                                     of_kind text, of_tenant uuid,
                                                     of_reason text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (of_kind IS NULL OR kind OPERATOR(pg_catalog.=) of_kind)
   AND (of_tenant IS NULL OR tenant_id OPERATOR(pg_catalog.=) of_tenant)
   AND (of_reason IS NULL OR reason OPERATOR(pg_catalog.=) of_reason);

-- The dead-letter table across tenants was listed by dead_jobs_list (without a cursor)
-- until version 7: `tenantry dead list` now reads the first page of dead_jobs_page.
DROP FUNCTION IF EXISTS tenantry.dead_jobs_list(integer);
DROP FUNCTION IF EXISTS tenantry.dead_jobs_list(integer, text, uuid, text);

-- How many dead jobs a filter matches: what a bulk retry or discard would touch.
CREATE OR REPLACE FUNCTION tenantry.dead_jobs_count(of_kind text, of_tenant uuid,
                                                    of_reason text)
RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
SELECT count(*)
  FROM tenantry.dead_jobs d
 WHERE tenantry.dead_job_matches(d.kind, d.tenant_id, d.reason, $1, $2, $3)
$$;

-- Every dead job a filter matches back to its queue (as dead_job_retry does one), in
-- one statement; returns how many.
CREATE OR REPLACE FUNCTION tenantry.dead_jobs_retry(of_kind text, of_tenant uuid,
                                                    of_reason text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n bigint;
BEGIN
WITH gone AS (
    DELETE FROM tenantry.dead_jobs d
     WHERE tenantry.dead_job_matches(d.kind, d.tenant_id, d.reason, $1::text, $2::uuid,
                                     $3::text)
    RETURNING d.*
), back AS (
    INSERT INTO tenantry.jobs AS j (tenant_id, id, queue, kind, payload, priority,
                                    max_attempts, errors, dedup_key, created_at)
    OVERRIDING SYSTEM VALUE
    SELECT g.tenant_id, g.id, g.queue, g.kind, g.payload, g.priority, g.max_attempts,
           g.errors, g.dedup_key, g.created_at
      FROM gone g
    RETURNING 1
)
SELECT count(*) INTO n FROM back;
RETURN n;
END;
$$;

-- Every dead job a filter matches, deleted for good; returns how many.
CREATE OR REPLACE FUNCTION tenantry.dead_jobs_discard(of_kind text, of_tenant uuid,
                                                      of_reason text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n bigint;
BEGIN
DELETE FROM tenantry.dead_jobs d
 WHERE tenantry.dead_job_matches(d.kind, d.tenant_id, d.reason, $1::text, $2::uuid, $3::text);
GET DIAGNOSTICS n = ROW_COUNT;
RETURN n;
END;
$$;

-- A dead job addressed by id, and by tenant when given.  Ids come from one sequence
-- and nobody may choose one (the service login has no INSERT on the id column), but a
-- database from before that rule may hold one id in two tenants: then the tenant must
-- be given, and the error lists the candidates.
CREATE OR REPLACE FUNCTION tenantry.dead_job_locate(job_id bigint, for_tenant uuid)
RETURNS uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    found uuid[];
BEGIN
SELECT array_agg(d.tenant_id ORDER BY d.tenant_id) INTO found
  FROM tenantry.dead_jobs d
 WHERE d.id = $1::bigint AND ($2::uuid IS NULL OR d.tenant_id = $2::uuid);
IF cardinality(found) > 1 THEN
    RAISE EXCEPTION 'dead job % exists in % tenants (%): name the tenant', $1,
        cardinality(found), array_to_string(found, ', ')
        USING ERRCODE = '21000';
END IF;
RETURN found[1];
END;
$$;

CREATE OR REPLACE FUNCTION tenantry.dead_job_show(job_id bigint, for_tenant uuid)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, payload jsonb,
               priority smallint, attempts integer, max_attempts integer, last_error text,
               errors jsonb, dedup_key text, reason text, created_at timestamptz,
               died_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
-- The effective max attempts: the job's own, or the policy's that each attempt's
-- error record names (the job row holds NULL for "the kind's policy").
SELECT d.tenant_id, d.id, d.queue, d.kind, d.payload, d.priority, d.attempts,
       coalesce(d.max_attempts,
                (SELECT max((e ->> 'max_attempts')::integer)
                   FROM jsonb_array_elements(CASE jsonb_typeof(d.errors)
                                                  WHEN 'array' THEN d.errors
                                                  ELSE '[]'::jsonb END) e
                  WHERE jsonb_typeof(e -> 'max_attempts') = 'number')),
       d.last_error, d.errors, d.dedup_key, d.reason, d.created_at, d.died_at
  FROM tenantry.dead_jobs d
 WHERE d.tenant_id = tenantry.dead_job_locate($1::bigint, $2::uuid) AND d.id = $1::bigint;
END;
$$;

-- Back to the queue with fresh attempts, under its own id; the error history stays
-- with the row.
CREATE OR REPLACE FUNCTION tenantry.dead_job_retry(job_id bigint, for_tenant uuid)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
WITH gone AS (
    DELETE FROM tenantry.dead_jobs d
     WHERE d.tenant_id = tenantry.dead_job_locate($1::bigint, $2::uuid) AND d.id = $1::bigint
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

CREATE OR REPLACE FUNCTION tenantry.dead_job_discard(job_id bigint, for_tenant uuid)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    gone_id bigint;
BEGIN
DELETE FROM tenantry.dead_jobs d
 WHERE d.tenant_id = tenantry.dead_job_locate($1::bigint, $2::uuid) AND d.id = $1::bigint
RETURNING d.id INTO gone_id;
RETURN gone_id;
END;
$$;

-- --- Owners and grants ----------------------------------------------------------------

-- The cross-tenant functions belong to tenantry_system; each is executable by the role
-- that needs it and nobody else.  The rest run with the caller's rights.
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig, p.proname::text AS name
               FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'tenantry'::regnamespace AND p.prosecdef
                AND p.proname IN ('ensure_wake_keys', 'rearm_wake', 'await_quiet_wakes',
                                  'claim_jobs', 'next_due_job',
                                  'queue_controls_of', 'queue_controls_list',
                                  'set_queue_control', 'jobs_search', 'dead_jobs_page',
                                  'queue_throughput', 'periodic_runs_list',
                                  'record_job_outcomes',
                                  'extend_job_leases', 'rescue_expired_jobs',
                                  'prune_job_counters', 'queue_stats', 'jobs_list',
                                  'job_show', 'dead_jobs_count', 'dead_jobs_retry', 'dead_jobs_discard',
                                  'dead_job_locate', 'dead_job_show', 'dead_job_retry',
                                  'dead_job_discard')
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO tenantry_system', f.sig);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f.sig,
                       CASE WHEN f.name IN ('queue_stats', 'jobs_list', 'job_show',
                                            'dead_jobs_count',
                                            'dead_jobs_retry', 'dead_jobs_discard',
                                            'dead_job_locate', 'dead_job_show',
                                            'dead_job_retry', 'dead_job_discard',
                                            'queue_controls_list', 'set_queue_control',
                                            'jobs_search', 'dead_jobs_page',
                                            'queue_throughput', 'periodic_runs_list')
                            THEN 'tenantry_operator' ELSE 'tenantry_worker' END);
    END LOOP;
END;
$$;

-- The queue's depth for the metrics, cheap at any size: per queue, the queued,
-- scheduled and running jobs counted up to `cap` each (an index-only range of that
-- many entries at most: a count of a million rows would read them all), and the age of
-- the oldest runnable job.  That age walks the claim index's (priority, tenant) heads:
-- the first entry of each is that group's oldest, so the walk reads one entry per
-- group, up to `max_heads` of them (past that, the oldest of those it read).
CREATE OR REPLACE FUNCTION tenantry.queue_depth(queues text[], cap integer, max_heads integer)
RETURNS TABLE (queue text, queued bigint, scheduled bigint, running bigint,
               oldest_queued_at timestamptz, heads integer)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q text;
BEGIN
    FOREACH q IN ARRAY queues LOOP
        RETURN QUERY
        SELECT q,
               (SELECT count(*) FROM (SELECT 1 FROM tenantry.jobs j
                                       WHERE j.queue = q AND j.state = 'queued'
                                       LIMIT cap) x),
               (SELECT count(*) FROM (SELECT 1 FROM tenantry.jobs j
                                       WHERE j.queue = q AND j.state = 'scheduled'
                                       LIMIT cap) x),
               (SELECT count(*) FROM (SELECT 1 FROM tenantry.jobs j
                                       WHERE j.queue = q AND j.state = 'running'
                                       LIMIT cap) x),
               w.oldest, w.heads
          FROM (
            WITH RECURSIVE walk (priority, tenant_id, run_at, n) AS (
                (SELECT j.priority, j.tenant_id, j.run_at, 1
                   FROM tenantry.jobs j
                  WHERE j.queue = q AND j.state = 'queued'
                  ORDER BY j.priority DESC, j.tenant_id, j.run_at, j.id
                  LIMIT 1)
                UNION ALL
                SELECT nx.priority, nx.tenant_id, nx.run_at, w.n + 1
                  FROM walk w
                 CROSS JOIN LATERAL (
                       (SELECT j.priority, j.tenant_id, j.run_at
                          FROM tenantry.jobs j
                         WHERE j.queue = q AND j.state = 'queued'
                           AND j.priority = w.priority AND j.tenant_id > w.tenant_id
                         ORDER BY j.priority DESC, j.tenant_id, j.run_at, j.id
                         LIMIT 1)
                       UNION ALL
                       (SELECT j.priority, j.tenant_id, j.run_at
                          FROM tenantry.jobs j
                         WHERE j.queue = q AND j.state = 'queued' AND j.priority < w.priority
                         ORDER BY j.priority DESC, j.tenant_id, j.run_at, j.id
                         LIMIT 1)
                       LIMIT 1) nx
                 WHERE w.n < max_heads
            )
            SELECT min(walk.run_at) AS oldest, count(*)::integer AS heads FROM walk
          ) w;
    END LOOP;
END;
$$;

ALTER FUNCTION tenantry.queue_depth(text[], integer, integer) OWNER TO tenantry_system;
REVOKE ALL ON FUNCTION tenantry.queue_depth(text[], integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.queue_depth(text[], integer, integer)
    TO tenantry_worker, tenantry_operator;

-- The work waiting for worker processes, for an autoscaler (KEDA's `postgresql` scaler
-- in deploy/kubernetes/ divides it by a target per replica), as ONE number:
-- - jobs of `queues` (the worker deployment's TENANTRY_QUEUES) that are runnable
--   (queued) or due (scheduled with run_at passed: nobody stages them while no worker
--   runs, so they must wake the workers themselves), unless the queue is paused (a
--   paused queue hands out nothing: more workers would only wait);
-- - their running jobs, paused or not: a replica count from the queued rows alone drops
--   as soon as the workers have claimed them, and scaling down then stops busy workers;
-- - the outbox's events not yet fanned out, and the webhook deliveries due or being
--   sent: only worker processes fan out and deliver, so with the workers scaled to
--   zero these would wait for the next job (a retry not yet due is left out: it wakes
--   them when it falls due, as a scheduled job does).
-- Counted up to 10,000 in all, and each part reads at most that many index entries
-- (the deliveries walk one head per endpoint with pending rows, at most 1,001
-- endpoints), so a backlog of millions costs what one of 10,000 does: far above any
-- replica count (10,000 / target per replica).  The cap is fixed here, not a
-- parameter, so that the metrics login cannot ask for a scan of the whole table.
-- Owned by tenantry_system (it counts across tenants); executable by tenantry_metrics
-- only, the login the autoscaler holds, which can read nothing else.
CREATE OR REPLACE FUNCTION tenantry.worker_demand(VARIADIC queues text[])
RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cap CONSTANT bigint := 10000;
    max_endpoints CONSTANT integer := 1000;
    q text;
    total bigint := 0;
    due_deliveries bigint;
    unread_endpoints boolean;
BEGIN
    IF coalesce(cardinality(queues), 0) NOT BETWEEN 1 AND 100
       OR array_position(queues, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'worker_demand takes 1 to 100 queue names, none NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR q IN SELECT DISTINCT u.name FROM unnest(queues) AS u(name) LOOP
        total := total + (SELECT count(*) FROM (
            SELECT 1 FROM tenantry.jobs j
             WHERE j.queue = q AND j.state = 'running'
             LIMIT cap - total) x);
        CONTINUE WHEN EXISTS (SELECT 1 FROM tenantry.queue_controls c
                               WHERE c.queue = q AND c.paused);
        total := total + (SELECT count(*) FROM (
            SELECT 1 FROM tenantry.jobs j
             WHERE j.queue = q AND j.state = 'queued' AND j.run_at <= now()
             LIMIT cap - total) x);
        total := total + (SELECT count(*) FROM (
            SELECT 1 FROM tenantry.jobs j
             WHERE j.queue = q AND j.state = 'scheduled' AND j.run_at <= now()
             LIMIT cap - total) x);
    END LOOP;
    total := total + (SELECT l.events FROM tenantry.webhook_fanout_lag((cap - total)::integer) l);
    total := total + (SELECT count(*) FROM (
        SELECT 1 FROM tenantry.webhook_deliveries d
         WHERE d.state = 'sending'
         LIMIT cap - total) x);
    -- Due deliveries: a walk over the (tenant, endpoint) heads of the claim's index,
    -- then each endpoint's due range (its rows not yet due are never read).  The walk
    -- goes one head past max_endpoints to learn whether endpoints were left unread:
    -- when the ones read have nothing due but more wait past them, one worker is asked
    -- for (its claim reads every endpoint), or a delivery due there would wait, the
    -- workers at zero, until a retry of the first thousand falls due (up to a day).
    WITH RECURSIVE ep (tenant_id, endpoint_id, n) AS (
        (SELECT d.tenant_id, d.endpoint_id, 1
           FROM tenantry.webhook_deliveries d
          WHERE d.state = 'pending'
          ORDER BY d.tenant_id, d.endpoint_id, d.next_attempt_at
          LIMIT 1)
        UNION ALL
        SELECT nx.tenant_id, nx.endpoint_id, ep.n + 1
          FROM ep
         CROSS JOIN LATERAL (
            SELECT d.tenant_id, d.endpoint_id
              FROM tenantry.webhook_deliveries d
             WHERE d.state = 'pending'
               AND (d.tenant_id, d.endpoint_id) > (ep.tenant_id, ep.endpoint_id)
             ORDER BY d.tenant_id, d.endpoint_id, d.next_attempt_at
             LIMIT 1) nx
         WHERE ep.n <= max_endpoints
    )
    SELECT (SELECT count(*) FROM (
               SELECT 1
                 FROM ep
                CROSS JOIN LATERAL (
                   SELECT 1 FROM tenantry.webhook_deliveries d
                    WHERE d.tenant_id = ep.tenant_id AND d.endpoint_id = ep.endpoint_id
                      AND d.state = 'pending' AND d.next_attempt_at <= now()
                    LIMIT cap - total) due
                WHERE ep.n <= max_endpoints
                LIMIT cap - total) x),
           EXISTS (SELECT 1 FROM ep WHERE ep.n > max_endpoints)
      INTO due_deliveries, unread_endpoints;
    total := total + due_deliveries;
    IF due_deliveries = 0 AND unread_endpoints THEN
        total := total + 1;
    END IF;
    RETURN least(total, cap);
END;
$$;

ALTER FUNCTION tenantry.worker_demand(text[]) OWNER TO tenantry_system;
REVOKE ALL ON FUNCTION tenantry.worker_demand(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.worker_demand(text[]) TO tenantry_metrics;

-- The wake-up runs at commit as whoever inserted the row (tenant code, a worker writing
-- a dead-letter hook job, an operator retrying a dead job): 0005 grants them the
-- throttle table.  A trigger function needs no EXECUTE grant to fire.
ALTER FUNCTION tenantry.stage_due_jobs(text, integer) OWNER TO tenantry_system;
ALTER FUNCTION tenantry.claim_jobs_at(text, smallint, integer, text, double precision, uuid,
                                      integer, integer) OWNER TO tenantry_system;
ALTER FUNCTION tenantry.claim_jobs_of(text, smallint, uuid, timestamptz, bigint, integer, text,
                                      double precision) OWNER TO tenantry_system;
REVOKE ALL ON FUNCTION tenantry.stage_due_jobs(text, integer),
                       tenantry.claim_jobs_at(text, smallint, integer, text, double precision,
                                              uuid, integer, integer),
                       tenantry.claim_jobs_of(text, smallint, uuid, timestamptz, bigint,
                                              integer, text, double precision)
    FROM PUBLIC;
ALTER FUNCTION tenantry.jobs_schedule_delayed() OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.dead_job_matches(text, uuid, text, text, uuid, text)
    OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.ensure_trigger(regclass, name, text) OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.wake_at_commit() OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.enqueue(uuid, text, jsonb, text, timestamptz, smallint, text, integer)
    OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.complete_job(uuid, bigint, text) OWNER TO tenantry_owner;
REVOKE ALL ON FUNCTION tenantry.jobs_schedule_delayed(), tenantry.wake_at_commit(),
                       tenantry.ensure_trigger(regclass, name, text),
                       tenantry.enqueue(uuid, text, jsonb, text, timestamptz, smallint, text,
                                        integer),
                       tenantry.complete_job(uuid, bigint, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    tenantry.enqueue(uuid, text, jsonb, text, timestamptz, smallint, text, integer),
    tenantry.complete_job(uuid, bigint, text)
    TO tenantry_service;

REVOKE CREATE ON SCHEMA tenantry FROM tenantry_system;
