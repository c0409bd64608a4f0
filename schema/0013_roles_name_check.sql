-- 0013: the roles' name check without counted repetition (see 0010).

ALTER TABLE tenantry.roles
    DROP CONSTRAINT roles_name_format,
    ADD CONSTRAINT roles_name_format
        CHECK (name ~ '^[a-z][a-z0-9_]*$' AND length(name) <= 40) NOT VALID;
