"""The outbox as other services use it: tenantry.emit in their own transactions,
versions that make racing writers fail loudly, the wake-up, append-only, retention."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
import pytest

from tenantry.errors import Conflict
from tenantry.jobs.maintenance import Pruner
from tenantry.onboarding import machine
from tenantry.outbox import store as outbox
from tenantry.tenancy import tenant_tx, tenant_tx_on
from tests.helpers import TENANT_A, TENANT_B, wait_lock_waiter


async def test_emit_in_the_callers_transaction_numbers_versions_per_aggregate(
    pool: asyncpg.Pool,
) -> None:
    async with tenant_tx(pool, TENANT_A) as tx:
        for _ in range(3):
            await tx.execute(
                "SELECT tenantry.emit($1, 'invoice', 'inv-1', 'invoice.updated', '{\"n\": 1}')",
                TENANT_A,
            )
        await tx.execute(
            "SELECT tenantry.emit($1, 'invoice', 'inv-2', 'invoice.created')", TENANT_A
        )
    async with tenant_tx(pool, TENANT_A) as tx:
        one = await outbox.events_after(tx, TENANT_A, "invoice", "inv-1", 0)
        two = await outbox.events_after(tx, TENANT_A, "invoice", "inv-2", 0)
    assert [e.version for e in one] == [1, 2, 3] and [e.version for e in two] == [1]
    first, only = orjson.loads(one[0].data), orjson.loads(two[0].data)
    assert first["n"] == 1 and (first["type"], first["version"]) == ("invoice.updated", 1)
    assert set(only) == {"type", "version", "at"}
    # A rolled-back transaction leaves no event.
    with pytest.raises(RuntimeError):
        async with tenant_tx(pool, TENANT_A) as tx:
            await tx.execute("SELECT tenantry.emit($1, 'invoice', 'inv-3', 'x')", TENANT_A)
            raise RuntimeError("the caller's work failed")
    async with tenant_tx(pool, TENANT_A) as tx:
        assert await outbox.events_after(tx, TENANT_A, "invoice", "inv-3", 0) == []


async def test_emit_many_appends_in_array_order_in_the_callers_transaction(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    async with tenant_tx(pool, TENANT_A) as tx:
        await tx.execute(
            "SELECT tenantry.emit($1, 'invoice', 'inv-1', 'invoice.created')", TENANT_A
        )
        await tx.execute(
            "SELECT tenantry.emit_many($1, $2, $3, $4, $5, $6)",
            TENANT_A,
            ["invoice", "order", "invoice"],
            ["inv-1", "ord-1", "inv-1"],
            [2, None, 3],  # a NULL version: the aggregate's next one
            ["invoice.updated", "order.created", "invoice.paid"],
            [{"n": 2}, None, {"n": 3}],
        )
    rows = await admin_pool.fetch(
        "SELECT aggregate_id, version, event_type, payload FROM tenantry.outbox ORDER BY id"
    )
    assert [(r["aggregate_id"], r["version"], r["event_type"]) for r in rows] == [
        ("inv-1", 1, "invoice.created"),
        ("inv-1", 2, "invoice.updated"),
        ("ord-1", 1, "order.created"),
        ("inv-1", 3, "invoice.paid"),
    ]
    assert [r["payload"] for r in rows[1:]] == [{"n": 2}, {}, {"n": 3}]
    # Arrays of different lengths are refused, and nothing is written.
    with pytest.raises(asyncpg.InvalidParameterValueError):
        async with tenant_tx(pool, TENANT_A) as tx:
            await tx.execute(
                "SELECT tenantry.emit_many($1, $2, $3, $4, $5, $6)",
                TENANT_A, ["invoice"], ["inv-9"], [1], ["x", "y"], [None, None],
            )  # fmt: skip
    # Another tenant's events are refused by row-level security.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with tenant_tx(pool, TENANT_A) as tx:
            await tx.execute(
                "SELECT tenantry.emit_many($1, $2, $3, $4, $5, $6)",
                TENANT_B, ["invoice"], ["inv-9"], [1], ["x"], [None],
            )  # fmt: skip
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.outbox") == 4


async def test_two_writers_of_one_version_the_second_fails_loudly(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    async with tenant_tx(pool, TENANT_A) as tx:
        await outbox.emit(
            tx,
            tenant_id=TENANT_A,
            aggregate_type="a",
            aggregate_id="1",
            event_type="e",
            payload={},
            version=1,
        )
    with pytest.raises(Conflict, match="another writer"):
        async with tenant_tx(pool, TENANT_A) as tx:
            await outbox.emit(
                tx,
                tenant_id=TENANT_A,
                aggregate_type="a",
                aggregate_id="1",
                event_type="e",
                payload={},
                version=1,
            )
    # Concurrently, both asking for "the next version": the second computes the same
    # one, waits on the first's uncommitted row, and fails when the first commits.
    async with pool.acquire() as first:
        held = first.transaction()
        await held.start()
        await first.execute("SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A))
        await first.execute("SELECT tenantry.emit($1, 'a', '2', 'e')", TENANT_A)

        async def second() -> None:
            async with tenant_tx(pool, TENANT_A) as tx2:
                await tx2.execute("SELECT tenantry.emit($1, 'a', '2', 'e')", TENANT_A)

        task = asyncio.create_task(second())
        await wait_lock_waiter(admin_pool)
        await held.commit()
        with pytest.raises(asyncpg.UniqueViolationError):
            await task


async def test_emit_needs_the_tenants_context_and_the_log_is_append_only(
    pool: asyncpg.Pool,
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with tenant_tx(pool, TENANT_B) as tx:
            await tx.execute("SELECT tenantry.emit($1, 'a', '1', 'e')", TENANT_A)
    async with tenant_tx(pool, TENANT_A) as tx:
        await tx.execute("SELECT tenantry.emit($1, 'a', '1', 'e')", TENANT_A)
    for sql in (
        "UPDATE tenantry.outbox SET payload = '{}'",
        "DELETE FROM tenantry.outbox",
        # The database's columns are not the writer's to choose.
        "INSERT INTO tenantry.outbox (tenant_id, aggregate_type, aggregate_id, version,"
        " event_type, xid) VALUES ($1, 'a', '9', 1, 'e', '1')",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            async with tenant_tx(pool, TENANT_A) as tx:
                await tx.execute(sql, *([TENANT_A] if "$1" in sql else []))


async def test_an_insert_wakes_the_followers(database_url: str, pool: asyncpg.Pool) -> None:
    listener = await asyncpg.connect(database_url)
    heard: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener("tenantry_outbox", lambda *a: heard.put_nowait(a[3]))
        async with tenant_tx(pool, TENANT_A) as tx:
            await tx.execute("SELECT tenantry.emit($1, 'a', '1', 'e')", TENANT_A)
        assert await asyncio.wait_for(heard.get(), 5) == "outbox"
    finally:
        await listener.close()


async def test_old_events_and_idempotency_keys_are_pruned(
    admin_pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    await admin_pool.execute(
        "INSERT INTO tenantry.outbox (tenant_id, aggregate_type, aggregate_id, version,"
        " event_type, created_at) OVERRIDING SYSTEM VALUE"
        " SELECT $1::uuid, 'a', 'old', v, 'e', now() - interval '31 days'"
        " FROM generate_series(1, 7) v"
        " UNION ALL SELECT $1, 'a', 'new', 1, 'e', now() - interval '29 days'",
        TENANT_A,
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.idempotency_keys (key_hash, request_hash, tenant_id,"
        " onboarding_id, created_at) VALUES (sha256('old'), sha256('r'), $1, $1,"
        " now() - interval '25 hours'), (sha256('new'), sha256('r'), $1, $1, now())",
        TENANT_A,
    )
    pruned = await Pruner("prune_outbox", worker_pool, outbox.prune, 30, batch=3).run_once()
    assert pruned == 7
    keys = await Pruner("prune_keys", worker_pool, machine.prune_keys, 24, batch=3).run_once()
    assert keys == 1
    left = await admin_pool.fetch("SELECT aggregate_id FROM tenantry.outbox")
    assert [r[0] for r in left] == ["new"]
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.idempotency_keys") == 1
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await outbox.prune(worker_pool, 0, 10)


async def test_a_follower_reads_each_event_once_whatever_else_runs(
    worker_pool: asyncpg.Pool, pool: asyncpg.Pool, server_url: str
) -> None:
    """Regression: the follower's horizon was the cluster-wide xmin, so an open write
    transaction anywhere on the cluster (here in another database) pinned it, and
    every read re-read every event since (5,000 per read in the reproduction).  A read
    now returns what the previous one's snapshot could not see, and nothing else."""
    elsewhere = await asyncpg.connect(server_url)  # the `postgres` database
    try:
        await elsewhere.execute("BEGIN")
        await elsewhere.fetchval("SELECT pg_current_xact_id()")  # a write transaction
        start = (await outbox.snapshot(worker_pool)).snapshot

        async def emit(n: int) -> None:
            async with tenant_tx(pool, TENANT_A) as tx:
                for i in range(n):
                    await tx.execute(
                        "SELECT tenantry.emit($1, 'order', $2, 'order.placed')", TENANT_A, str(i)
                    )

        await emit(100)
        after_first, first = await outbox.follow(worker_pool, start, "order")
        await emit(5)
        _, second = await outbox.follow(worker_pool, after_first.snapshot, "order")
        assert len(first) == 100
        assert len(second) == 5
    finally:
        await elsewhere.execute("ROLLBACK")
        await elsewhere.close()


async def test_a_follower_sees_a_transaction_that_commits_after_a_later_one(
    worker_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Ids are handed out before commit: the event of a transaction that was still
    running at one read, and commits after later events were read, comes with the
    next read."""
    start = (await outbox.snapshot(worker_pool)).snapshot
    slow = await pool.acquire()
    try:
        async with tenant_tx_on(slow, TENANT_A):
            await slow.execute(
                "SELECT tenantry.emit($1, 'order', 'slow', 'order.placed')", TENANT_A
            )
            async with tenant_tx(pool, TENANT_A) as tx:
                await tx.execute(
                    "SELECT tenantry.emit($1, 'order', 'fast', 'order.placed')", TENANT_A
                )
            snap, first = await outbox.follow(worker_pool, start, "order")
            assert [e.aggregate_id for e in first] == ["fast"]
        _, second = await outbox.follow(worker_pool, snap.snapshot, "order")
        assert [e.aggregate_id for e in second] == ["slow"]
    finally:
        await pool.release(slow)
