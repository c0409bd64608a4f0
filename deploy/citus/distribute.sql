-- Tenantry on Citus: distribute the tenant tables by tenant.  OPTIONAL, and not a
-- numbered migration: `tenantry migrate` never runs it.  Run it once, as the admin
-- login, on a Citus coordinator (CREATE EXTENSION citus done, worker nodes added), after
-- `tenantry migrate` has created the schema and before the service takes traffic:
--
--     psql "$TENANTRY_ADMIN_URL" -v ON_ERROR_STOP=1 -f deploy/citus/distribute.sql
--
-- and run the service with TENANTRY_TENANT_CONTEXT=set_local.  docs/scaling.md says
-- why each table goes where it goes, and what of this has been tested (the placement
-- rules, against the schema, on plain PostgreSQL; never on a Citus cluster, which
-- cannot be installed on the machine this was written on).
--
-- Three kinds of table:
-- - distributed by tenant (`tenant_id`), all in one colocation group, so that every
--   statement of one tenant (they all carry `tenant_id = $1`) is routed to one shard,
--   and a tenant's rows join each other on that shard;
-- - reference (a copy on every node): `tenants`, which the distributed tables' foreign
--   keys point to and whose `slug` must stay unique across all tenants;
-- - local to the coordinator (citus_add_local_table_to_metadata): the queue plane.
--   The claims walk across tenants with FOR UPDATE SKIP LOCKED, which Citus runs only
--   in single-shard queries; NOTIFY is node-local, and the triggers that wake the
--   workers must fire where the listeners listen; the webhook fan-out reads the outbox
--   in commit order across tenants, and the delivery claims and their rescue write
--   the attempts log in the same statements.  These stay where they are today, on
--   one server.

\set ON_ERROR_STOP on

BEGIN;

DO $check$
BEGIN
    IF to_regproc('create_distributed_table') IS NULL THEN
        RAISE EXCEPTION 'not a Citus coordinator: create_distributed_table() does not exist'
            USING HINT = 'CREATE EXTENSION citus on the coordinator first (docs/scaling.md)';
    END IF;
    IF to_regclass('tenantry.tenants') IS NULL THEN
        RAISE EXCEPTION 'the tenantry schema is not there: run `tenantry migrate` first';
    END IF;
END
$check$;

-- Reference.
SELECT create_reference_table('tenantry.tenants');

-- Distributed by tenant, one colocation group anchored on `users`.
SELECT create_distributed_table('tenantry.users', 'tenant_id');
SELECT create_distributed_table('tenantry.workspaces', 'tenant_id', colocate_with => 'tenantry.users');
SELECT create_distributed_table('tenantry.roles', 'tenant_id', colocate_with => 'tenantry.users');
SELECT create_distributed_table('tenantry.memberships', 'tenant_id', colocate_with => 'tenantry.users');
SELECT create_distributed_table('tenantry.api_keys', 'tenant_id', colocate_with => 'tenantry.users');
SELECT create_distributed_table('tenantry.onboardings', 'tenant_id', colocate_with => 'tenantry.users');
SELECT create_distributed_table('tenantry.onboarding_steps', 'tenant_id', colocate_with => 'tenantry.users');

-- Local to the coordinator: the queue plane and the operators' tables.
SELECT citus_add_local_table_to_metadata('tenantry.jobs');
SELECT citus_add_local_table_to_metadata('tenantry.dead_jobs');
SELECT citus_add_local_table_to_metadata('tenantry.job_counters');
SELECT citus_add_local_table_to_metadata('tenantry.periodic_runs');
SELECT citus_add_local_table_to_metadata('tenantry.notify_throttle');
SELECT citus_add_local_table_to_metadata('tenantry.outbox');
SELECT citus_add_local_table_to_metadata('tenantry.idempotency_keys');
SELECT citus_add_local_table_to_metadata('tenantry.webhook_endpoints');
SELECT citus_add_local_table_to_metadata('tenantry.webhook_deliveries');
SELECT citus_add_local_table_to_metadata('tenantry.webhook_attempts');
SELECT citus_add_local_table_to_metadata('tenantry.webhook_fanout_position');
SELECT citus_add_local_table_to_metadata('tenantry.queue_controls');
SELECT citus_add_local_table_to_metadata('tenantry.operators');
SELECT citus_add_local_table_to_metadata('tenantry.operator_links');
SELECT citus_add_local_table_to_metadata('tenantry.operator_sessions');
SELECT citus_add_local_table_to_metadata('tenantry.schema_migrations');
SELECT citus_add_local_table_to_metadata('tenantry.schema_repeatables');
-- The analytics views' refresh bookkeeping.  The views themselves (0009) read
-- coordinator-local and distributed tables alike; they are refreshed on the
-- coordinator (docs/scaling.md: not tested on Citus).
SELECT citus_add_local_table_to_metadata('tenantry_analytics.refresh_state');

-- The onboarding's per-step lock runs where its tenant's shard is (its first argument
-- is the tenant).
SELECT create_distributed_function('tenantry.onboarding_lock(uuid, uuid)', 'for_tenant',
                                   colocate_with => 'tenantry.users');

-- set_config() is not sent to the worker nodes; SET LOCAL is, with this setting.  The
-- service's policies read `app.tenant_id` wherever a shard is scanned.
DO $propagate$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET citus.propagate_set_commands = %L',
                   current_database(), 'local');
END
$propagate$;

COMMIT;
