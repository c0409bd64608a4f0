-- 0015: validate the checks of 0010-0014.  VALIDATE CONSTRAINT reads each table under
-- a SHARE UPDATE EXCLUSIVE lock, which inserts, updates and reads do not wait for (the
-- adding migration's own transaction would have read it under ACCESS EXCLUSIVE).  One
-- transaction: a row that fails a check (none can: each check accepts what the one it
-- replaced did) leaves all six unvalidated, still checking new rows, and `tenantry
-- migrate` names it.

ALTER TABLE tenantry.outbox VALIDATE CONSTRAINT outbox_aggregate_type;
ALTER TABLE tenantry.outbox VALIDATE CONSTRAINT outbox_event_type;
ALTER TABLE tenantry.tenants VALIDATE CONSTRAINT tenants_slug_format;
ALTER TABLE tenantry.workspaces VALIDATE CONSTRAINT workspaces_slug_format;
ALTER TABLE tenantry.roles VALIDATE CONSTRAINT roles_name_format;
ALTER TABLE tenantry.operators VALIDATE CONSTRAINT operators_name;
