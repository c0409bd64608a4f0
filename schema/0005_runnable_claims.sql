-- 0005: claims that see runnable rows only, the repeatable function files, job ids
-- that nobody chooses, and wake-ups decided at commit.
--
-- The functions and triggers themselves now live in repeatable migrations, a
-- `functions.sql` next to the module that owns them (service/migrate.py); this file
-- keeps to tables, indexes and privileges, and drops what the repeatable files replace
-- under another signature.

-- Repeatable migrations applied so far: the version each file declares (so that older
-- code never overwrites newer functions) and the checksum of what was applied.
CREATE TABLE tenantry.schema_repeatables (
    name       text        PRIMARY KEY,
    version    integer     NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE tenantry.schema_repeatables OWNER TO tenantry_owner;
GRANT SELECT ON tenantry.schema_repeatables
   TO tenantry_service, tenantry_worker, tenantry_operator;

-- Jobs due later wait as `scheduled` and are staged as `queued` when due, so that the
-- claim's index holds runnable rows only.  Before, a tenant whose rows were all due
-- later (a delayed job, a retry's backoff) still took a place in the claim's walk:
-- fifteen such tenants stopped every other tenant's runnable jobs.  Existing rows move
-- as tenantry_system, which row-level security does not restrict (the migrating role
-- may be an administrator that it does).
SET LOCAL ROLE tenantry_system;
UPDATE tenantry.jobs SET state = 'scheduled' WHERE state = 'queued' AND run_at > now();
RESET ROLE;

-- The claim walks (queue, priority) first, so that priority is global across tenants,
-- then the tenants of one priority (a loose index scan), then a tenant's rows in
-- order.  It leads with the queue rather than tenant_id: the claim is a cross-tenant
-- path of the worker; tenant statements use the primary key.
DROP INDEX tenantry.jobs_claim_idx;
DROP INDEX tenantry.jobs_due_idx;
CREATE INDEX jobs_claim_idx ON tenantry.jobs (queue, priority DESC, tenant_id, run_at, id)
    WHERE state = 'queued';
-- Staging and "when is the next scheduled job due".
CREATE INDEX jobs_scheduled_idx ON tenantry.jobs (queue, run_at) WHERE state = 'scheduled';

-- When a job's kind was first found without a handler: during a rolling deploy an old
-- process meets the new kinds, and retries them for a while (TENANTRY_UNKNOWN_KIND_RETRY)
-- before dead-lettering them.
ALTER TABLE tenantry.jobs ADD COLUMN unknown_kind_since timestamptz;

-- Job ids come from the sequence only.  GENERATED ALWAYS alone does not ensure it
-- (INSERT ... OVERRIDING SYSTEM VALUE needs only INSERT), so tenant code may insert
-- the columns of an enqueue and no others: not the id, the state, the lease or the
-- history.  Updates likewise (a debounce moves run_at; the state follows it, see
-- jobs_schedule_delayed): a job's state and lease are the worker's.
REVOKE INSERT, UPDATE ON tenantry.jobs FROM tenantry_service;
GRANT INSERT (tenant_id, queue, kind, payload, priority, run_at, dedup_key, max_attempts),
      UPDATE (tenant_id, queue, kind, payload, priority, run_at, dedup_key, max_attempts)
   ON tenantry.jobs TO tenantry_service;

-- Wake-ups are decided at commit, by deferred triggers (the repeatable files), which
-- run as whoever inserted: the worker's and the operator's logins insert jobs too (a
-- dead-letter hook, a dead job retried).  Throttle rows are created by the workers for
-- their queues, and by this migration for the outbox, never by a producer: a
-- producer's insert of a new key made the next producer wait for its commit.
GRANT SELECT, UPDATE ON tenantry.notify_throttle
   TO tenantry_service, tenantry_worker, tenantry_operator;
REVOKE INSERT ON tenantry.notify_throttle FROM tenantry_service;
INSERT INTO tenantry.notify_throttle (key) VALUES ('tenantry_outbox:outbox')
    ON CONFLICT (key) DO NOTHING;

-- Replaced by the repeatable files under other signatures or names.
DROP TRIGGER jobs_notify ON tenantry.jobs;
DROP FUNCTION tenantry.jobs_notify();
DROP TRIGGER outbox_notify ON tenantry.outbox;
DROP FUNCTION tenantry.outbox_notify();
DROP FUNCTION tenantry.notify_throttled(text, text, integer);
DROP FUNCTION tenantry.claim_jobs(text, integer, text, double precision, uuid, integer, integer);
DROP FUNCTION tenantry.next_due_job(text[]);
DROP FUNCTION tenantry.complete_jobs(uuid[], bigint[], text);
DROP FUNCTION tenantry.requeue_jobs(uuid[], bigint[], timestamptz[], text[], jsonb[], boolean[],
                                    text);
DROP FUNCTION tenantry.bury_jobs(uuid[], bigint[], text[], jsonb[], text[], text);
DROP FUNCTION tenantry.release_jobs(uuid[], bigint[], text);
DROP FUNCTION tenantry.dead_job_show(bigint);
DROP FUNCTION tenantry.dead_job_retry(bigint);
DROP FUNCTION tenantry.dead_job_discard(bigint);
DROP FUNCTION tenantry.outbox_follow(xid8, text);
