-- 0004: a job due later waits in its own state, `scheduled`, until it is staged as
-- `queued` (runnable) when due.  Alone in its migration: a value added to an enum
-- cannot be used in the transaction that adds it (0005 uses it).
ALTER TYPE tenantry.job_state ADD VALUE IF NOT EXISTS 'scheduled' BEFORE 'running';
