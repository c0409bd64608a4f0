-- 0011: the tenants' slug check without counted repetition (see 0010).

ALTER TABLE tenantry.tenants
    DROP CONSTRAINT tenants_slug_format,
    ADD CONSTRAINT tenants_slug_format
        CHECK (slug ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?$' AND length(slug) <= 50) NOT VALID;
