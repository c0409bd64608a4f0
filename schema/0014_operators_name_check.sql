-- 0014: the operators' name check without counted repetition (see 0010).

ALTER TABLE tenantry.operators
    DROP CONSTRAINT operators_name,
    ADD CONSTRAINT operators_name
        CHECK (name ~ '^[A-Za-z0-9_.@-]+$' AND length(name) <= 100) NOT VALID;
