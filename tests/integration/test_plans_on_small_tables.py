"""Plans cached while a table was empty must not scan it whole once it has grown.

A connection keeps a function's plans until the table's statistics change.  Planned
while the table had no pages and a VACUUM or ANALYZE had found it empty (the state after
a first deploy's `VACUUM ANALYZE`, or after a quiet queue was emptied and vacuumed), a
sequential scan costs nothing in the planner's eyes, and the plan stayed: every claim
then read the whole table until autovacuum next analyzed it, up to a minute into a
burst.  Found in bench.webhooks: in about half the runs one deliverer connection spent
0.8 of a core scanning `webhook_deliveries` three times per claim (8 ms a claim), the
200/s run's p99 went from 20 ms to 125-475 ms and the burst from 1,500 to 700
deliveries/s.

Each case: the tables emptied and vacuumed (no pages, statistics that say empty),
autovacuum off for them (so that nothing re-plans behind the test's back), the function
called on one connection until its plans are cached, rows added, then the function once
more in a transaction whose own counters (pg_stat_xact_user_tables) show whether it
scanned the table sequentially (_scans_counted).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import cast

import asyncpg
import pytest

from tenantry import db
from tenantry.db import Conn
from tenantry.http.onboarding_api import OnboardingApi, _replay
from tenantry.onboarding import machine
from tenantry.onboarding.model import AGGREGATE
from tenantry.outbox import store as outbox
from tenantry.tenants import store as tenants


@asynccontextmanager
async def _scans_counted(conn: Conn, *tables: str) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """A transaction, rolled back at the end, and a reading of the sequential scans of
    the tenantry.<tables> this backend made in it so far.  pg_stat_xact_user_tables
    counts what the backend has not reported yet: the open transaction's, and on
    PostgreSQL 15 and later also the earlier ones' still pending, so the count at the
    start is taken off."""

    async def count() -> int:
        return int(
            await conn.fetchval(
                "SELECT coalesce(sum(seq_scan), 0) FROM pg_stat_xact_user_tables"
                " WHERE schemaname = 'tenantry' AND relname = ANY($1::text[])",
                list(tables),
            )
        )

    tx = conn.transaction()
    await tx.start()
    try:
        before = await count()

        async def since() -> int:
            return await count() - before

        yield since
    finally:
        await tx.rollback()


async def _empty_and_vacuumed(admin_pool: asyncpg.Pool, *tables: str) -> None:
    names = ", ".join(f"tenantry.{t}" for t in tables)
    await admin_pool.execute(f"TRUNCATE {names} CASCADE")
    for t in tables:
        await admin_pool.execute(f"ALTER TABLE tenantry.{t} SET (autovacuum_enabled = false)")
    await admin_pool.execute(f"VACUUM ANALYZE {names}")


async def _tenants(admin_pool: asyncpg.Pool, n: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    await admin_pool.execute(
        "INSERT INTO tenantry.tenants (id, slug, name)"
        " SELECT t, 'plan-' || replace(t::text, '-', ''), 'plan' FROM unnest($1::uuid[]) t",
        ids,
    )
    return ids


async def _webhook_endpoints(admin_pool: asyncpg.Pool, n: int) -> None:
    """An endpoint each for `n` new tenants."""
    await admin_pool.execute(
        "INSERT INTO tenantry.webhook_endpoints (tenant_id, url, secret)"
        " SELECT t, 'https://plan.example/' || t, '\\x00'::bytea FROM unnest($1::uuid[]) t",
        await _tenants(admin_pool, n),
    )


WEBHOOK_CLAIM = "SELECT count(*) FROM tenantry.webhook_claim('probe', 10, $1, 5, 10, 5, 10)"


async def test_the_webhook_claim_planned_on_an_empty_table_reads_by_index_once_it_grew(
    admin_pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await _webhook_endpoints(admin_pool, 10)
    await _empty_and_vacuumed(admin_pool, "webhook_deliveries")
    # PL/pgSQL settles on a generic plan after five custom ones.
    for _ in range(7):
        assert await conn.fetchval(WEBHOOK_CLAIM, uuid.uuid4()) == 0
    await admin_pool.execute(
        "INSERT INTO tenantry.webhook_deliveries"
        " (tenant_id, endpoint_id, event_id, event_type, body, state)"
        " SELECT e.tenant_id, e.id, g, 'plan.test', '{}',"
        "        CASE WHEN g % 10 = 0 THEN 'pending' ELSE 'delivered' END"
        "   FROM tenantry.webhook_endpoints e, generate_series(1, 2000) g"
    )
    async with _scans_counted(conn, "webhook_deliveries") as scans:
        assert await conn.fetchval(WEBHOOK_CLAIM, uuid.uuid4()) == 10
        assert await scans() == 0


async def test_the_job_claim_planned_on_an_empty_table_reads_by_index_once_it_grew(
    admin_pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await _empty_and_vacuumed(admin_pool, "jobs")
    claim = "SELECT count(id) FROM tenantry.claim_jobs('default', 10, 'probe', 30, NULL, NULL)"
    # claim_jobs forces generic plans: the first call's are the ones kept.
    assert await conn.fetchval(claim) == 0
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind, run_at)"
        " SELECT t, 'w', now() + CASE WHEN g % 2 = 0 THEN interval '0' ELSE interval '1 hour' END"
        "   FROM unnest($1::uuid[]) t, generate_series(1, 200) g",
        [uuid.uuid4() for _ in range(50)],
    )
    async with _scans_counted(conn, "jobs") as scans:
        assert await conn.fetchval(claim) == 10
        assert await scans() == 0


@pytest.mark.parametrize("function", ["emit", "emit_many"])
async def test_an_event_appended_after_the_outbox_grew_finds_its_version_by_index(
    admin_pool: asyncpg.Pool, conn: asyncpg.Connection, function: str
) -> None:
    (tenant,) = await _tenants(admin_pool, 1)
    await _empty_and_vacuumed(admin_pool, "outbox")
    sql = (
        "SELECT tenantry.emit($1, 'plan', $2, 'plan.appended', '{}'::jsonb)"
        if function == "emit"
        else "SELECT tenantry.emit_many($1, ARRAY['plan'], ARRAY[$2], ARRAY[NULL::integer],"
        " ARRAY['plan.appended'], ARRAY['{}'::jsonb])"
    )
    # Plans made while the outbox has (nearly) nothing in it.
    for i in range(7):
        await conn.execute(sql, tenant, str(i))
    await admin_pool.execute(
        "INSERT INTO tenantry.outbox (tenant_id, aggregate_type, aggregate_id, version,"
        " event_type, payload)"
        " SELECT $1, 'plan', 'grown-' || g, 1, 'plan.appended', '{}'"
        "   FROM generate_series(1, 20000) g",
        tenant,
    )
    async with _scans_counted(conn, "outbox") as scans:
        await conn.execute(sql, tenant, "3")
        assert await scans() == 0
        version = await conn.fetchval(
            "SELECT max(version) FROM tenantry.outbox WHERE aggregate_id = '3'"
        )
        assert version == 2


async def test_the_event_streams_follow_planned_on_an_empty_outbox_reads_by_index_once_it_grew(
    admin_pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """outbox_follow: every process's SSE hub calls it on each wake-up."""
    (tenant,) = await _tenants(admin_pool, 1)
    await _empty_and_vacuumed(admin_pool, "outbox")
    follow = "SELECT count(*) FROM tenantry.outbox_follow($1, 'onboarding')"
    snapshot = await conn.fetchval("SELECT pg_current_snapshot()::text")
    for _ in range(7):
        assert await conn.fetchval(follow, snapshot) == 1  # the snapshot row alone
    await admin_pool.execute(
        "INSERT INTO tenantry.outbox (tenant_id, aggregate_type, aggregate_id, version,"
        " event_type, payload)"
        " SELECT $1, 'onboarding', 'grown-' || g, 1, 'onboarding.accepted', '{}'"
        "   FROM generate_series(1, 20000) g",
        tenant,
    )
    snapshot = await conn.fetchval("SELECT pg_current_snapshot()::text")
    await admin_pool.execute(
        "SELECT tenantry.emit($1, 'onboarding', 'late', 'onboarding.accepted', '{}'::jsonb)",
        tenant,
    )
    async with _scans_counted(conn, "outbox") as scans:
        rows = await conn.fetch(
            "SELECT aggregate_id FROM tenantry.outbox_follow($1, 'onboarding')", snapshot
        )
        assert [r["aggregate_id"] for r in rows] == ["late"]
        assert await scans() == 0


# The service's own statements outside those functions, which it runs in a tenant's
# transaction: the onboarding status (GET /v1/onboardings/{id}), the SSE replay after
# a reconnect, the API key check of every tenant request.  Each is warmed up through
# the service's entry point on a pool of one connection, so that the plans cached are
# the ones that entry point made; the measured call then runs in a transaction of the
# test's own, where only the tenant is named.


@asynccontextmanager
async def _one_connection(app_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with await db.create_pool(app_url, min_size=1, max_size=1) as p:
        yield p


async def _as_tenant(c: Conn, tenant: uuid.UUID) -> None:
    await c.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant))


async def _onboardings(admin_pool: asyncpg.Pool, tenants: list[uuid.UUID]) -> None:
    """An onboarding per tenant, with two steps done and two events."""
    await admin_pool.execute(
        "INSERT INTO tenantry.onboardings (tenant_id, id, email, tenant_name, plan)"
        " SELECT t, t, 'a@b.example', 'name', 'free' FROM unnest($1::uuid[]) t",
        tenants,
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.onboarding_steps (tenant_id, onboarding_id, step)"
        " SELECT t, t, s FROM unnest($1::uuid[]) t, unnest(ARRAY['one', 'two']) s",
        tenants,
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.outbox (tenant_id, aggregate_type, aggregate_id, version,"
        " event_type, payload)"
        " SELECT t, 'onboarding', t::text, v, 'onboarding.step', '{}'"
        "   FROM unnest($1::uuid[]) t, generate_series(1, 2) v",
        tenants,
    )


async def test_the_onboarding_status_read_planned_on_empty_tables_reads_by_index_once_they_grew(
    admin_pool: asyncpg.Pool, app_url: str
) -> None:
    await _empty_and_vacuumed(admin_pool, "onboardings", "onboarding_steps")
    first = uuid.uuid4()
    await _onboardings(admin_pool, [first])
    async with _one_connection(app_url) as pool:
        for _ in range(7):
            found = await machine.find(pool, first, first)
            assert found is not None and len(found.steps) == 2
        await _onboardings(admin_pool, [uuid.uuid4() for _ in range(10_000)])
        async with (
            pool.acquire() as c,
            _scans_counted(c, "onboardings", "onboarding_steps") as scans,
        ):
            await _as_tenant(c, first)
            found = await machine.find(c, first, first)
            assert found is not None and len(found.steps) == 2
            assert await scans() == 0


async def test_the_stream_replay_planned_on_an_empty_outbox_reads_by_index_once_it_grew(
    admin_pool: asyncpg.Pool, app_url: str
) -> None:
    await _empty_and_vacuumed(admin_pool, "outbox", "onboardings", "onboarding_steps")
    first = uuid.uuid4()
    await _onboardings(admin_pool, [first])
    async with _one_connection(app_url) as pool:
        api = cast(OnboardingApi, SimpleNamespace(pool=pool))
        for _ in range(7):
            assert len((await _replay(api, first, first, 1)).events) == 1
        await _onboardings(admin_pool, [uuid.uuid4() for _ in range(10_000)])
        async with pool.acquire() as c, _scans_counted(c, "outbox") as scans:
            await _as_tenant(c, first)
            events = await outbox.replay(c, first, AGGREGATE, str(first), 0)
            assert [e.version for e in events] == [1, 2]
            assert await scans() == 0


async def test_the_api_key_check_planned_on_an_empty_table_reads_by_index_once_it_grew(
    admin_pool: asyncpg.Pool, app_url: str
) -> None:
    await _empty_and_vacuumed(admin_pool, "api_keys")
    (first,) = await _tenants(admin_pool, 1)
    async with _one_connection(app_url) as pool:
        key = await tenants.create_key(pool, first)
        for _ in range(7):
            assert await tenants.authenticate(pool, key.secret) == first
        others = await _tenants(admin_pool, 2_000)
        await admin_pool.execute(
            "INSERT INTO tenantry.api_keys (tenant_id, secret_hash)"
            " SELECT t, sha256((t::text || g)::bytea) FROM unnest($1::uuid[]) t,"
            "        generate_series(1, 10) g",
            others,
        )
        async with pool.acquire() as c, _scans_counted(c, "api_keys") as scans:
            await _as_tenant(c, first)
            assert await tenants.authenticate(c, key.secret) == first
            assert await scans() == 0


async def test_the_webhook_claim_steps_over_finished_deliveries_in_flight_index_once(
    admin_pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Every delivery that left `sending` leaves an entry in the in-flight index until
    VACUUM.  A bitmap scan of that index (what the planner chose) visited them all on
    every claim: 3,379 entries for 28 deliveries in flight, a third of a claim's time,
    in a 10,000-delivery burst.  A plain index scan marks them dead once and skips
    them on later claims."""
    await _webhook_endpoints(admin_pool, 10)
    await _empty_and_vacuumed(admin_pool, "webhook_deliveries")
    await admin_pool.execute(
        "INSERT INTO tenantry.webhook_deliveries"
        " (tenant_id, endpoint_id, event_id, event_type, body, state, lease_until)"
        " SELECT e.tenant_id, e.id, g, 'plan.test', '{}', 'sending', now()"
        "   FROM tenantry.webhook_endpoints e, generate_series(1, 300) g"
    )
    await admin_pool.execute(
        "UPDATE tenantry.webhook_deliveries SET state = 'delivered', lease_until = NULL"
    )
    assert await conn.fetchval(WEBHOOK_CLAIM, uuid.uuid4()) == 0  # marks them

    async def in_flight_entries_read() -> int:
        return int(
            await conn.fetchval(
                "SELECT pg_stat_get_xact_tuples_returned("
                "'tenantry.webhook_deliveries_sending_idx'::regclass)"
            )
        )

    async with conn.transaction():
        before = await in_flight_entries_read()
        assert await conn.fetchval(WEBHOOK_CLAIM, uuid.uuid4()) == 0
        assert await in_flight_entries_read() - before < 30  # of 3,000


HOT_FUNCTIONS = (
    "enqueue",
    "claim_jobs",
    "next_due_job",
    "record_job_outcomes",
    "extend_job_leases",
    "rescue_expired_jobs",
    "complete_job",
    "webhook_claim",
    "webhook_record",
    "webhook_record_and_claim",
    "webhook_fan_out",
    "emit",
    "emit_many",
    "outbox_follow",
    "accept_onboarding",
    "onboarding_lock",
    "onboarding_run_steps",
)


async def test_every_hot_path_function_plans_without_sequential_scans(
    admin_pool: asyncpg.Pool,
) -> None:
    """The cases above reproduce the trap for five of them; the others carry the same
    setting for the same reason (jobs/functions.sql), and must keep it."""
    rows = await admin_pool.fetch(
        "SELECT p.proname, p.proconfig FROM pg_proc p"
        " WHERE p.pronamespace = 'tenantry'::regnamespace AND p.proname = ANY($1::text[])",
        list(HOT_FUNCTIONS),
    )
    settings = {r["proname"]: r["proconfig"] or [] for r in rows}
    assert sorted(settings) == sorted(HOT_FUNCTIONS)
    missing = [
        f
        for f, config in settings.items()
        if "enable_seqscan=off" not in config or "jit=off" not in config
    ]
    assert missing == []


async def test_no_hot_function_is_compiled_by_jit(conn: asyncpg.Connection) -> None:
    """Before PostgreSQL 18, a sequential scan that enable_seqscan = off cannot avoid (a
    one-row table with no index: the fan-out's position) is costed at 10^10, past
    jit_above_cost: every idle fan-out pass was JIT-compiled, 0.2 -> 15 ms on PostgreSQL
    15.  The functions turn JIT off with it.  (Where the server has no JIT, as the
    embedded one, this holds trivially; the PostgreSQL 15 leg of CI tests it.)"""
    await conn.execute("LOAD 'auto_explain'")
    await conn.execute(
        "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
        " SET auto_explain.log_level = notice; SET jit_above_cost = 100000"
    )
    plans: list[str] = []
    conn.add_log_listener(lambda _c, m: plans.append(str(m)))
    try:
        await conn.fetch("SELECT * FROM tenantry.webhook_fan_out()")
        await conn.fetch(
            "SELECT count(id) FROM tenantry.claim_jobs('default', 10, 'p', 30, NULL, 2)"
        )
        await conn.fetch(
            "SELECT * FROM tenantry.webhook_claim('p', 10, gen_random_uuid(), 5, 10, 5, 10)"
        )
    finally:
        await conn.execute("RESET ALL")
    assert plans, "auto_explain wrote no plan"
    assert [p for p in plans if "JIT:" in p] == []
