-- 0010: the same CHECK constraints, without counted repetition in their patterns.
--
-- PostgreSQL's regular expressions expand a bound such as {1,200} into that many
-- states, and a match rebuilds its automaton's states as it goes: `event_type ~
-- '^[A-Za-z0-9_.:-]{1,200}$'` took 30 us a row, against 0.3 us for `+` with the length
-- checked apart (200,000 evaluations on this machine).  The outbox's two checks cost
-- 42 us an insert, paid by every event (about eight a sign-up) and every emit of another
-- service.  Each new check accepts exactly the strings the old one did: the same
-- characters, the same bounds.
--
-- Added NOT VALID here, so that this transaction holds the tables' locks only for the
-- catalog change, not for a scan; 0011 validates them in a transaction of its own,
-- which lets writes go on meanwhile.  New rows are checked from this commit on.

ALTER TABLE tenantry.outbox
    DROP CONSTRAINT outbox_aggregate_type,
    ADD CONSTRAINT outbox_aggregate_type
        CHECK (aggregate_type ~ '^[A-Za-z0-9_.:-]+$' AND length(aggregate_type) <= 100)
        NOT VALID,
    DROP CONSTRAINT outbox_event_type,
    ADD CONSTRAINT outbox_event_type
        CHECK (event_type ~ '^[A-Za-z0-9_.:-]+$' AND length(event_type) <= 200)
        NOT VALID;

ALTER TABLE tenantry.tenants
    DROP CONSTRAINT tenants_slug_format,
    ADD CONSTRAINT tenants_slug_format
        CHECK (slug ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$' AND length(slug) <= 50) NOT VALID;

ALTER TABLE tenantry.workspaces
    DROP CONSTRAINT workspaces_slug_format,
    ADD CONSTRAINT workspaces_slug_format
        CHECK (slug ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$' AND length(slug) <= 50) NOT VALID;

ALTER TABLE tenantry.roles
    DROP CONSTRAINT roles_name_format,
    ADD CONSTRAINT roles_name_format
        CHECK (name ~ '^[a-z][a-z0-9_]*$' AND length(name) <= 40) NOT VALID;

ALTER TABLE tenantry.operators
    DROP CONSTRAINT operators_name,
    ADD CONSTRAINT operators_name
        CHECK (name ~ '^[A-Za-z0-9_.@-]+$' AND length(name) <= 100) NOT VALID;
