"""Regressions found by the second adversarial review, each reproduced first: wake-ups
under REPEATABLE READ, under a hostile search_path and across many queues; the dead
hook of a payload the worker cannot decode; a capped tenant's backlog; a slow commit
that the throttle kept quiet; a handler raising CancelledError of its own."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

import anyio
import asyncpg

from tenantry.jobs import queue as jobs
from tenantry.jobs.model import Job
from tenantry.jobs.registry import DeadLetter, Policy, Registry
from tenantry.jobs.worker import Claimed
from tenantry.listener import Listener
from tests.helpers import TENANT_A, TENANT_B, Recorder, running_worker
from tests.integration.test_listener_and_periodic import Heard


async def test_a_repeatable_read_producer_commits_and_is_heard(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, database_url: str
) -> None:
    """Regression: at commit the wake-up locked and updated the throttle row; a
    REPEATABLE READ transaction whose snapshot predates another producer's wake-up
    failed there ("could not serialize access due to concurrent update"), so its
    enqueue was lost to a wake-up."""
    await worker_pool.execute("SELECT tenantry.ensure_wake_keys(ARRAY['rr'])")
    heard = await Heard.on(database_url, "tenantry_jobs")
    try:
        async with pool.acquire() as rr, rr.transaction(isolation="repeatable_read"):
            await rr.execute("SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A))
            # The snapshot is taken; another producer's wake-up updates the row.
            await jobs.enqueue(pool, tenant_id=TENANT_B, kind="x", queue="rr")
            await heard.wait(1)
            await anyio.sleep(0.006)  # past its 5 ms window
            await jobs.enqueue(rr, tenant_id=TENANT_A, kind="x", queue="rr")
        await heard.wait(2)
    finally:
        await heard.conn.close()


async def test_the_wake_up_ignores_the_callers_search_path(
    admin_pool: asyncpg.Pool, app_url: str
) -> None:
    """Regression: the wake-up function has no SET search_path (it costs a fifth of the
    insert rate) and named its operators unqualified, so a schema ahead of pg_catalog
    on the caller's search_path replaced them, and code of that schema's owner ran
    inside every insert's commit, whatever role committed it."""
    await admin_pool.execute(
        """
        CREATE SCHEMA evil;
        GRANT USAGE ON SCHEMA evil TO PUBLIC;
        CREATE FUNCTION evil.gt(timestamptz, timestamptz) RETURNS boolean
            LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked >'; END $$;
        CREATE OPERATOR evil.> (LEFTARG = timestamptz, RIGHTARG = timestamptz,
                                FUNCTION = evil.gt);
        CREATE FUNCTION evil.le(timestamptz, timestamptz) RETURNS boolean
            LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked <='; END $$;
        CREATE OPERATOR evil.<= (LEFTARG = timestamptz, RIGHTARG = timestamptz,
                                 FUNCTION = evil.le);
        CREATE FUNCTION evil.eq(text, text) RETURNS boolean
            LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked ='; END $$;
        CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq);
        CREATE FUNCTION evil.cat(text, text) RETURNS text
            LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked ||'; END $$;
        CREATE OPERATOR evil.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.cat);
        CREATE FUNCTION evil.minus(timestamptz, interval) RETURNS timestamptz
            LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked -'; END $$;
        CREATE OPERATOR evil.- (LEFTARG = timestamptz, RIGHTARG = interval,
                                FUNCTION = evil.minus);
        CREATE FUNCTION evil.lt(integer, integer) RETURNS boolean
            LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked <'; END $$;
        CREATE OPERATOR evil.< (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.lt);
        """
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.notify_throttle (key) VALUES ('tenantry_jobs:h')"
    )
    producer = await asyncpg.connect(app_url)
    try:
        await producer.execute("SET search_path = evil, pg_catalog, public")
        for queue in ("h", "no-row"):  # with a throttle row and without
            async with producer.transaction():
                await producer.execute(
                    "SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A)
                )
                await producer.execute(
                    "INSERT INTO tenantry.jobs (tenant_id, queue, kind) VALUES ($1, $2, 'x')",
                    TENANT_A,
                    queue,
                )
    finally:
        await producer.close()
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 2


async def test_a_transaction_into_many_queues_leaves_no_setting_per_queue(
    app_url: str,
) -> None:
    """Regression: the once-per-transaction guard was a setting per queue; each
    stays defined for the session's life, and PostgreSQL 15 scans them all on every
    change, so one transaction inserting into thousands of queues took quadratic
    time, and the session kept thousands of settings."""
    conn = await asyncpg.connect(app_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A))
            await conn.execute(
                "INSERT INTO tenantry.jobs (tenant_id, queue, kind)"
                " SELECT $1, 'many-' || g, 'k' FROM generate_series(1, 200) g",
                TENANT_A,
            )
        # pg_settings does not list placeholder settings; ask for each guard's name.
        left = await conn.fetchval(
            "SELECT count(*) FROM generate_series(1, 200) g"
            " WHERE current_setting('tenantry.woke_'"
            "       || to_hex(hashtext('tenantry_jobs:many-' || g)), true) IS NOT NULL"
        )
        assert left == 0
    finally:
        await conn.close()


async def test_the_dead_hook_runs_for_a_payload_the_worker_cannot_decode(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: the hook job carried the dead job's payload as JSON; a payload the
    worker cannot decode made the hook job undecodable too, so it was buried in turn
    and the hook never ran.  The hook now gets such a payload as its text."""
    poison = "[" * 1100 + "]" * 1100
    dead_id = await admin_pool.fetchval(
        "INSERT INTO tenantry.jobs (tenant_id, kind, payload) VALUES ($1, 'k', $2::text::jsonb)"
        " RETURNING id",
        TENANT_A,
        poison,
    )
    fine_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k", payload={"n": 1})
    reg = Registry()
    got: dict[int, DeadLetter] = {}
    both = anyio.Event()

    async def on_dead(job: Job, dead: DeadLetter) -> None:
        got[dead.job_id] = dead
        if len(got) == 2:
            both.set()

    @reg.handler("k", policy=Policy(max_attempts=1), on_dead=on_dead)
    async def k(job: Job) -> None:
        raise RuntimeError("no")

    async with running_worker(pool, worker_pool, reg):
        with anyio.fail_after(10):
            await both.wait()
    assert got[dead_id].reason == "permanent"
    assert got[dead_id].payload == poison  # its text, as stored
    assert got[fine_id].reason == "exhausted" and got[fine_id].payload == {"n": 1}


async def test_a_capped_tenant_drains_without_waiting_for_polls(
    worker_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: a claim that left rows behind only because their tenant was at its
    cap said nothing was left, and the worker claimed again at its next poll: a tenant
    capped at 1 ran one job per poll interval however idle the worker was."""
    for _ in range(8):
        await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k")
    reg = Registry()

    @reg.handler("k")
    async def k(job: Job) -> None:
        return None

    async with running_worker(pool, worker_pool, reg, tenant_concurrency=1, poll_interval=60) as (
        _w,
        rec,
    ):
        await rec.wait_flushed(8, timeout=10)


async def test_a_quiet_commit_that_lands_late_is_fetched_without_a_poll(
    admin_pool: asyncpg.Pool, worker_pool: asyncpg.Pool, pool: asyncpg.Pool, database_url: str
) -> None:
    """Regression: a commit within another's 5 ms wake-up window stays quiet, and the
    worker fetched once more 11 ms after the wake-up; a quiet commit that took longer
    to become visible (here a deferred trigger of the producer's own sleeps 50 ms)
    waited for the next poll."""
    await admin_pool.execute(
        """
        CREATE TABLE public.slow_commit (x int);
        GRANT INSERT ON public.slow_commit TO PUBLIC;
        CREATE FUNCTION public.sleep_a_little() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER z_sleep AFTER INSERT ON public.slow_commit
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
            EXECUTE FUNCTION public.sleep_a_little();
        """
    )
    reg = Registry()
    ran: list[str] = []
    both = anyio.Event()

    @reg.handler("k")
    async def k(job: Job) -> None:
        ran.append(job.payload["who"])
        if len(ran) == 2:
            both.set()

    await worker_pool.execute("SELECT tenantry.ensure_wake_keys(ARRAY['default'])")
    async with (
        running_worker(pool, worker_pool, reg, poll_interval=60) as (w, _rec),
        anyio.create_task_group() as tg,
    ):
        listener = Listener(database_url, {"tenantry_jobs": w.notify}, [w.resync])
        await tg.start(listener.run)
        async with pool.acquire() as slow, slow.transaction():
            await slow.execute("SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A))
            await jobs.enqueue(slow, tenant_id=TENANT_A, kind="k", payload={"who": "quiet"})
            await slow.execute("INSERT INTO public.slow_commit VALUES (1)")
            # Another producer's wake-up commits just before this one's commit starts.
            await jobs.enqueue(pool, tenant_id=TENANT_B, kind="k", payload={"who": "first"})
        with anyio.fail_after(5):
            await both.wait()
        tg.cancel_scope.cancel()
    assert sorted(ran) == ["first", "quiet"]


async def test_a_handler_raising_cancelled_error_fails_its_attempt(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: a CancelledError raised by the handler itself (a future cancelled
    elsewhere, a library's internal cancellation) was taken for the worker's own and
    let through: the job's outcome was never written, and it waited for its lease to
    run out."""
    reg = Registry()

    @reg.handler("c", policy=Policy(max_attempts=1))
    async def c(job: Job) -> None:
        raise asyncio.CancelledError()

    job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="c")
    async with running_worker(pool, worker_pool, reg, lease_seconds=300) as (_w, rec):
        await rec.wait_flushed(1, timeout=10)
    dead = await jobs.dead_show(worker_pool, job_id)
    assert dead["reason"] == "exhausted" and "CancelledError" in dead["last_error"]
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0


async def test_a_capped_queue_does_not_claim_for_other_queues_outcomes(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression (third review): every outcome written woke every queue whose last
    claim was capped, so a queue held at its cap by long jobs claimed again for each
    batch of another queue's outcomes: 1,000 useless claims a second with five such
    queues beside a busy one."""
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, queue, kind)"
        " SELECT $1, 'slow', 'slow' FROM generate_series(1, 3)",
        TENANT_A,
    )
    reg = Registry()
    release = anyio.Event()

    @reg.handler("slow")
    async def slow(job: Job) -> None:
        await release.wait()

    @reg.handler("fast")
    async def fast(job: Job) -> None:
        return None

    claims: Counter[str] = Counter()
    async with running_worker(
        pool, worker_pool, reg, queues={"slow": 2, "fast": 4}, tenant_concurrency=1,
        poll_interval=60,
    ) as (w, rec):  # fmt: skip

        async def counted(
            claim: Callable[[str, int, uuid.UUID | None], Awaitable[Claimed | None]],
            queue: str,
            limit: int,
            cursor: uuid.UUID | None,
        ) -> Claimed | None:
            claims[queue] += 1
            return await claim(queue, limit, cursor)

        # Both claims: a NOTIFY's (re-arming the throttle) and the others.
        w.claim = functools.partial(counted, w.claim)  # type: ignore[method-assign]
        w.claim_rearming = functools.partial(counted, w.claim_rearming)  # type: ignore[method-assign]
        await rec.wait_for(lambda: bool(rec.named("started")))  # the slow queue is capped
        claims.clear()
        for i in range(30):  # thirty outcome batches of the fast queue, one at a time
            await jobs.enqueue(pool, tenant_id=TENANT_B, kind="fast", queue="fast")
            w.notify("fast")
            await rec.wait_for(functools.partial(_flushed_at_least, rec, i + 1))
        release.set()
    assert claims["fast"] >= 30
    assert claims["slow"] <= 3, f"{claims['slow']} claims of the capped queue"


def _flushed_at_least(rec: Recorder, batches: int) -> bool:
    return len(rec.named("flushed")) >= batches


async def test_a_queue_name_holding_a_line_break_cannot_silence_another_queue(
    app_url: str, database_url: str
) -> None:
    """Regression (third review): the wake-up listed the keys a transaction had decided
    on one per line, and a queue name may hold a line break: after a row of queue
    'x<newline>tenantry_jobs:y', a row of queue 'y' in the same transaction was taken
    as already woken."""
    heard = await Heard.on(database_url, "tenantry_jobs")
    conn = await asyncpg.connect(app_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A))
            for queue in ("x\ntenantry_jobs:y", "y"):
                await conn.execute(
                    "INSERT INTO tenantry.jobs (tenant_id, queue, kind) VALUES ($1, $2, 'k')",
                    TENANT_A,
                    queue,
                )
        await heard.wait(2)
        assert sorted(heard.payloads) == ["x\ntenantry_jobs:y", "y"]
    finally:
        await conn.close()
        await heard.conn.close()


async def test_an_outcome_written_during_a_capped_claim_wakes_the_loop(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """Regression (fourth review): a written outcome woke the loop only when the last
    claim had said `capped`, so an outcome written while a claim was on its way back
    was lost when that claim came back capped: the freed tenant's next job waited for
    the poll."""
    reg = Registry()
    release = anyio.Event()
    started: list[int] = []

    @reg.handler("k")
    async def k(job: Job) -> None:
        started.append(job.id)
        if job.payload.get("first"):
            await release.wait()

    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k", queue="q", payload={"first": True})
    interleaved = False
    claimed = anyio.Event()
    async with running_worker(
        pool, worker_pool, reg, queues={"q": 2}, tenant_concurrency=1, poll_interval=60,
        trailing_fetch=60, late_trailing_fetch=60,
    ) as (w, rec):  # fmt: skip

        async def outcome_in_flight(
            claim: Callable[[str, int, uuid.UUID | None], Awaitable[Claimed | None]],
            queue: str,
            limit: int,
            cursor: uuid.UUID | None,
        ) -> Claimed | None:
            nonlocal interleaved
            got = await claim(queue, limit, cursor)
            claimed.set()
            # The claim that finds the second job held back (no rows, capped); not the
            # first one, which may come through here too (the loop reads its queue's
            # controls before its first claim) and brings the first job itself.
            if got is not None and got.capped and not got.rows and not release.is_set():
                # The running job's outcome is written before this claim returns.
                interleaved = True
                flushed = len(rec.named("flushed"))
                release.set()
                await rec.wait_for(lambda: len(rec.named("flushed")) > flushed)
            return got

        # Both claims: a NOTIFY's (re-arming the throttle) and the others.
        w.claim = functools.partial(outcome_in_flight, w.claim)  # type: ignore[method-assign]
        w.claim_rearming = functools.partial(outcome_in_flight, w.claim_rearming)  # type: ignore[method-assign]
        await rec.wait_for(lambda: len(started) == 1)
        # A claim that finds nothing waiting: the loop's last word is "not capped".
        claimed = anyio.Event()
        w.notify("q")
        await claimed.wait()
        assert not w.loops["q"].capped
        await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k", queue="q")
        w.notify("q")
        await rec.wait_for(lambda: len(started) == 2, timeout=5)
    assert interleaved
