"""Outcomes under poison and contention: errors no text column takes, a batch the
database refuses, two processes' batches at once, and how a handler completes its job
(explicitly, once, and only if the COMMIT succeeds)."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import asyncpg
import pytest

from tenantry import db
from tenantry.errors import PermanentFailure
from tenantry.jobs import queue as jobs
from tenantry.jobs.model import Job, JobAlreadyCompleted
from tenantry.jobs.outcomes import Bury, Complete, OutcomeWriter, Retry
from tenantry.jobs.registry import Policy, Registry
from tenantry.jobs.worker import Worker, WorkerConfig
from tenantry.safetext import safe_json, safe_text
from tests.helpers import TENANT_A, TENANT_B, one, running_worker, wait_lock_waiter

NUL = "name\x00with a NUL"
SURROGATE = "caf\udcff.txt"  # os.listdir's view of a non-UTF-8 file name


def test_safe_text_escapes_what_postgresql_and_json_refuse() -> None:
    assert safe_text(NUL) == "name\\x00with a NUL"
    assert safe_text(SURROGATE) == "caf\\udcff.txt"
    assert safe_text("plain, ünïcode ✓") == "plain, ünïcode ✓"
    assert safe_json({"k\x00": [SURROGATE, 1, None]}) == {"k\\x00": ["caf\\udcff.txt", 1, None]}


async def test_poison_errors_are_recorded_and_never_wedge_the_outcomes(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: a handler's error holding a NUL byte or a lone surrogate made the
    batch that writes outcomes fail with an encoding error; the batch was put back in
    front and retried forever, so no job of the process completed any more (and the
    logger raised first on the surrogate, so the error was never recorded)."""
    reg = Registry()

    @reg.handler("nul", policy=Policy(max_attempts=1))
    async def nul(job: Job) -> None:
        raise RuntimeError(NUL)

    @reg.handler("surrogate", policy=Policy(max_attempts=2, backoff_base=3600))
    async def surrogate(job: Job) -> None:
        raise OSError(2, "No such file", SURROGATE)

    @reg.handler("permanent")
    async def permanent(job: Job) -> None:
        raise PermanentFailure(NUL + SURROGATE)

    @reg.handler("fine")
    async def fine(job: Job) -> None:
        return None

    ids = {
        kind: await jobs.enqueue(pool, tenant_id=TENANT_A, kind=kind)
        for kind in ("nul", "surrogate", "permanent", "fine")
    }
    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_flushed(4)
        more = [await jobs.enqueue(pool, tenant_id=TENANT_B, kind="fine") for _ in range(5)]
        await rec.wait_flushed(9)
    assert (
        await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs WHERE id = ANY($1)", more)
        == 0
    )
    dead = await jobs.dead_show(worker_pool, ids["nul"])
    assert dead["last_error"] == "RuntimeError: name\\x00with a NUL"
    assert "\\x00" in dead["errors"][-1]["traceback"]
    retried = await one(admin_pool, "SELECT * FROM tenantry.jobs WHERE id = $1", ids["surrogate"])
    assert retried["state"] == "scheduled"
    assert "caf\\udcff.txt" in retried["last_error"]
    assert (await jobs.dead_show(worker_pool, ids["permanent"]))["last_error"] == (
        "PermanentFailure: name\\x00with a NULcaf\\udcff.txt"
    )


async def _claimed(pool: asyncpg.Pool, worker_pool: asyncpg.Pool, owner: str, n: int) -> list[int]:
    w = Worker(pool, Registry(), WorkerConfig(queues={"default": n}), owner=owner,
               worker_pool=worker_pool)  # fmt: skip
    got = await w.claim("default", n, None)
    assert got is not None
    return [r["id"] for r in got.rows]


async def test_a_batch_the_database_refuses_is_written_one_by_one(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Defence in depth behind the sanitising: whatever value the database refuses
    (here a NUL that reached an outcome unsanitised), the batch's other outcomes are
    written, and the job whose outcome cannot be is buried with the database's
    reason, instead of the batch being retried forever."""
    for _ in range(3):
        await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k")
    ids = await _claimed(pool, worker_pool, "writer", 3)
    flushed: list[list[object]] = []
    writer = OutcomeWriter(worker_pool, "writer", on_flushed=lambda o: flushed.append(list(o)))
    now = datetime.now(UTC)
    writer.put(Complete((TENANT_A, ids[0])))
    writer.put(Retry((TENANT_A, ids[1]), now, "raw\x00error", {"error": "raw"}))
    writer.put(Complete((TENANT_A, ids[2])))
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        with anyio.fail_after(10):
            await writer.drain()
        tg.cancel_scope.cancel()
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0
    dead = await jobs.dead_show(worker_pool, ids[1])
    assert dead["reason"] == "permanent"
    assert dead["last_error"].startswith("outcome refused by the database")
    assert await admin_pool.fetchval("SELECT sum(succeeded) FROM tenantry.job_counters") == 2
    assert isinstance(flushed[-1][1], Bury)


async def test_two_batches_lock_their_counters_in_one_order(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool, worker_url: str
) -> None:
    """Regression: outcome batches of two processes deadlocked on the per-minute
    counters: each statement locked counters in key order, but one batch ran one
    statement per outcome kind (A's successes then B's deaths, against B's successes
    then A's deaths).  A batch is now one statement, counters upserted last, in key
    order: the second batch waits for the first, and both commit."""
    for t in (TENANT_A, TENANT_B):
        for _ in range(2):
            await jobs.enqueue(pool, tenant_id=t, kind="k")
    await _claimed(pool, worker_pool, "p1", 2)  # one job of each tenant
    await admin_pool.execute(
        "UPDATE tenantry.jobs SET state = 'running', lease_owner = 'p2', attempts = 1"
        " WHERE lease_owner IS NULL"
    )
    rows = await admin_pool.fetch("SELECT tenant_id, id, lease_owner FROM tenantry.jobs")
    held = {(r["lease_owner"], r["tenant_id"]): r["id"] for r in rows}
    statement = (
        "SELECT tenantry.record_job_outcomes($1, $2, $3, '{}', '{}', '{}', '{}', '{}', '{}',"
        " '{}', $4, $5, ARRAY['x'], ARRAY['{}'::jsonb], ARRAY['permanent'], ARRAY[NULL::text],"
        " ARRAY[false], '{}', '{}')"
    )
    first = await db.connect(worker_url)
    second = await db.connect(worker_url)
    try:
        tx = first.transaction()
        await tx.start()
        # p1: A's success, B's death.
        await first.execute(
            statement, "p1", [TENANT_A], [held["p1", TENANT_A]], [TENANT_B],
            [held["p1", TENANT_B]],
        )  # fmt: skip

        async def p2() -> None:
            # p2: B's success, A's death: the same counters, the other way round.
            async with second.transaction():
                await second.execute(
                    statement, "p2", [TENANT_B], [held["p2", TENANT_B]], [TENANT_A],
                    [held["p2", TENANT_A]],
                )  # fmt: skip

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(p2)
                await wait_lock_waiter(admin_pool)  # p2 waits for p1's counter rows...
                await tx.commit()  # ...and goes on once p1 commits: no deadlock
    finally:
        await first.close()
        await second.close()
    counts = await admin_pool.fetch(
        "SELECT tenant_id, succeeded, dead FROM tenantry.job_counters ORDER BY tenant_id"
    )
    assert [(r["succeeded"], r["dead"]) for r in counts] == [(1, 1), (1, 1)]
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0


async def test_a_second_completing_transaction_is_refused_before_any_effect(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: `job.tenant_tx()` completed the job on commit, so a second block in
    the same handler failed with "lease lost; effects rolled back" and the worker only
    logged it: the second write was gone.  Completing is now explicit
    (`complete_in_tx()`), once; a second one raises before touching anything, and
    plain `tenant_tx()` blocks commit every write."""
    await admin_pool.execute("CREATE TABLE public.effects (job_id bigint, what text)")
    await admin_pool.execute("GRANT ALL ON public.effects TO tenantry_service")
    reg = Registry()
    refused: list[BaseException] = []

    @reg.handler("twice", policy=Policy(max_attempts=1))
    async def twice(job: Job) -> None:
        async with job.tenant_tx() as tx:
            await tx.execute("INSERT INTO public.effects VALUES ($1, 'first')", job.id)
        async with job.tenant_tx() as tx:
            await tx.execute("INSERT INTO public.effects VALUES ($1, 'second')", job.id)
        async with job.complete_in_tx() as tx:
            await tx.execute("INSERT INTO public.effects VALUES ($1, 'completing')", job.id)
        try:
            async with job.complete_in_tx() as tx:
                await tx.execute("INSERT INTO public.effects VALUES ($1, 'never')", job.id)
        except JobAlreadyCompleted as exc:
            refused.append(exc)
        async with job.tenant_tx() as tx:
            await tx.execute("INSERT INTO public.effects VALUES ($1, 'after')", job.id)

    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="twice")
    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_for(lambda: len(rec.named("finished")) == 1)
    assert len(refused) == 1 and "earlier complete_in_tx()" in str(refused[0])
    effects = await admin_pool.fetch("SELECT what FROM public.effects ORDER BY what")
    assert [r["what"] for r in effects] == ["after", "completing", "first", "second"]
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0
    assert await admin_pool.fetchval("SELECT sum(succeeded) FROM tenantry.job_counters") == 1


async def test_a_commit_that_fails_does_not_complete_the_job(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: the job was marked completed before the COMMIT, so a deferred
    constraint failing at COMMIT left the row `running` until its lease expired, with
    a misleading "lease expired" error and a lost attempt.  Now the failed COMMIT fails
    the attempt like any error, and the retry succeeds."""
    await admin_pool.execute(
        """
        CREATE TABLE public.ledger (job_id bigint, ok boolean);
        GRANT ALL ON public.ledger TO tenantry_service;
        CREATE FUNCTION public.ledger_check() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NOT NEW.ok THEN
                RAISE EXCEPTION 'ledger entry % is not ok', NEW.job_id USING ERRCODE = '23514';
            END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER ledger_check AFTER INSERT ON public.ledger
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.ledger_check();
        """
    )
    reg = Registry()

    @reg.handler("book", policy=Policy(max_attempts=3, backoff_base=0.01, backoff_cap=0.01))
    async def book(job: Job) -> None:
        async with job.complete_in_tx() as tx:
            await tx.execute("INSERT INTO public.ledger VALUES ($1, $2)", job.id, job.attempt > 1)

    job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="book")
    async with running_worker(pool, worker_pool, reg, poll_interval=0.05) as (_w, rec):
        await rec.wait_for(lambda: len(rec.named("finished")) == 2)
    first, second = rec.named("finished")
    assert isinstance(first["outcome"], Retry) and "is not ok" in (first["outcome"].error or "")
    assert second["outcome"] is None  # completed in its transaction
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0
    assert await admin_pool.fetchval("SELECT count(*) FROM public.ledger") == 1
    assert (
        await admin_pool.fetchval("SELECT (succeeded, failed)::text FROM tenantry.job_counters")
        == "(1,1)"
    )
    assert job_id == first["job"].id


@pytest.mark.parametrize("tenant", [None, "a"])
async def test_dead_jobs_are_addressed_unambiguously(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, tenant: str | None
) -> None:
    """A database from before ids were reserved to the sequence may hold one id in two
    tenants: the operator commands then need the tenant, and say so."""
    for t in (TENANT_A, TENANT_B):
        await admin_pool.execute(
            "INSERT INTO tenantry.dead_jobs (tenant_id, id, queue, kind, payload, priority,"
            " attempts, errors, reason, created_at)"
            " VALUES ($1, 77, 'default', 'k', '{}', 0, 1, '[]', 'permanent', now())",
            t,
        )
    which = TENANT_A if tenant else None
    if which is None:
        for op in (jobs.dead_show, jobs.dead_retry, jobs.dead_discard):
            with pytest.raises(Exception, match=r"exists in 2 tenants.*--tenant"):
                await op(worker_pool, 77)
        assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.dead_jobs") == 2
        return
    assert (await jobs.dead_show(worker_pool, 77, which))["tenant_id"] == TENANT_A
    assert await jobs.dead_retry(worker_pool, 77, which) == 77
    await jobs.dead_discard(worker_pool, 77, TENANT_B)
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.dead_jobs") == 0
    assert await admin_pool.fetchval("SELECT tenant_id FROM tenantry.jobs") == TENANT_A
