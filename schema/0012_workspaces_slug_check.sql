-- 0012: the workspaces' slug check without counted repetition (see 0010).

ALTER TABLE tenantry.workspaces
    DROP CONSTRAINT workspaces_slug_format,
    ADD CONSTRAINT workspaces_slug_format
        CHECK (slug ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$' AND length(slug) <= 50) NOT VALID;
