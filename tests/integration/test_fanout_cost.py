"""What a webhook fan-out pass costs (tenantry.webhook_fan_out): what its new events
cost, not what the outbox holds (30 days of events by default), and next to nothing
when nothing new committed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tenantry import db, tenant_tx
from tenantry.outbox.store import emit
from tenantry.tenants import store
from tenantry.webhooks import fanout
from tenantry.webhooks.fanout import FanOut

OLD_EVENTS = 5000


@pytest.fixture
async def explained(database_url: str) -> AsyncIterator[tuple[asyncpg.Connection, list[str]]]:
    """A superuser's connection whose statements, those inside functions too, send
    their plans to the client (auto_explain at NOTICE), planned as a long-lived
    session ends up planning them: generic plans (PL/pgSQL switches to them after five
    calls)."""
    conn = await db.connect(database_url)
    plans: list[str] = []
    conn.add_log_listener(lambda _c, message: plans.append(str(message.message)))
    try:
        await conn.execute("LOAD 'auto_explain'")
        for setting, value in (
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_nested_statements", "on"),
            ("auto_explain.log_level", "notice"),
            ("plan_cache_mode", "force_generic_plan"),
        ):
            await conn.execute("SELECT set_config($1, $2, false)", setting, value)
        yield conn, plans
    finally:
        await conn.close()


async def _emit(pool: asyncpg.Pool, tenant: uuid.UUID, n: int) -> None:
    async with tenant_tx(pool, tenant) as tx:
        for i in range(n):
            await emit(
                tx,
                tenant_id=tenant,
                aggregate_type="thing",
                aggregate_id=str(uuid.uuid4()),
                event_type="thing.made",
                payload={"i": i},
            )


async def _old_events(
    admin_pool: asyncpg.Pool, worker_pool: asyncpg.Pool, tenant: uuid.UUID
) -> None:
    """OLD_EVENTS events the fan-out has passed, from many transactions as they come
    (5 a sign-up), so that the statistics know the xids are many."""
    await admin_pool.execute(
        f"""DO $$
        BEGIN
            FOR t IN 1..{OLD_EVENTS // 5} LOOP
                INSERT INTO tenantry.outbox
                       (tenant_id, aggregate_type, aggregate_id, version, event_type)
                SELECT '{tenant}', 'thing', 'old-' || t || '-' || i, 1, 'thing.made'
                  FROM generate_series(1, 5) i;
                COMMIT;
            END LOOP;
        END $$"""
    )
    assert await FanOut(worker_pool, lambda: None).run_once() == 0  # no endpoint yet
    assert (await fanout.lag(worker_pool)).events == 0
    await admin_pool.execute("ANALYZE tenantry.outbox")


async def test_a_pass_reads_only_the_new_events_through_the_xid_index(
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
    explained: tuple[asyncpg.Connection, list[str]],
) -> None:
    """Regression: PL/pgSQL's generic plan guessed a third of the outbox for `xid >=
    position` and scanned all of it on every pass (1.1 ms a pass with 27,000 events,
    the pass running on every outbox notification; a month of events by default)."""
    conn, plans = explained
    tenant = (await store.create_tenant(pool, name="Acme")).id
    await _old_events(admin_pool, worker_pool, tenant)
    await admin_pool.execute(
        "INSERT INTO tenantry.webhook_endpoints (tenant_id, url, secret, event_types)"
        " VALUES ($1, 'https://example.com/hook', '\\x01', '{thing.*}')",
        tenant,
    )
    await _emit(pool, tenant, 3)

    row = await conn.fetchrow("SELECT events, deliveries FROM tenantry.webhook_fan_out()")

    assert row is not None
    assert (row["events"], row["deliveries"]) == (3, 3)
    text = "\n".join(plans)
    assert "outbox_xid_idx" in text, text
    assert "Seq Scan on outbox" not in text, text
    assert (await fanout.lag(worker_pool)).events == 0
    plans.clear()
    assert (await conn.fetchrow("SELECT * FROM tenantry.webhook_fanout_lag(100)")) is not None
    assert "Seq Scan on outbox" not in "\n".join(plans), "\n".join(plans)


async def test_a_pass_with_nothing_new_neither_locks_nor_rewrites_the_position(
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
    explained: tuple[asyncpg.Connection, list[str]],
) -> None:
    """Idle polls, and many trailing passes, find nothing: such a pass reads the index
    (not the outbox) and stays a read-only transaction (no transaction id, no WAL, no
    commit flush), so the position row keeps its version and is never locked."""
    conn, plans = explained
    tenant = (await store.create_tenant(pool, name="Acme")).id
    await _old_events(admin_pool, worker_pool, tenant)
    follower = FanOut(worker_pool, lambda: None)
    before = await admin_pool.fetchrow(
        "SELECT xmin::text, xmax::text, snapshot::text FROM tenantry.webhook_fanout_position"
    )

    assert await follower.run_once() == 0
    row = await conn.fetchrow("SELECT events, deliveries FROM tenantry.webhook_fan_out()")

    assert row is not None and (row["events"], row["deliveries"]) == (0, 0)
    text = "\n".join(plans)
    assert "outbox_xid_idx" in text, text
    assert "Seq Scan on outbox" not in text, text
    after = await admin_pool.fetchrow(
        "SELECT xmin::text, xmax::text, snapshot::text FROM tenantry.webhook_fanout_position"
    )
    assert before is not None and after == before

    # And once something new commits, the next pass takes it (and moves the position).
    await admin_pool.execute(
        "INSERT INTO tenantry.webhook_endpoints (tenant_id, url, secret)"
        " VALUES ($1, 'https://example.com/hook', '\\x01')",
        tenant,
    )
    await _emit(pool, tenant, 1)
    assert await follower.run_once() == 1
    moved = await admin_pool.fetchrow(
        "SELECT xmin::text, snapshot::text FROM tenantry.webhook_fanout_position"
    )
    assert moved is not None and moved["snapshot"] != before["snapshot"]
