"""Wake-ups through LISTEN/NOTIFY, listener reconnects, and periodic jobs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg

from tenantry import db, roles
from tenantry.jobs import queue as jobs
from tenantry.jobs.maintenance import PeriodicEnqueuer
from tenantry.jobs.model import Job
from tenantry.jobs.registry import Registry
from tenantry.listener import Listener
from tenantry.tenancy import tenant_tx
from tests.helpers import TENANT_A, TENANT_B, FakeClock, running_worker


async def test_notify_wakes_an_idle_worker_without_polling(
    worker_pool: asyncpg.Pool, pool: asyncpg.Pool, database_url: str
) -> None:
    reg = Registry()

    @reg.handler("ping")
    async def ping(job: Job) -> None:
        return None

    # A one-hour poll: only the notification can start the job in time.
    async with running_worker(pool, worker_pool, reg, poll_interval=3600) as (w, rec):
        listener = Listener(database_url, {"tenantry_jobs": w.notify}, [w.resync])
        async with anyio.create_task_group() as tg:
            await tg.start(listener.run)
            for _ in range(3):
                await jobs.enqueue(pool, tenant_id=TENANT_A, kind="ping")
            await rec.wait_flushed(3, timeout=5)
            tg.cancel_scope.cancel()


async def test_listener_reconnects_after_backend_is_terminated(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool, database_url: str
) -> None:
    reg = Registry()
    done: list[int] = []

    @reg.handler("n")
    async def n(job: Job) -> None:
        done.append(job.payload["i"])

    async with running_worker(pool, worker_pool, reg, poll_interval=3600) as (w, rec):
        listener = Listener(
            database_url, {"tenantry_jobs": w.notify}, [w.resync], ping_interval=0.2
        )
        async with anyio.create_task_group() as tg:
            await tg.start(listener.run)
            await jobs.enqueue(pool, tenant_id=TENANT_A, kind="n", payload={"i": 0})
            await rec.wait_flushed(1)
            pid = listener.backend_pid
            assert await admin_pool.fetchval("SELECT pg_terminate_backend($1)", pid)
            # Jobs enqueued while the listener is down: their NOTIFYs are lost for good;
            # the resync after the reconnect must find them.
            for i in range(1, 6):
                await jobs.enqueue(pool, tenant_id=TENANT_A, kind="n", payload={"i": i})
            await listener.wait_connections(2)
            assert listener.backend_pid != pid
            await rec.wait_flushed(6, timeout=10)
            # And it listens again.
            await jobs.enqueue(pool, tenant_id=TENANT_A, kind="n", payload={"i": 6})
            await rec.wait_flushed(7, timeout=5)
            tg.cancel_scope.cancel()
    assert sorted(done) == list(range(7))


async def test_throttled_trigger_notifies_at_most_once_per_window(
    pool: asyncpg.Pool, database_url: str
) -> None:
    got: list[str] = []
    conn = await asyncpg.connect(database_url)
    try:
        await conn.add_listener("tenantry_jobs", lambda *a: got.append(a[3]))
        async with tenant_tx(pool, TENANT_A) as c:
            # 50 single-row inserts inside one transaction, i.e. within one window:
            for _ in range(50):
                await jobs.enqueue(c, tenant_id=TENANT_A, kind="x", queue="q1")
            # Delayed rows never notify.
            await jobs.enqueue(
                c,
                tenant_id=TENANT_A,
                kind="x",
                queue="later",
                run_at=datetime.now(UTC) + timedelta(hours=1),
            )
        with anyio.fail_after(5):
            while not got:
                await conn.execute("SELECT 1")  # let the notification arrive
        await conn.execute("SELECT 1")
        assert got == ["q1"]
    finally:
        await conn.close()


async def test_periodic_job_enqueued_once_per_period_by_two_processes(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool, database_url: str
) -> None:
    reg = Registry()

    @reg.handler("tick", every=timedelta(minutes=1))
    async def tick(job: Job) -> None:
        return None

    other_pool = await db.create_pool(database_url, min_size=1, max_size=2)
    try:
        clock = FakeClock(datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC))
        a = PeriodicEnqueuer(pool, reg.periodic(), clock)
        b = PeriodicEnqueuer(other_pool, reg.periodic(), clock)
        # First sight records the current period without running it.
        assert await a.run_once() + await b.run_once() == 0
        total = 0
        for _ in range(5):
            clock.advance(60)
            results: list[int] = []

            async def run(p: PeriodicEnqueuer, out: list[int] = results) -> None:
                out.append(await p.run_once())

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, a)
                tg.start_soon(run, b)
            assert sorted(results) == [0, 1]
            total += sum(results)
        assert total == 5
        rows = await admin_pool.fetch("SELECT payload FROM tenantry.jobs ORDER BY id")
        periods = [r["payload"]["period"] for r in rows]
        assert len(set(periods)) == 5
        assert periods[0] == "2030-01-01T12:01:00+00:00"
    finally:
        await other_pool.close()


class Heard:
    """A LISTEN connection that counts what it hears on a channel."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.payloads: list[str] = []

    @classmethod
    async def on(cls, url: str, channel: str) -> Heard:
        heard = cls(await asyncpg.connect(url))
        await heard.conn.add_listener(channel, lambda *a: heard.payloads.append(a[3]))
        return heard

    async def wait(self, n: int = 1, timeout: float = 2.0) -> None:
        with anyio.fail_after(timeout):
            while len(self.payloads) < n:
                await self.conn.execute("SELECT 1")  # let notifications arrive
                await anyio.sleep(0.01)


async def test_an_open_producer_transaction_does_not_silence_the_others(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, database_url: str
) -> None:
    """Regression: the throttle's winner kept the throttle row locked until it
    committed, and everyone else stayed silent meanwhile: with one producer's
    transaction open, 20 committed enqueues in a second gave 0 notifications.  The
    throttle now decides at commit."""
    await worker_pool.execute("SELECT tenantry.ensure_wake_keys(ARRAY['q'])")  # as a worker does
    heard = await Heard.on(database_url, "tenantry_jobs")
    try:
        async with tenant_tx(pool, TENANT_A) as open_tx:
            await jobs.enqueue(open_tx, tenant_id=TENANT_A, kind="x", queue="q")
            for _ in range(20):
                await jobs.enqueue(pool, tenant_id=TENANT_B, kind="x", queue="q")
                await anyio.sleep(0.006)  # a little over the 5 ms window
            await heard.wait(2)
            assert set(heard.payloads) == {"q"}
            open_tx_heard = len(heard.payloads)
        await heard.conn.execute("SELECT 1")
        assert len(heard.payloads) <= 21, "the throttle still limits the rate"
        assert open_tx_heard >= 2
    finally:
        await heard.conn.close()


async def test_the_first_enqueue_of_a_queue_never_blocks_another_producer(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Regression: the first enqueue on a new queue name inserted its throttle row, and
    every other producer of that queue waited for that transaction to commit."""
    queue = f"fresh-{uuid.uuid4().hex[:8]}"
    heard = await Heard.on(database_url, "tenantry_jobs")
    try:
        async with tenant_tx(pool, TENANT_A) as open_tx:
            await jobs.enqueue(open_tx, tenant_id=TENANT_A, kind="x", queue=queue)
            with anyio.fail_after(2):
                await jobs.enqueue(pool, tenant_id=TENANT_B, kind="x", queue=queue)
            await heard.wait(1)
    finally:
        await heard.conn.close()


async def test_an_open_transaction_does_not_silence_the_outbox_either(
    pool: asyncpg.Pool, database_url: str
) -> None:
    heard = await Heard.on(database_url, "tenantry_outbox")
    try:
        async with tenant_tx(pool, TENANT_A) as open_tx:
            await open_tx.execute("SELECT tenantry.emit($1, 'a', '1', 'e')", TENANT_A)
            for i in range(5):
                async with tenant_tx(pool, TENANT_B) as tx:
                    await tx.execute("SELECT tenantry.emit($1, 'b', $2, 'e')", TENANT_B, str(i))
                await anyio.sleep(0.006)
            await heard.wait(2)
    finally:
        await heard.conn.close()


async def test_one_connection_is_heard_in_each_of_its_transactions(
    worker_pool: asyncpg.Pool, database_url: str
) -> None:
    """The once-per-transaction guard of the wake-up must end with the transaction (a
    placeholder setting reads '' afterwards, not NULL: a guard testing for NULL kept a
    connection silent for good after its first wake-up)."""
    await worker_pool.execute("SELECT tenantry.ensure_wake_keys(ARRAY['again'])")
    heard = await Heard.on(database_url, "tenantry_jobs")
    producer = await asyncpg.connect(roles.with_login(database_url, roles.DEFAULT_LOGIN))
    try:
        for _ in range(3):
            async with producer.transaction():
                await producer.execute(
                    "SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A)
                )
                await producer.execute(
                    "INSERT INTO tenantry.jobs (tenant_id, queue, kind) VALUES ($1, 'again', 'x')",
                    TENANT_A,
                )
            await anyio.sleep(0.01)  # past the 5 ms window
        await heard.wait(3)
    finally:
        await producer.close()
        await heard.conn.close()


async def test_a_claim_a_notify_prompted_rearms_the_throttle_for_later_commits(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, database_url: str
) -> None:
    """Regression (issue 14, wake-up latency under load): a job committed within the
    throttle's 5 ms window after another job's NOTIFY sent none, even when the claim
    that NOTIFY woke had already run without it: the job waited for the next NOTIFY or
    the worker's trailing fetch (p99 11 ms with 1,000 other jobs a second on the
    queue).  A claim that a NOTIFY prompted now re-arms the throttle first."""
    reg = Registry()

    @reg.handler("x")
    async def x(job: Job) -> None:
        return None

    heard = await Heard.on(database_url, "tenantry_jobs")
    try:
        async with running_worker(
            pool, worker_pool, reg, queues={"q": 2}, poll_interval=3600,
            trailing_fetch=3600, late_trailing_fetch=3600,
        ) as (w, rec):  # fmt: skip
            # A NOTIFY went out that no claim has acted on yet: the throttle row says so
            # (an hour ahead, so that its window cannot end during the test).
            await worker_pool.execute(
                "UPDATE tenantry.notify_throttle SET last_at = now() + interval '1 hour'"
                " WHERE key = 'tenantry_jobs:q'"
            )
            # Its wake-up arrives and the claim it prompts finds nothing.
            claims = len(rec.named("claim_ran"))
            w.notify("q")
            await rec.wait_for(lambda: len(rec.named("claim_ran")) > claims)
            # A commit after that claim began is a job it did not see: it must notify.
            await jobs.enqueue(pool, tenant_id=TENANT_A, kind="x", queue="q")
            await heard.wait(1)
            assert heard.payloads == ["q"]
            # Polls, trailing fetches and the listener's resync do not re-arm: only a
            # NOTIFY's claim does.
            assert len(rec.named("rearmed")) == 1
            w.notify("q")
            await rec.wait_flushed(1)
    finally:
        await heard.conn.close()


async def test_a_claim_a_notify_prompted_does_not_wait_on_the_throttle_table(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """Regression (attack on the re-arm of ac27a1b): the re-arm is best effort, yet it
    waited for a lock on tenantry.notify_throttle (an operator's VACUUM FULL or LOCK, a
    migration's ALTER) up to the claim pool's 5 s lock_timeout, and the claim of the
    queue's jobs waited behind it: jobs already queued did not start while nothing
    blocked their claim."""
    reg = Registry()

    @reg.handler("x")
    async def x(job: Job) -> None:
        return None

    async with running_worker(
        pool, worker_pool, reg, queues={"q": 2}, poll_interval=3600,
        trailing_fetch=3600, late_trailing_fetch=3600,
    ) as (w, rec):  # fmt: skip
        await rec.wait_for(lambda: len(rec.named("claim_ran")) > 0)
        await jobs.enqueue(pool, tenant_id=TENANT_A, kind="x", queue="q")
        async with admin_pool.acquire() as admin, admin.transaction():
            await admin.execute("LOCK TABLE tenantry.notify_throttle IN ACCESS EXCLUSIVE MODE")
            w.notify("q")
            # Under the claim pool's 5 s lock_timeout (the re-arm before the fix waited
            # that long): the job starts while the lock is held.
            await rec.wait_flushed(1, timeout=4)
