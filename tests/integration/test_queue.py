"""The queue against a real PostgreSQL: enqueue, claim, outcomes, leases."""

from __future__ import annotations

import uuid
from datetime import timedelta

import anyio
import asyncpg
import pytest

from tenantry import db
from tenantry.errors import Invalid, PermanentFailure, Snooze
from tenantry.jobs import queue as jobs
from tenantry.jobs.maintenance import LeaseRescuer
from tenantry.jobs.model import Job
from tenantry.jobs.outcomes import Bury, Complete, Release, Retry
from tenantry.jobs.registry import Policy, Registry
from tenantry.jobs.worker import Claimed, Worker, WorkerConfig
from tenantry.tenancy import tenant_tx_on
from tests.helpers import TENANT_A, TENANT_B, FakeClock, FixedRandom, one, running_worker


async def test_sql_enqueue_in_foreign_transaction_runs_once_after_commit(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool, database_url: str
) -> None:
    seen: list[int] = []
    reg = Registry()

    @reg.handler("note")
    async def note(job: Job) -> None:
        seen.append(job.payload["n"])

    other = await db.connect(database_url)
    try:
        async with running_worker(pool, worker_pool, reg) as (_w, rec):
            tx = other.transaction()
            await tx.start()
            job_id = await other.fetchval(
                "SELECT tenantry.enqueue(tenant_id => $1, kind => 'note', payload => $2)",
                TENANT_A,
                {"n": 1},
            )
            # A plain INSERT with defaults works too.
            await other.execute(
                "INSERT INTO tenantry.jobs (tenant_id, kind, payload) VALUES ($1, 'note', $2)",
                TENANT_A,
                {"n": 2},
            )
            # Not committed: a claim sees nothing.
            visible = await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs")
            assert visible == 0
            assert rec.named("started") == []
            await tx.commit()
            await rec.wait_flushed(2)
        assert sorted(seen) == [1, 2]
        assert isinstance(job_id, int)
        assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0
        ok = await admin_pool.fetchval("SELECT sum(succeeded) FROM tenantry.job_counters")
        assert ok == 2
    finally:
        await other.close()


async def test_rolled_back_enqueue_never_runs(admin_pool: asyncpg.Pool, pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError):
            async with tenant_tx_on(conn, TENANT_A):
                await jobs.enqueue(conn, tenant_id=TENANT_A, kind="x")
                raise RuntimeError("roll back")
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0


async def test_dedup_key_returns_live_job(admin_pool: asyncpg.Pool, pool: asyncpg.Pool) -> None:
    a = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k", dedup_key="once")
    b = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k", dedup_key="once")
    c = await jobs.enqueue(pool, tenant_id=TENANT_B, kind="k", dedup_key="once")
    assert a == b
    assert c != a  # keys are per tenant
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 2


async def test_dedup_key_is_free_again_after_the_job_finished(
    worker_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    reg = Registry()

    @reg.handler("k")
    async def k(job: Job) -> None:
        return None

    first = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k", dedup_key="d")
    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_flushed(1)
    second = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k", dedup_key="d")
    assert second != first


async def test_concurrent_dedup_enqueues_make_one_job(database_url: str) -> None:
    conns = [await db.connect(database_url) for _ in range(8)]
    ids: list[int] = []
    try:

        async def one(c: asyncpg.Connection) -> None:
            ids.append(await jobs.enqueue(c, tenant_id=TENANT_A, kind="k", dedup_key="race"))

        async with anyio.create_task_group() as tg:
            for c in conns:
                tg.start_soon(one, c)
        assert len(set(ids)) == 1
        assert await conns[0].fetchval("SELECT count(*) FROM tenantry.jobs") == 1
    finally:
        for c in conns:
            await c.close()


async def test_enqueue_rejects_bad_input_and_writes_nothing(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    with pytest.raises(Invalid) as err:
        await jobs.enqueue(pool, tenant_id="not-a-uuid", kind="k")
    assert err.value.field == "tenant_id"
    with pytest.raises(Invalid):
        await jobs.enqueue(pool, tenant_id=TENANT_A, kind="")
    with pytest.raises(asyncpg.PostgresError):
        await admin_pool.fetchval("SELECT tenantry.enqueue(tenant_id => NULL, kind => 'k')")
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0


async def test_priority_then_run_at_order(worker_pool: asyncpg.Pool, pool: asyncpg.Pool) -> None:
    order: list[str] = []
    reg = Registry()

    @reg.handler("p")
    async def p(job: Job) -> None:
        order.append(job.payload["name"])

    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="p", payload={"name": "low-old"}, priority=0)
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="p", payload={"name": "high"}, priority=5)
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="p", payload={"name": "low-new"}, priority=0)
    async with running_worker(pool, worker_pool, reg, queues={"default": 1}) as (_w, rec):
        await rec.wait_flushed(3)
    assert order == ["high", "low-old", "low-new"]


async def test_queues_are_separate(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    ran: list[str] = []
    reg = Registry()

    @reg.handler("a")
    async def a(job: Job) -> None:
        ran.append("a")

    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="a", queue="alpha")
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="a", queue="beta")
    async with running_worker(pool, worker_pool, reg, queues={"alpha": 2}) as (_w, rec):
        await rec.wait_flushed(1)
    assert ran == ["a"]
    left = await admin_pool.fetch("SELECT queue FROM tenantry.jobs")
    assert [r["queue"] for r in left] == ["beta"]


async def test_delayed_job_starts_on_time(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    reg = Registry()
    started_at: list[float] = []

    @reg.handler("later")
    async def later(job: Job) -> None:
        started_at.append(anyio.current_time())

    # Long poll interval: only the worker's own due-time timer can start it on time.
    async with running_worker(pool, worker_pool, reg, poll_interval=30) as (w, rec):
        await w.loops["default"]._refresh_due()  # what every poll does
        due = await admin_pool.fetchval("SELECT now() + interval '700 milliseconds'")
        await jobs.enqueue(pool, tenant_id=TENANT_A, kind="later", run_at=due)
        t0 = anyio.current_time()
        # The worker learns of it by its poll; emulate the poll having happened.
        await w.loops["default"]._refresh_due()
        w.loops["default"].wake()
        await rec.wait_flushed(1)
    delay = started_at[0] - t0
    assert 0.6 <= delay <= 0.9, delay


async def test_retry_schedule_uses_injected_clock_and_random(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    clock = FakeClock()
    reg = Registry()

    @reg.handler("flaky", policy=Policy(max_attempts=5, backoff_base=2.0, backoff_cap=100.0))
    async def flaky(job: Job) -> None:
        raise RuntimeError("boom")

    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="flaky")
    async with running_worker(pool, worker_pool, reg, clock=clock, rnd=FixedRandom(0.5)) as (
        _w,
        rec,
    ):
        await rec.wait_flushed(1)
    row = await one(admin_pool, "SELECT * FROM tenantry.jobs")
    # attempt 1 failed: delay = 0.5 * min(100, 2 * 2**0) = 1.0 s after the clock's now
    assert row["run_at"] == clock.at + timedelta(seconds=1.0)
    assert row["state"] == "scheduled"  # due later: it waits out its backoff
    assert row["attempts"] == 1
    assert row["last_error"] == "RuntimeError: boom"
    assert row["errors"][0]["attempt"] == 1
    assert "Traceback" in row["errors"][0]["traceback"]
    assert await admin_pool.fetchval("SELECT sum(failed) FROM tenantry.job_counters") == 1


async def test_exhausted_job_is_dead_lettered_with_every_error(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    reg = Registry()

    @reg.handler("bad", policy=Policy(max_attempts=3, backoff_base=0.001, backoff_cap=0.001))
    async def bad(job: Job) -> None:
        raise ValueError(f"attempt {job.attempt}")

    job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="bad")
    async with running_worker(pool, worker_pool, reg, poll_interval=0.05) as (_w, rec):
        await rec.wait_for(
            lambda: any(isinstance(o, Bury) for d in rec.named("flushed") for o in d["outcomes"])
        )
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0
    dead = await jobs.dead_show(worker_pool, job_id)
    assert dead["reason"] == "exhausted"
    assert dead["attempts"] == 3
    assert [e["error"] for e in dead["errors"]] == [
        "ValueError: attempt 1",
        "ValueError: attempt 2",
        "ValueError: attempt 3",
    ]
    # Retry from the dead letter table puts it back with fresh attempts.
    assert await jobs.dead_retry(worker_pool, job_id) == job_id
    row = await one(admin_pool, "SELECT attempts, state FROM tenantry.jobs WHERE id = $1", job_id)
    assert (row["attempts"], row["state"]) == (0, "queued")
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.dead_jobs") == 0


async def test_permanent_failure_goes_straight_to_dead_letter(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    reg = Registry()

    @reg.handler("never")
    async def never(job: Job) -> None:
        raise PermanentFailure("address does not exist")

    job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="never")
    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_flushed(1)
    dead = await jobs.dead_show(worker_pool, job_id)
    assert (dead["reason"], dead["attempts"]) == ("permanent", 1)
    await jobs.dead_discard(worker_pool, job_id)
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.dead_jobs") == 0


async def test_unknown_kind_is_dead_lettered_not_dropped(
    worker_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="nobody-handles-this")
    async with running_worker(pool, worker_pool, Registry(), unknown_kind_retry=0) as (_w, rec):
        await rec.wait_flushed(1)
    assert (await jobs.dead_show(worker_pool, job_id))["reason"] == "unknown_kind"


async def test_an_unknown_kind_is_retried_for_a_while_then_dead_lettered(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: during a rolling deploy an old process dead-lettered at once the
    new kinds it had no handler for.  Now it retries them, its attempts untouched,
    until the kind has been unknown for `unknown_kind_retry`; a process that knows the
    kind runs it meanwhile."""
    clock = FakeClock()
    job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="new.kind")
    old = Registry()
    async with running_worker(
        pool, worker_pool, old, clock=clock, rnd=FixedRandom(0.5), unknown_kind_retry=3600
    ) as (_w, rec):
        await rec.wait_flushed(1)
    row = await one(admin_pool, "SELECT * FROM tenantry.jobs WHERE id = $1", job_id)
    assert (row["state"], row["attempts"]) == ("scheduled", 0)
    assert row["unknown_kind_since"] is not None
    assert "no handler registered for kind 'new.kind'" in row["last_error"]
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.dead_jobs") == 0
    # A new process knows it: the job runs, with all its attempts.
    await admin_pool.execute("UPDATE tenantry.jobs SET run_at = now()")
    new = Registry()
    attempts: list[int] = []

    @new.handler("new.kind")
    async def handle(job: Job) -> None:
        attempts.append(job.attempt)

    async with running_worker(pool, worker_pool, new) as (_w, rec):
        await rec.wait_flushed(1)
    assert attempts == [1]
    # And one that nobody ever knows is dead-lettered once the window has passed.
    lost = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="never.deployed")
    await admin_pool.execute(
        "UPDATE tenantry.jobs SET unknown_kind_since = $1 WHERE id = $2",
        clock.at - timedelta(seconds=3601),
        lost,
    )
    async with running_worker(pool, worker_pool, old, clock=clock, unknown_kind_retry=3600) as (
        _w,
        rec,
    ):
        await rec.wait_flushed(1)
    dead = await jobs.dead_show(worker_pool, lost)
    assert (dead["reason"], dead["attempts"]) == ("unknown_kind", 1)


async def test_snooze_does_not_use_an_attempt(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    clock = FakeClock()
    reg = Registry()

    @reg.handler("wait")
    async def wait(job: Job) -> None:
        raise Snooze(60)

    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="wait")
    async with running_worker(pool, worker_pool, reg, clock=clock) as (_w, rec):
        await rec.wait_flushed(1)
    row = await one(admin_pool, "SELECT * FROM tenantry.jobs")
    assert row["attempts"] == 0
    assert row["run_at"] == clock.at + timedelta(seconds=60)
    assert row["errors"] == []
    assert isinstance(rec.named("flushed")[0]["outcomes"][0], Retry)


async def test_timeout_cancels_and_counts_as_failed_attempt(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    reg = Registry()
    cancelled = anyio.Event()

    @reg.handler("slow", policy=Policy(timeout=0.2, max_attempts=2))
    async def slow(job: Job) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="slow")
    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_flushed(1)
    assert cancelled.is_set()
    row = await one(admin_pool, "SELECT * FROM tenantry.jobs")
    assert row["attempts"] == 1
    assert row["last_error"] == "timed out after 0.2s"


async def test_lease_rescue_after_worker_dies(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """A worker claims and then vanishes without heartbeating: the rescuer requeues the
    job once its lease expires, and another worker completes it."""
    job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="work")
    dead_worker = Worker(
        pool,
        Registry(),
        WorkerConfig(queues={"default": 1}, lease_seconds=30),
        owner="doomed",
        worker_pool=worker_pool,
    )
    got = await dead_worker.claim("default", 1, None)
    assert got is not None and [r["id"] for r in got.rows] == [job_id]
    # The "doomed" worker never heartbeats or completes.  Its lease has not expired yet:
    rescued: list[str] = []
    rescuer = LeaseRescuer(worker_pool, rescued.append)
    assert await rescuer.run_once() == 0
    # ...now it has (time moved on: the acceptance test waits for a real expiry).
    await admin_pool.execute("UPDATE tenantry.jobs SET lease_expires_at = now() - interval '1 ms'")
    assert await rescuer.run_once() == 1
    assert rescued == ["default"]
    row = await one(admin_pool, "SELECT * FROM tenantry.jobs WHERE id = $1", job_id)
    assert (row["state"], row["attempts"], row["lease_owner"]) == ("queued", 1, None)
    assert "lease expired" in row["last_error"]

    ran: list[int] = []
    reg = Registry()

    @reg.handler("work")
    async def work(job: Job) -> None:
        ran.append(job.attempt)

    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_flushed(1)
    assert ran == [2]
    # The dead worker's late completion must not touch a job it no longer owns.
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0


async def test_rescued_job_past_its_last_attempt_is_buried(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="w", max_attempts=1)
    w = Worker(
        pool,
        Registry(),
        WorkerConfig(queues={"default": 1}, lease_seconds=30),
        owner="doomed",
        worker_pool=worker_pool,
    )
    await w.claim("default", 1, None)
    await admin_pool.execute("UPDATE tenantry.jobs SET lease_expires_at = now() - interval '1 ms'")
    assert await LeaseRescuer(worker_pool, lambda _q: None).run_once() == 1
    reg = Registry()

    @reg.handler("w")
    async def handler(job: Job) -> None:
        raise AssertionError("must not run a job with no attempts left")

    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_flushed(1)
    dead = await jobs.dead_show(worker_pool, job_id)
    # Buried without running again: the claim that found it is not an attempt.
    assert (dead["reason"], dead["attempts"]) == ("exhausted", 1)


async def test_heartbeat_extends_lease_and_cancels_lost_jobs(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    reg = Registry()
    gate = anyio.Event()

    @reg.handler("hold")
    async def hold(job: Job) -> None:
        await gate.wait()

    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="hold")
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="hold")
    async with running_worker(pool, worker_pool, reg, lease_seconds=60) as (w, rec):
        await rec.wait_for(lambda: len(rec.named("started")) == 2)
        before = await admin_pool.fetch(
            "SELECT id, lease_expires_at FROM tenantry.jobs ORDER BY id"
        )
        # Another worker stole one job (as a rescue would after a stall).
        stolen = before[0]["id"]
        await admin_pool.execute(
            "UPDATE tenantry.jobs SET lease_owner = 'thief' WHERE id = $1", stolen
        )
        assert await w.heartbeat_once() == 1
        await rec.wait_for(lambda: len(rec.named("finished")) == 1)
        fin = rec.named("finished")[0]
        assert fin["job"].id == stolen and fin["why"] == "lease_lost" and fin["outcome"] is None
        after = await admin_pool.fetchval(
            "SELECT lease_expires_at FROM tenantry.jobs WHERE id = $1", before[1]["id"]
        )
        assert after > before[1]["lease_expires_at"]
        gate.set()
        await rec.wait_flushed(1)


async def test_graceful_shutdown_releases_unfinished_jobs(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    reg = Registry()

    @reg.handler("forever")
    async def forever(job: Job) -> None:
        await anyio.sleep_forever()

    job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="forever")
    async with running_worker(pool, worker_pool, reg) as (w, rec):
        await rec.wait_for(lambda: len(rec.named("started")) == 1)
        await w.shutdown(grace=0.1)
    assert isinstance(rec.named("flushed")[0]["outcomes"][0], Release)
    row = await one(admin_pool, "SELECT * FROM tenantry.jobs WHERE id = $1", job_id)
    # Handed back at once, the interrupted attempt refunded.
    assert (row["state"], row["attempts"], row["lease_owner"]) == ("queued", 0, None)


async def test_hard_stop_during_grace_ends_the_shutdown_at_once(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: shutdown() and run() both waited for idle, and each replaced the
    other's event, so a hard stop during the grace period left shutdown() waiting for
    the whole grace period (the process did not exit on a second signal)."""
    reg = Registry()

    @reg.handler("forever")
    async def forever(job: Job) -> None:
        await anyio.sleep_forever()

    for _ in range(3):
        await jobs.enqueue(pool, tenant_id=TENANT_A, kind="forever")
    async with running_worker(pool, worker_pool, reg) as (w, rec):
        await rec.wait_for(lambda: len(rec.named("started")) == 3)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(w.shutdown, 600.0)
                # Both wait for idle now: shutdown (its grace) and then run().
                await rec.wait_for(lambda: bool(rec.named("claiming_stopped")))
                w.cancel_running("hard_stop")
    assert {f["why"] for f in rec.named("finished")} == {"hard_stop"}
    assert (
        await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs WHERE state = 'queued'") == 3
    )


async def test_complete_in_tx_completes_the_job_in_the_same_transaction(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    await admin_pool.execute("CREATE TABLE public.effects (tenant_id uuid, job_id bigint UNIQUE)")
    await admin_pool.execute("GRANT ALL ON public.effects TO tenantry_service")
    reg = Registry()
    calls = 0

    @reg.handler("effect")
    async def effect(job: Job) -> None:
        nonlocal calls
        calls += 1
        async with job.complete_in_tx() as tx:
            assert await tx.fetchval("SELECT current_setting('app.tenant_id')") == str(
                job.tenant_id
            )
            await tx.execute("INSERT INTO public.effects VALUES ($1, $2)", job.tenant_id, job.id)

    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="effect")
    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_for(lambda: len(rec.named("finished")) == 1)
    assert calls == 1
    assert rec.named("finished")[0]["outcome"] is None  # completed inside the handler's tx
    assert await admin_pool.fetchval("SELECT count(*) FROM public.effects") == 1
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0
    assert await admin_pool.fetchval("SELECT sum(succeeded) FROM tenantry.job_counters") == 1


async def test_complete_in_tx_rolls_back_when_lease_was_lost(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    await admin_pool.execute("CREATE TABLE public.effects (job_id bigint)")
    await admin_pool.execute("GRANT ALL ON public.effects TO tenantry_service")
    reg = Registry()

    @reg.handler("effect", policy=Policy(max_attempts=1))
    async def effect(job: Job) -> None:
        await admin_pool.execute(
            "UPDATE tenantry.jobs SET lease_owner = 'thief' WHERE id = $1", job.id
        )
        async with job.complete_in_tx() as tx:
            await tx.execute("INSERT INTO public.effects VALUES ($1)", job.id)

    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="effect")
    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_for(lambda: len(rec.named("finished")) == 1)
    assert await admin_pool.fetchval("SELECT count(*) FROM public.effects") == 0


async def test_many_jobs_complete_in_batches(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    reg = Registry()

    @reg.handler("noop")
    async def noop(job: Job) -> None:
        return None

    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind)"
        " SELECT $1, 'noop' FROM generate_series(1, 2000)",
        TENANT_A,
    )
    async with running_worker(pool, worker_pool, reg, queues={"default": 100}) as (_w, rec):
        await rec.wait_flushed(2000, timeout=30)
    flushes = rec.named("flushed")
    assert all(isinstance(o, Complete) for d in flushes for o in d["outcomes"])
    assert len(flushes) < 2000 / 5  # batched, not one statement per job
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0
    assert await admin_pool.fetchval("SELECT sum(succeeded) FROM tenantry.job_counters") == 2000


async def test_stats_report_depth_age_running_failed_dead(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="a")
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="a", queue="mail")
    await admin_pool.execute(
        "INSERT INTO tenantry.dead_jobs (tenant_id, id, queue, kind, payload, priority, attempts,"
        " errors, reason, created_at) VALUES ($1, 999, 'mail', 'a', '{}', 0, 3, '[]',"
        " 'exhausted', now())",
        TENANT_A,
    )
    stats = {s.queue: s for s in await jobs.stats(worker_pool)}
    assert stats["default"].available == 1
    assert stats["mail"].available == 1 and stats["mail"].dead == 1
    assert stats["default"].oldest_age_s >= 0


async def test_stats_tell_failed_attempts_from_dead_jobs(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: `failed_1h` counted every failed attempt, retries that later
    succeeded included, under a name that read as jobs failed."""
    reg = Registry()
    tries: dict[str, int] = {}

    @reg.handler("flaky", policy=Policy(max_attempts=3, backoff_base=0.01, backoff_cap=0.01))
    async def flaky(job: Job) -> None:
        tries["flaky"] = tries.get("flaky", 0) + 1
        if tries["flaky"] == 1:
            raise RuntimeError("first try fails")

    @reg.handler("doomed", policy=Policy(max_attempts=1))
    async def doomed(job: Job) -> None:
        raise RuntimeError("always fails")

    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="flaky")
    doomed_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="doomed")
    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_flushed(3)
    # Its row held NULL (the kind's policy): shown is the policy's, not null.
    assert (await jobs.dead_show(worker_pool, doomed_id))["max_attempts"] == 1
    [s] = await jobs.stats(worker_pool)
    assert s.succeeded_1h == 1  # the flaky job, on its second attempt
    assert s.attempts_failed_1h == 2  # its first attempt, and the doomed job's only one
    assert s.died_1h == 1 and s.dead == 1


async def test_second_version_check(database_url: str) -> None:
    """Which server this ran on (the CI runs the integration tests on two majors)."""
    c = await asyncpg.connect(database_url)
    try:
        version = await c.fetchval("SHOW server_version_num")
    finally:
        await c.close()
    assert int(version) >= 150000


async def test_unique_tenant_ids_do_not_collide(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    tenants = [uuid.uuid4() for _ in range(5)]
    for t in tenants:
        await jobs.enqueue(pool, tenant_id=t, kind="k")
    got = await admin_pool.fetch("SELECT DISTINCT tenant_id FROM tenantry.jobs")
    assert {r["tenant_id"] for r in got} == set(tenants)


async def test_a_failing_claim_loop_keeps_the_queue_alive(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    """Regression: an unexpected error in a queue's claim loop (a bench's claim without
    a column the loop reads) ended the worker's run() without setting its done event,
    and shutdown() then waited forever.  Now the loop logs it and carries on."""

    class Flaky(Worker):
        failures = 0

        async def claim(self, queue: str, limit: int, cursor: uuid.UUID | None) -> Claimed | None:
            if self.failures == 0:
                self.failures += 1
                raise RuntimeError("bug in the claim loop")
            return await super().claim(queue, limit, cursor)

    reg = Registry()
    ran = anyio.Event()

    @reg.handler("w")
    async def w(job: Job) -> None:
        ran.set()

    worker = Flaky(
        pool,
        reg,
        WorkerConfig(queues={"default": 2}, poll_interval=0.05),
        worker_pool=worker_pool,
    )
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="w")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await ran.wait()
            await worker.shutdown(grace=5)
    assert worker.failures == 1


async def test_rows_of_a_claim_in_flight_at_shutdown_are_handed_back(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    """Regression: rows returned by a claim that was in flight when shutdown began were
    neither started nor released: they stayed leased until the lease ran out, and the
    rescue then counted an attempt they never had."""
    in_claim = anyio.Event()
    go_on = anyio.Event()

    class Slow(Worker):
        async def claim(self, queue: str, limit: int, cursor: uuid.UUID | None) -> Claimed | None:
            in_claim.set()
            await go_on.wait()
            return await super().claim(queue, limit, cursor)

    reg = Registry()

    @reg.handler("w")
    async def w(job: Job) -> None:
        raise AssertionError("must not start after shutdown began")

    job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="w")
    worker = Slow(
        pool,
        reg,
        WorkerConfig(queues={"default": 2}, poll_interval=0.05),
        worker_pool=worker_pool,
    )
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await in_claim.wait()
            worker.stop_claiming()
            go_on.set()
            await worker.shutdown(grace=5)
    row = await one(
        admin_pool, "SELECT state, attempts, lease_owner FROM tenantry.jobs WHERE id = $1", job_id
    )
    assert dict(row) == {"state": "queued", "attempts": 0, "lease_owner": None}


async def test_a_job_dying_again_replaces_its_old_dead_row(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: a dead row already holding the job's id (a restored row) made the
    bury fail, and the outcome batch was retried forever, holding up the other jobs
    of the batch."""
    reg = Registry()

    @reg.handler("doomed")
    async def doomed(_job: Job) -> None:
        raise PermanentFailure("again")

    @reg.handler("fine")
    async def fine(_job: Job) -> None:
        pass

    job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="doomed")
    await admin_pool.execute(
        "INSERT INTO tenantry.dead_jobs (tenant_id, id, queue, kind, payload, priority,"
        " attempts, errors, reason, created_at)"
        " VALUES ($1, $2, 'default', 'doomed', '{}', 0, 3, '[]', 'exhausted', now())",
        TENANT_A,
        job_id,
    )
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="fine")
    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_flushed(2)
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0
    dead = await jobs.dead_show(worker_pool, job_id)
    assert (dead["reason"], dead["attempts"], dead["last_error"]) == (
        "permanent",
        1,
        "PermanentFailure: again",
    )
