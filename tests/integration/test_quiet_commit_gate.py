"""The wake-up throttle's gate: a producer that stays quiet (a wake-up is pending) is
either seen by the claim that wake-up prompts, or waited for; never left to a trailing
fetch (issue 14, wake-up latency under load).

The race is built with a lock rather than with timing: a deferred trigger that fires
after `jobs_wake` (triggers on one event fire in name order) waits on an advisory lock
the test holds, so the producer's commit stays invisible for as long as the test wants
after its wake-up decision, as a WAL flush on a busy disk keeps it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import anyio
import asyncpg
import pytest

from tenantry.jobs import queue as jobs
from tenantry.jobs.model import Job
from tenantry.jobs.registry import Registry
from tenantry.tenancy import tenant_tx
from tests.helpers import TENANT_A, Recorder, running_worker

HOLD_KEY = 4242


@pytest.fixture
async def held_commits(
    admin_pool: asyncpg.Pool, database_url: str
) -> AsyncIterator[asyncpg.Connection]:
    """A connection holding the lock that every commit inserting a job waits for, after
    its wake-up was decided: `pg_advisory_unlock` on it lets them commit."""
    await admin_pool.execute(
        f"""
        CREATE FUNCTION public.hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_advisory_xact_lock({HOLD_KEY}); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER zz_hold_commit AFTER INSERT ON tenantry.jobs
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.hold_commit();
        """
    )
    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", HOLD_KEY)
        yield holder
    finally:
        await holder.close()


async def commits_held(admin_pool: asyncpg.Pool, n: int) -> None:
    """Until `n` transactions wait in their commit for the test's lock."""
    with anyio.fail_after(5):
        while True:
            waiting = await admin_pool.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND objid = $1",
                HOLD_KEY,
            )
            if waiting >= n:
                return
            await anyio.sleep(0.005)


async def pending_wake_up(worker_pool: asyncpg.Pool, queue: str) -> None:
    """A NOTIFY went out that no claim has acted on yet, as far as the throttle row
    says (an hour ahead, so that its window cannot end during the test): producers
    committing now stay quiet."""
    await worker_pool.execute(
        "UPDATE tenantry.notify_throttle SET last_at = now() + interval '1 hour' WHERE key = $1",
        f"tenantry_jobs:{queue}",
    )


async def quiet(database_url: str, action: Callable[[], Awaitable[object]]) -> None:
    """Run `action` and check that no NOTIFY on the jobs' channel went out meanwhile."""
    heard: list[str] = []
    conn = await asyncpg.connect(database_url)
    try:
        await conn.add_listener("tenantry_jobs", lambda *a: heard.append(a[3]))
        await action()
        await conn.execute("SELECT 1")  # a notification sent before now has arrived
        assert heard == [], "the producer notified: the race was not built"
    finally:
        await conn.close()


def _claims_at_least(rec: Recorder, n: int) -> bool:
    return len(rec.named("claim_ran")) >= n


def _registry() -> Registry:
    reg = Registry()

    @reg.handler("x")
    async def x(job: Job) -> None:
        return None

    return reg


async def test_a_quiet_commit_still_invisible_to_the_rearmed_claim_starts_without_a_trailing_fetch(
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
    database_url: str,
    held_commits: asyncpg.Connection,
) -> None:
    """Regression (issue 14, the p99 of bench.latency --background-rate 1000): a
    producer decided to stay quiet (a NOTIFY was pending) just before the worker's
    re-arm committed, and its commit became visible only after the claim that followed
    had taken its snapshot: no NOTIFY, and the job waited for the trailing fetch 11 ms
    later.  The re-arm now finds such a producer behind the throttle's gate, and the
    worker waits for its commit and claims again."""

    async def scenario(rec: Recorder, notify: Callable[[], None]) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(jobs.enqueue, pool, tenant_id=TENANT_A, kind="x", queue="q"))
            await commits_held(admin_pool, 1)  # decided (quiet), not yet visible
            claims = len(rec.named("claim_ran"))
            notify()  # the pending wake-up arrives: re-arm, then a claim without the job
            await rec.wait_for(lambda: len(rec.named("claim_ran")) > claims)
            await held_commits.execute("SELECT pg_advisory_unlock($1)", HOLD_KEY)
        # Committed, silently; no poll, no trailing fetch for an hour.
        await rec.wait_flushed(1, timeout=5)

    async with running_worker(
        pool, worker_pool, _registry(), queues={"q": 2}, poll_interval=3600,
        trailing_fetch=3600, late_trailing_fetch=3600, quiet_commit_wait=30,
    ) as (w, rec):  # fmt: skip
        await rec.wait_for(lambda: len(rec.named("claim_ran")) > 0)  # the start's claim
        await pending_wake_up(worker_pool, "q")
        await quiet(database_url, partial(scenario, rec, partial(w.notify, "q")))
        assert [r["gate_free"] for r in rec.named("rearmed")] == [False]
        assert [a["done"] for a in rec.named("quiet_commits_awaited")] == [True]


async def test_a_producer_holding_the_gate_open_costs_the_claims_one_bounded_wait(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, database_url: str
) -> None:
    """A transaction that set its constraints IMMEDIATE decides its wake-up at the
    INSERT and holds the gate until it ends, perhaps for long: the worker's claims go
    on (the job committed meanwhile starts), the wait for it runs out after
    `quiet_commit_wait`, and the next wake-ups do not wait for it again."""
    async with running_worker(
        pool, worker_pool, _registry(), queues={"q": 2}, poll_interval=3600,
        trailing_fetch=3600, late_trailing_fetch=3600, quiet_commit_wait=0.05,
    ) as (w, rec):  # fmt: skip
        await rec.wait_for(lambda: len(rec.named("claim_ran")) > 0)
        await pending_wake_up(worker_pool, "q")
        async with tenant_tx(pool, TENANT_A) as open_tx:
            await open_tx.execute("SET CONSTRAINTS ALL IMMEDIATE")
            await jobs.enqueue(open_tx, tenant_id=TENANT_A, kind="x", queue="q")
            # Another producer commits (quietly: the wake-up is pending); its NOTIFY-
            # prompted claim finds it at once, then waits for the open one in vain.
            await quiet(
                database_url,
                partial(jobs.enqueue, pool, tenant_id=TENANT_A, kind="x", queue="q"),
            )
            w.notify("q")
            await rec.wait_flushed(1, timeout=5)
            await rec.wait_for(lambda: len(rec.named("quiet_commits_awaited")) == 1)
            assert rec.named("quiet_commits_awaited")[0]["done"] is False
            # The next wake-ups claim without waiting again (a wait starts right after
            # its claim, before the loop makes the next one).
            claims = len(rec.named("claim_ran"))
            for n in (1, 2):
                w.notify("q")
                await rec.wait_for(partial(_claims_at_least, rec, claims + n))
            assert len(rec.named("quiet_wait_started")) == 1
        # Committed now, but quietly: for the wake-ups and the poll to find.


async def test_with_a_rearm_interval_only_the_first_notifys_claim_within_it_rearms(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    """WorkerConfig.rearm_interval: a NOTIFY's claim within the interval after a re-arm
    goes without one (the throttle then holds commits quiet for its window)."""
    async with running_worker(
        pool, worker_pool, _registry(), queues={"q": 2}, poll_interval=3600,
        trailing_fetch=3600, late_trailing_fetch=3600, rearm_interval=3600,
    ) as (w, rec):  # fmt: skip
        await rec.wait_for(lambda: len(rec.named("claim_ran")) > 0)
        claims = len(rec.named("claim_ran"))
        w.notify("q")
        await rec.wait_for(partial(_claims_at_least, rec, claims + 1))
        await pending_wake_up(worker_pool, "q")  # as a producer's NOTIFY leaves it
        w.notify("q")
        await rec.wait_for(partial(_claims_at_least, rec, claims + 2))
        assert len(rec.named("rearmed")) == 1
        assert await worker_pool.fetchval(
            "SELECT last_at > now() FROM tenantry.notify_throttle WHERE key = 'tenantry_jobs:q'"
        ), "the second claim re-armed the throttle"


# Every 5 ms window's try-lock key for the next two seconds (wake_at_commit's formula):
# held, they make a producer a window's loser, as when another transaction is
# committing that window's wake-up.
HOLD_WINDOWS = """
SELECT count(pg_advisory_xact_lock(
           32331, hashtext(concat($1::text, E'\n', w))))
  FROM generate_series(
           int8(floor(date_part('epoch', clock_timestamp()) * 200::double precision)),
           int8(floor(date_part('epoch', clock_timestamp()) * 200::double precision)) + 400) w
"""


async def test_a_producer_meeting_a_rearm_stays_quiet_behind_its_windows_wake_up_and_is_waited_for(
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
    database_url: str,
    held_commits: asyncpg.Connection,
) -> None:
    """A re-arm holds the gate through its claim (queries.sql claim_rearming), and the
    throttle row shows its re-arm only once it commits: a producer meeting the gate
    held cannot stay quiet on the row's word.  It notified, every such commit for as
    long as the claim took (bench.sustained at 1,000 jobs/s: 555 notifications a second
    against 410).  Now one that loses its window to another transaction's wake-up stays
    quiet behind the window gate, and a re-arm made before its commit is visible finds
    that gate held (the worker waits for it and claims again)."""
    key = "tenantry_jobs:q"
    await worker_pool.execute("SELECT tenantry.ensure_wake_keys(ARRAY['q'])")
    await pending_wake_up(worker_pool, "q")
    rearming = await asyncpg.connect(database_url)
    window_winner = await asyncpg.connect(database_url)
    try:
        tx = rearming.transaction()
        await tx.start()
        assert await rearming.fetchval("SELECT tenantry.rearm_wake('q')") is True
        winner_tx = window_winner.transaction()
        await winner_tx.start()
        await window_winner.fetchval(HOLD_WINDOWS, key)

        async def scenario() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(jobs.enqueue, pool, tenant_id=TENANT_A, kind="x", queue="q"))
                await commits_held(admin_pool, 1)  # decided (quiet), not yet visible
                await tx.commit()  # the re-arm's claim is done
                await winner_tx.rollback()
                assert await worker_pool.fetchval("SELECT tenantry.rearm_wake('q')") is False
                await held_commits.execute("SELECT pg_advisory_unlock($1)", HOLD_KEY)

        await quiet(database_url, scenario)
        assert await worker_pool.fetchval("SELECT tenantry.rearm_wake('q')") is True
    finally:
        await rearming.close()
        await window_winner.close()
