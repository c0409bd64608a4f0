"""The one-call accept under attack: what it leaves on the connection for the next
borrower, whom it refuses, and how concurrent requests with one key end."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import orjson
import pytest

from tenantry import db
from tenantry.errors import Conflict
from tenantry.onboarding import machine
from tenantry.onboarding.model import SignUp
from tests.helpers import eventually
from tests.integration.test_onboarding_api import SIGN_UP, _lasting, _rows, post, svc  # noqa: F401

GOOD = SignUp("grace@example.com", "Compilers Inc", "free")
ACCEPT_ARGS = "$1::uuid, $2::uuid, $3, $4, $5, $6::bytea, $7::bytea, '{}'::jsonb, '{}'::jsonb, 'q'"
CALL = f"SELECT * FROM tenantry.accept_onboarding({ACCEPT_ARGS})"


@pytest.fixture
async def one(app_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool of one connection: the next borrower is the same session."""
    async with await db.create_pool(app_url, min_size=1, max_size=1) as p:
        yield p


async def _session(pool: asyncpg.Pool) -> tuple[int, str | None, str | None, str]:
    async with pool.acquire() as c:
        row = await c.fetchrow(
            "SELECT pg_backend_pid() AS pid,"
            " nullif(current_setting('app.tenant_id', true), '') AS tenant,"
            " nullif(current_setting('app.idempotency_key', true), '') AS key,"
            " current_setting('statement_timeout') AS timeout"
        )
        assert row is not None
        assert not c.is_in_transaction()
        return row["pid"], row["tenant"], row["key"], row["timeout"]


async def _assert_clean(pool: asyncpg.Pool) -> int:
    pid, tenant, key, timeout = await _session(pool)
    assert (tenant, key, timeout) == (None, None, "0"), (tenant, key, timeout)
    return pid


async def test_each_outcome_leaves_the_next_borrower_a_clean_session(
    one: asyncpg.Pool,
) -> None:
    pid = await _assert_clean(one)
    await machine.accept(one, GOOD, idempotency_key=None, queue="onboarding")
    assert await _assert_clean(one) == pid
    first = await machine.accept(one, GOOD, idempotency_key="k-1", queue="onboarding")
    assert await _assert_clean(one) == pid
    again = await machine.accept(one, GOOD, idempotency_key="k-1", queue="onboarding")
    assert again.replayed and again.onboarding_id == first.onboarding_id
    assert await _assert_clean(one) == pid
    with pytest.raises(Conflict):
        await machine.accept(
            one, SignUp(GOOD.email, GOOD.tenant_name, "pro"), idempotency_key="k-1", queue="o"
        )
    assert await _assert_clean(one) == pid


@pytest.mark.parametrize(
    "sign_up",
    [
        SignUp("a\x00b@example.com", "Compilers Inc", "free"),  # NUL: the server refuses
        SignUp("grace@example.com", "x" * 5000, "free"),  # the name's check
        SignUp("no-at-sign", "Compilers Inc", "free"),  # the email's check
        SignUp("grace@example.com", "Compilers Inc", "x" * 100_000),  # a huge value
    ],
)
async def test_an_error_inside_the_call_leaves_nothing_behind(
    one: asyncpg.Pool, admin_pool: asyncpg.Pool, sign_up: SignUp
) -> None:
    pid = await _assert_clean(one)
    with pytest.raises((asyncpg.PostgresError, asyncpg.DataError, ValueError)):
        await machine.accept(one, sign_up, idempotency_key="err-key", queue="onboarding")
    assert await _assert_clean(one) == pid
    # Nothing was written, the key included: it is free for the next request.
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.idempotency_keys") == 0
    ok = await machine.accept(one, GOOD, idempotency_key="err-key", queue="onboarding")
    assert not ok.replayed


async def _hold_key(admin: asyncpg.Connection, key: str) -> None:
    """An open transaction holding `key`'s row (uncommitted): callers of the key wait."""
    await admin.execute("BEGIN")
    await admin.execute(
        "INSERT INTO tenantry.idempotency_keys VALUES ($1, $2, $3, $4)",
        machine.key_hash(key),
        GOOD.digest(),
        uuid.uuid4(),
        uuid.uuid4(),
    )


async def _waiting(admin_pool: asyncpg.Pool, n: int) -> None:
    """Until `n` calls of the accept wait on a lock (the held key's row)."""

    async def waiting() -> bool:
        count = await admin_pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE '%accept_onboarding%'"
        )
        return bool(count >= n)

    await eventually(waiting, 10)


async def test_a_request_cancelled_while_waiting_on_its_key_leaves_nothing(
    one: asyncpg.Pool, admin_pool: asyncpg.Pool, database_url: str
) -> None:
    pid = await _assert_clean(one)
    admin = await db.connect(database_url)
    try:
        await _hold_key(admin, "held")
        task = asyncio.create_task(
            machine.accept(one, GOOD, idempotency_key="held", queue="onboarding")
        )
        await _waiting(admin_pool, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await admin.execute("ROLLBACK")
    finally:
        await admin.close()
    assert await _assert_clean(one) == pid


async def test_a_backend_terminated_mid_call_leaves_the_pool_usable(
    one: asyncpg.Pool, admin_pool: asyncpg.Pool, database_url: str
) -> None:
    pid = await _assert_clean(one)
    admin = await db.connect(database_url)
    try:
        await _hold_key(admin, "held")
        task = asyncio.create_task(
            machine.accept(one, GOOD, idempotency_key="held", queue="onboarding")
        )
        await _waiting(admin_pool, 1)
        await admin_pool.execute("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await task
        await admin.execute("ROLLBACK")
    finally:
        await admin.close()
    await _assert_clean(one)
    assert not (await machine.accept(one, GOOD, idempotency_key="held", queue="o")).replayed


@pytest.mark.parametrize("first_request_ends", ["ROLLBACK", "COMMIT"])
async def test_waiters_on_a_held_key_follow_how_its_first_request_ends(
    first_request_ends: str, pool: asyncpg.Pool, admin_pool: asyncpg.Pool, database_url: str
) -> None:
    """Five accepts wait on a key another transaction holds: if it rolls back, one of
    them makes the onboarding and the others replay it; if it commits, all replay."""
    admin = await db.connect(database_url)
    try:
        await _hold_key(admin, "shared")
        tasks = [
            asyncio.create_task(
                machine.accept(pool, GOOD, idempotency_key="shared", queue="onboarding")
            )
            for _ in range(5)
        ]
        await _waiting(admin_pool, 5)
        await admin.execute(first_request_ends)
    finally:
        await admin.close()
    answers = await asyncio.gather(*tasks)
    onboardings = await admin_pool.fetchval("SELECT count(*) FROM tenantry.onboardings")
    if first_request_ends == "ROLLBACK":
        assert sum(not a.replayed for a in answers) == 1
        assert len({(a.onboarding_id, a.tenant_id, a.created_at) for a in answers}) == 1
        assert onboardings == 1
    else:
        assert all(a.replayed for a in answers)
        assert onboardings == 0


def _args(tenant: uuid.UUID, key: str | None = None) -> tuple[object, ...]:
    return (
        tenant,
        uuid.uuid4(),
        GOOD.email,
        GOOD.tenant_name,
        GOOD.plan,
        None if key is None else hashlib.sha256(key.encode()).digest(),
        GOOD.digest(),
    )


async def test_the_call_refuses_a_transaction_in_another_tenants_context(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    async with pool.acquire() as c:
        async with c.transaction():
            await c.execute(f"SELECT set_config('app.tenant_id', '{a}', true)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await c.fetchrow(CALL, *_args(b))
        # A session-wide context (set outside a transaction) is refused as well.
        await c.execute(f"SELECT set_config('app.tenant_id', '{a}', false)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await c.fetchrow(CALL, *_args(b))
        # ... and after the refusal the session's context is still its own.
        assert await c.fetchval("SELECT current_setting('app.tenant_id')") == str(a)
        # In its own tenant's context, the call goes through.
        async with c.transaction():
            row = await c.fetchrow(CALL, *_args(a))
            assert row is not None and row["outcome"] == "accepted"
            # The transaction is in the tenant's context for the rest of it.
            assert await c.fetchval("SELECT current_setting('app.tenant_id')") == str(a)
    assert (
        await admin_pool.fetchval(
            "SELECT count(*) FROM tenantry.onboardings WHERE tenant_id <> $1", a
        )
        == 0
    )


async def test_the_function_runs_with_the_callers_rights_and_only_the_service_may_call_it(
    admin_pool: asyncpg.Pool,
) -> None:
    sig = (
        "tenantry.accept_onboarding(uuid, uuid, text, text, text, bytea, bytea, jsonb, jsonb, text)"
    )
    assert not await admin_pool.fetchval(
        f"SELECT prosecdef FROM pg_proc WHERE oid = '{sig}'::regprocedure"
    )
    can = {
        r["rolname"]: r["can"]
        for r in await admin_pool.fetch(
            f"SELECT rolname, has_function_privilege(oid, '{sig}', 'EXECUTE') AS can"
            " FROM pg_roles WHERE rolname LIKE 'tenantry%' AND NOT rolsuper"
        )
    }
    assert can["tenantry_service"]
    for role in ("worker", "system", "operator", "analyst", "metrics", "app_worker"):
        assert not can.get(f"tenantry_{role}", False), role


async def test_concurrent_requests_with_one_key_and_two_bodies_write_one_sign_up(
    http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    key = str(uuid.uuid4())
    bodies = [SIGN_UP, {**SIGN_UP, "plan": "pro"}] * 10
    answers = await asyncio.gather(
        *(post(http, orjson.dumps(b), **{"Idempotency-Key": key}) for b in bodies)
    )
    won = next(b for (s, _, h), b in zip(answers, bodies, strict=True) if s == 202)
    for (status, body, _), sent in zip(answers, bodies, strict=True):
        if sent == won:
            assert status == 202
        else:
            assert status == 409 and body["status"] == 409, body
    # One answer but for what a replay issues anew (its token, from the replay's second).
    assert len({orjson.dumps(_lasting(b)) for s, b, _ in answers if s == 202}) == 1
    assert await _rows(admin_pool) == {"onboardings": 1, "events": 1, "jobs": 1, "keys": 1}
