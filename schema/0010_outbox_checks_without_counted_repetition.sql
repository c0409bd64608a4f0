-- 0010: the outbox's CHECK constraints without counted repetition in their patterns
-- (0011-0014: the same for four other tables; 0015 validates them all).
--
-- PostgreSQL's regular expressions expand a bound such as {1,200} into that many
-- states, and a match rebuilds its automaton's states as it goes: `event_type ~
-- '^[A-Za-z0-9_.:-]{1,200}$'` took 30 us a row, against 0.3 us for `+` with the length
-- checked apart (200,000 evaluations on this machine), and the outbox's two checks 42
-- us an insert, paid by every event (about eight a sign-up) and every emit of another
-- service.  Each new check accepts exactly the strings the old one did: the same
-- characters, the same bounds (tests/integration/test_check_constraints.py).
--
-- One table a migration, each its own transaction: a migration waits for its table's
-- lock holding no other table's (five tables in one transaction held the outbox locked
-- while it waited for a reader of `roles`: every emit waited the lock timeout, on each
-- attempt).  NOT VALID, so that the change holds the lock for the catalog only, not for
-- a scan; 0015 validates under a lock that writes do not wait for.  New rows are
-- checked from this commit on.

ALTER TABLE tenantry.outbox
    DROP CONSTRAINT outbox_aggregate_type,
    ADD CONSTRAINT outbox_aggregate_type
        CHECK (aggregate_type ~ '^[A-Za-z0-9_.:-]+$' AND length(aggregate_type) <= 100)
        NOT VALID,
    DROP CONSTRAINT outbox_event_type,
    ADD CONSTRAINT outbox_event_type
        CHECK (event_type ~ '^[A-Za-z0-9_.:-]+$' AND length(event_type) <= 200)
        NOT VALID;
