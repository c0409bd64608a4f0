"""ATKMAIN: adversarial tests of the wake-up gate, the fair claim, the welcome mail and
the fan-out's read bounds (the changes merged up to e54887d)."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

from tenantry import db
from tenantry.jobs import queue as jobs
from tenantry.tenancy import tenant_tx
from tenantry.tenants import store
from tests.helpers import TENANT_A, running_worker
from tests.integration.test_quiet_commit_gate import _registry, pending_wake_up, quiet

# hashtext('capped-100511') = hashtext('tenantry_jobs:q-6433') = -724815250: a capped
# queue whose claim lock has the key of another queue's wake-up gate (both class
# 0x7E4C = 32332).  Found by joining 300,000 names of each kind on their hash.
CAPPED_QUEUE = "capped-100511"
GATED_QUEUE = "q-6433"


@pytest.mark.parametrize(
    "capped_queue",
    [
        pytest.param(CAPPED_QUEUE, id="hash-collision"),
        pytest.param(f"tenantry_jobs:{GATED_QUEUE}", id="name-is-the-gate-key"),
    ],
)
async def test_atkmain_a_capped_claim_is_not_held_up_by_another_queues_quiet_producer(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, capped_queue: str
) -> None:
    """The capped claim's turn-taking lock (claim_jobs: pg_advisory_xact_lock(32332,
    hashtext(queue))) and the wake-up gate (wake_at_commit: the shared
    pg_try_advisory_xact_lock_shared(32332, hashtext('tenantry_jobs:' || queue))) share
    one lock class, so their keys meet whenever hashtext(A) = hashtext('tenantry_jobs:'
    || B): a queue named 'tenantry_jobs:B' (queue names are any 1-100 characters), or a
    32-bit collision (one expected among ~65,000 queue names of each side).  A producer
    on B that stays quiet behind the gate (for as long as its transaction lasts when it
    set its constraints IMMEDIATE) then blocks every capped claim of A until the
    worker's lock_timeout (5 s) fails it: A's jobs stop starting."""
    assert await admin_pool.fetchval(
        "SELECT hashtext($1) = hashtext('tenantry_jobs:' || $2)", capped_queue, GATED_QUEUE
    )
    await worker_pool.execute("SELECT tenantry.ensure_wake_keys($1)", [GATED_QUEUE])
    # A wake-up is pending on the gated queue: its producers stay quiet, behind the gate.
    await worker_pool.execute(
        "UPDATE tenantry.notify_throttle SET last_at = now() + interval '1 hour' WHERE key = $1",
        f"tenantry_jobs:{GATED_QUEUE}",
    )
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="x", queue=capped_queue)
    async with tenant_tx(pool, TENANT_A) as open_tx:
        await open_tx.execute("SET CONSTRAINTS ALL IMMEDIATE")
        await jobs.enqueue(open_tx, tenant_id=TENANT_A, kind="x", queue=GATED_QUEUE)
        held = await admin_pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND mode = 'ShareLock' AND granted"
        )
        assert held == 1, "the producer did not stay quiet behind the gate"
        async with worker_pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '500ms'")
            try:
                rows = await conn.fetch(
                    "SELECT * FROM tenantry.claim_jobs($1, 10, 'atkmain', 30, NULL, 1)",
                    capped_queue,
                )
            except asyncpg.LockNotAvailableError:
                pytest.fail(
                    f"the capped claim of {capped_queue!r} waited for the gate of"
                    f" {GATED_QUEUE!r} (lock class 32332 shared)"
                )
        assert [r["id"] for r in rows if r["id"] is not None], "the capped job was not claimed"


REARM_HOLD_KEY = 4243


async def test_atkmain_a_quiet_commit_visible_between_the_claim_and_its_rearm_starts(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, database_url: str
) -> None:
    """The re-arm runs in the claim's transaction, after the claim's statements
    (queries.sql claim_rearming: rearm_wake on the state row).  A producer that decides
    to stay quiet before the re-arm (the NOTIFY that prompted this claim is pending) and
    whose commit becomes visible after the claim's snapshot but before the re-arm tries
    the gate is neither seen by the claim nor waited for (the gate is free again): no
    NOTIFY, gate_free true, and its job waits for a trailing fetch or the poll.  The
    window is the claim's own duration; it is held open here by a trigger that makes the
    re-arm's UPDATE wait on a lock the test holds (past rearm_wake's 10 ms lock_timeout)."""
    await admin_pool.execute(
        f"""
        CREATE FUNCTION public.hold_rearm() RETURNS trigger LANGUAGE plpgsql
            SET lock_timeout = 0 AS $$
        BEGIN PERFORM pg_advisory_xact_lock({REARM_HOLD_KEY}); RETURN NEW; END $$;
        CREATE TRIGGER hold_rearm BEFORE UPDATE ON tenantry.notify_throttle
            FOR EACH ROW WHEN (NEW.last_at = '-infinity')
            EXECUTE FUNCTION public.hold_rearm();
        """
    )
    holder = await asyncpg.connect(database_url)
    try:
        async with running_worker(
            pool, worker_pool, _registry(), queues={"q": 2}, poll_interval=3600,
            trailing_fetch=3600, late_trailing_fetch=3600, quiet_commit_wait=1,
        ) as (w, rec):  # fmt: skip
            await rec.wait_for(lambda: len(rec.named("claim_ran")) > 0)  # the start's claim
            await pending_wake_up(worker_pool, "q")
            await holder.execute("SELECT pg_advisory_lock($1)", REARM_HOLD_KEY)

            async def scenario() -> None:
                w.notify("q")  # the pending wake-up: a claim (nothing), then its re-arm
                with anyio.fail_after(5):
                    while True:
                        waiting = await admin_pool.fetchval(
                            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                            " AND NOT granted AND objid = $1",
                            REARM_HOLD_KEY,
                        )
                        if waiting:
                            break
                        await anyio.sleep(0.005)
                # The claim's statements are done; its re-arm has not tried the gate.
                await jobs.enqueue(pool, tenant_id=TENANT_A, kind="x", queue="q")

            await quiet(database_url, scenario)
            await holder.execute("SELECT pg_advisory_unlock($1)", REARM_HOLD_KEY)
            await rec.wait_for(lambda: len(rec.named("rearmed")) == 1)
            # No poll, no trailing fetch for an hour: the claim or its wait must find it.
            await rec.wait_flushed(1, timeout=5)
    finally:
        await holder.close()


async def _insert_event(conn: db.Conn, tenant: object, name: str) -> None:
    await conn.execute(
        "INSERT INTO tenantry.outbox (tenant_id, aggregate_type, aggregate_id, version,"
        " event_type) VALUES ($1, 'thing', $2, 1, 'thing.made')",
        tenant,
        name,
    )


async def test_atkmain_fan_out_reads_each_event_once_whatever_order_transactions_commit_in(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool, database_url: str
) -> None:
    """Passes (the fan-out's read bounds hold): two connections build the interleavings
    by hand.  An event of a transaction that is open across several passes (its xid
    below a later one's, in the position's xip list), an xid taken before a pass and
    its event inserted after it, an event in a subtransaction, an aborted transaction:
    each event gets exactly one delivery, the passes that find nothing in between find
    nothing, and the lag is 0 at the end."""
    tenant = (await store.create_tenant(pool, name="Acme")).id
    await admin_pool.execute(
        "INSERT INTO tenantry.webhook_endpoints (tenant_id, url, secret)"
        " VALUES ($1, 'https://example.com/hook', '\\x01')",
        tenant,
    )

    async def fan_out() -> int:
        row = await admin_pool.fetchrow("SELECT events FROM tenantry.webhook_fan_out()")
        assert row is not None
        return int(row["events"])

    await fan_out()  # the tenant's own events, if any
    long_tx = await asyncpg.connect(database_url)
    early_xid = await asyncpg.connect(database_url)
    aborted = await asyncpg.connect(database_url)
    try:
        await long_tx.execute("BEGIN")
        await _insert_event(long_tx, tenant, "long")  # lowest xid, commits last
        await early_xid.execute("BEGIN")
        await early_xid.execute("SELECT pg_current_xact_id()")  # xid now, event later
        await aborted.execute("BEGIN")
        await _insert_event(aborted, tenant, "aborted")
        async with admin_pool.acquire() as c, c.transaction():
            await _insert_event(c, tenant, "quick-1")
        assert await fan_out() == 1
        assert await fan_out() == 0
        await early_xid.execute("SAVEPOINT s")
        await _insert_event(early_xid, tenant, "early-xid")
        await early_xid.execute("RELEASE s")
        assert await fan_out() == 0
        await early_xid.execute("COMMIT")
        await aborted.execute("ROLLBACK")
        async with admin_pool.acquire() as c, c.transaction():
            await _insert_event(c, tenant, "quick-2")
        assert await fan_out() == 2  # early-xid (in the position's xip list), quick-2
        assert await fan_out() == 0
        await long_tx.execute("COMMIT")
        assert await fan_out() == 1
        assert await fan_out() == 0
    finally:
        for open_conn in (long_tx, early_xid, aborted):
            await open_conn.close()
    got = await admin_pool.fetch(
        "SELECT o.aggregate_id, count(d.id) AS n FROM tenantry.outbox o"
        " LEFT JOIN tenantry.webhook_deliveries d ON d.event_id = o.id"
        " WHERE o.tenant_id = $1 AND o.aggregate_type = 'thing' GROUP BY 1",
        tenant,
    )
    assert {r["aggregate_id"]: r["n"] for r in got} == {
        "long": 1,
        "early-xid": 1,
        "quick-1": 1,
        "quick-2": 1,
    }
    assert await admin_pool.fetchval("SELECT events FROM tenantry.webhook_fanout_lag(100)") == 0


async def test_atkmain_fifty_producers_never_wait_on_the_gate(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, database_url: str
) -> None:
    """Passes: 25 producers hold the gate (IMMEDIATE, quiet, left open), a worker waits
    for them (await_quiet_wakes, an exclusive request queued behind them), and 25 more
    producers on the queue commit meanwhile under a 200 ms lock_timeout: none waits
    (a try-lock against a queued exclusive request fails, and they notify)."""
    await worker_pool.execute("SELECT tenantry.ensure_wake_keys($1)", ["q"])
    await pending_wake_up(worker_pool, "q")
    holders = [await db.connect(database_url) for _ in range(25)]
    try:
        for conn in holders:
            await conn.execute("BEGIN")
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A))
            await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
            await jobs.enqueue(conn, tenant_id=TENANT_A, kind="x", queue="q")
        async with anyio.create_task_group() as tg:
            waited: list[bool] = []

            async def wait() -> None:
                waited.append(
                    await worker_pool.fetchval("SELECT tenantry.await_quiet_wakes('q', 3000)")
                )

            tg.start_soon(wait)
            with anyio.fail_after(5):
                while True:
                    queued = await pool.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                        " AND mode = 'ExclusiveLock' AND NOT granted"
                    )
                    if queued:
                        break
                    await anyio.sleep(0.005)

            async def produce() -> None:
                async with tenant_tx(pool, TENANT_A) as tx:
                    await tx.execute("SET LOCAL lock_timeout = '200ms'")
                    await jobs.enqueue(tx, tenant_id=TENANT_A, kind="x", queue="q")

            with anyio.fail_after(3):
                async with anyio.create_task_group() as producers:
                    for _ in range(25):
                        producers.start_soon(produce)
            for conn in holders:
                await conn.execute("COMMIT")
        assert waited == [True]
    finally:
        for conn in holders:
            await conn.close()
