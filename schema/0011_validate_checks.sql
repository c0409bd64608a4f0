-- 0011: validate 0010's checks.  VALIDATE CONSTRAINT reads each table under a SHARE
-- UPDATE EXCLUSIVE lock, which inserts and updates do not wait for; in 0010's own
-- transaction it would have read them under the ACCESS EXCLUSIVE lock the change took.

ALTER TABLE tenantry.outbox VALIDATE CONSTRAINT outbox_aggregate_type;
ALTER TABLE tenantry.outbox VALIDATE CONSTRAINT outbox_event_type;
ALTER TABLE tenantry.tenants VALIDATE CONSTRAINT tenants_slug_format;
ALTER TABLE tenantry.workspaces VALIDATE CONSTRAINT workspaces_slug_format;
ALTER TABLE tenantry.roles VALIDATE CONSTRAINT roles_name_format;
ALTER TABLE tenantry.operators VALIDATE CONSTRAINT operators_name;
