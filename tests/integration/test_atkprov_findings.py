"""ATKPROV FINDINGS: adversarial tests of provisioning's one-call groups
(tenantry.onboarding_run_steps).  Each test here failed on branch `prov` (5c076c6) when
it was written; the docstring says what it shows."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from tenantry.onboarding import machine
from tenantry.onboarding.model import STEPS, SignUp, derived_id
from tenantry.tenancy import tenant_tx_on
from tenantry.tenants import store as tenants


async def _accepted(pool: asyncpg.Pool, name: str) -> tuple[uuid.UUID, uuid.UUID]:
    a = await machine.accept(
        pool, SignUp("ada@example.com", name, "pro"), idempotency_key=None, queue="default"
    )
    return a.tenant_id, a.onboarding_id


def _args(tid: uuid.UUID, oid: uuid.UUID) -> tuple[object, ...]:
    names, permissions = tenants.default_roles()
    return (
        [f"atk-{tid.hex[:12]}"],
        derived_id(oid, "owner"),
        names,
        permissions,
        derived_id(oid, "workspace"),
    )


async def _state(admin: asyncpg.Pool, oid: uuid.UUID) -> tuple[str, int, int]:
    row = await admin.fetchrow(
        "SELECT o.state, o.version,"
        " (SELECT count(*) FROM tenantry.onboarding_steps s WHERE s.onboarding_id = o.id) AS n"
        " FROM tenantry.onboardings o WHERE o.id = $1",
        oid,
    )
    assert row is not None
    return row["state"], row["version"], row["n"]


@pytest.mark.parametrize(
    ("todo", "all_steps"),
    [
        (["welcome_email", "storage"], list(STEPS)),  # out of order: nothing before them
        (["provisioned"], list(STEPS)),  # the end, before the tenant exists
        (list(STEPS), None),  # no list of all the steps: never `completed`
        (list(STEPS), ["tenant"]),  # a list that ends elsewhere: `completed` too early
        (["no_such_step"], list(STEPS)),
    ],
    ids=["out-of-order", "end-first", "null-all-steps", "short-all-steps", "unknown"],
)
async def test_atkprov_finding_run_steps_records_only_the_steps_in_order(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool, todo: list[str], all_steps: list[str] | None
) -> None:
    """ATKPROV FINDING (low): tenantry.onboarding_run_steps, granted to the service
    login, takes the order and the end of the steps from its caller (`todo`,
    `all_steps`) without checking them against the ledger.  Called with steps out of
    order it records `welcome_email` and `storage` as done on a fresh onboarding (the
    ledger then says the email went out while no tenant exists; a later run skips
    them, so the email is never sent); with `all_steps` NULL or another list it
    records all seven steps and leaves the onboarding `provisioning` for ever (its
    provisioning job, given with `completes_job`, completes in the same call), and the
    next run of the Python side finds no group left (StopIteration).  Expected: the
    call refuses (an error, nothing written) rather than write a ledger the state
    machine cannot reach."""
    tid, oid = await _accepted(pool, f"Order {uuid.uuid4().hex[:6]}")
    before = await _state(admin_pool, oid)
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError):
            await conn.fetchrow(
                machine.Q["run_steps"], tid, oid, todo, all_steps, *_args(tid, oid),
                None, None, None, None,
            )  # fmt: skip
    assert await _state(admin_pool, oid) == before


async def test_atkprov_finding_the_tenant_check_compares_uuids_not_their_spelling(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """ATKPROV FINDING (low): the "transaction of another tenant" check of
    tenantry.onboarding_run_steps (and of tenantry.accept_onboarding) compares
    app.tenant_id as text with the tenant's canonical spelling, while row-level
    security casts it to uuid.  A caller whose transaction names the same tenant in
    another spelling of its UUID (upper case, as some clients print them) is refused
    with 42501 ("in tenant context X, not X") though every policy treats it as that
    tenant.  Fails closed, so no leak; the refusal is wrong."""
    tid, oid = await _accepted(pool, f"Spelling {uuid.uuid4().hex[:6]}")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tid).upper())
        # Row-level security sees the tenant's rows under that spelling...
        assert (
            await conn.fetchval("SELECT count(*) FROM tenantry.onboardings WHERE id = $1", oid) == 1
        )
        # ...and the function should run for it as well.
        row = await conn.fetchrow(
            machine.Q["run_steps"], tid, oid, ["tenant"], list(STEPS), *_args(tid, oid),
            None, None, None, None,
        )  # fmt: skip
    assert row is not None and list(row["ran"]) == ["tenant"]
    # The accept's check is the same comparison.
    mine = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(mine).upper())
        accepted = await conn.fetchrow(
            machine.Q["accept"],
            *(mine, uuid.uuid4(), "ada@example.com", "Same Tenant", "free", None),
            *(b"\x01" * 32, {}, {}, "default"),
        )
    assert accepted is not None and accepted["outcome"] == "accepted"


async def test_atkprov_rls_the_new_functions_write_no_other_tenants_rows(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """ATKPROV (passes): in tenant A's transaction, and with no tenant at all, none of
    the new functions writes a row of tenant B."""
    ta, _ = await _accepted(pool, "Tenant Aaa")
    tb, ob = await _accepted(pool, "Tenant Bbb")
    names, permissions = tenants.default_roles()
    job_b = await admin_pool.fetchval("SELECT id FROM tenantry.jobs WHERE tenant_id = $1", tb)
    writes = [
        ("SELECT tenantry.tenant_create_with_free_slug($1, ARRAY['bbb-x'], 'B', 'pro')", (tb,)),
        ("SELECT tenantry.tenant_add_user($1, $2, 'e@example.com', 'e')", (tb, uuid.uuid4())),
        ("SELECT tenantry.tenant_add_roles($1, $2, $3)", (tb, names, permissions)),
        (
            "SELECT tenantry.tenant_add_workspace_with_member($1, $2, 'default', 'D', $3, 'owner')",
            (tb, uuid.uuid4(), uuid.uuid4()),
        ),
        (
            "SELECT tenantry.emit_many($1, ARRAY['onboarding'], ARRAY[$2::text], ARRAY[2],"
            " ARRAY['x.y'], ARRAY['{}'::jsonb])",
            (tb, str(ob)),
        ),
    ]
    for sql, args in writes:
        for in_a in (True, False):
            async with pool.acquire() as conn:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    if in_a:
                        async with tenant_tx_on(conn, ta):
                            await conn.fetch(sql, *args)
                    else:
                        await conn.fetch(sql, *args)
    async with pool.acquire() as conn:
        async with tenant_tx_on(conn, ta):
            changed = await conn.fetchval("SELECT tenantry.tenant_set_state($1, 'active')", tb)
            assert changed is False
            assert (
                await conn.fetchval("SELECT tenantry.complete_job($1, $2, 'x')", tb, job_b) is False
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="tenant context"):
            async with tenant_tx_on(conn, ta):
                await conn.fetchrow(
                    machine.Q["run_steps"], tb, ob, ["tenant"], list(STEPS), *_args(tb, ob),
                    None, None, None, None,
                )  # fmt: skip
    counts = await admin_pool.fetchrow(
        "SELECT (SELECT count(*) FROM tenantry.tenants WHERE id = $1) AS t,"
        " (SELECT count(*) FROM tenantry.users WHERE tenant_id = $1) AS u,"
        " (SELECT count(*) FROM tenantry.roles WHERE tenant_id = $1) AS r,"
        " (SELECT count(*) FROM tenantry.outbox WHERE tenant_id = $1) AS e,"
        " (SELECT count(*) FROM tenantry.jobs WHERE tenant_id = $1) AS j",
        tb,
    )
    assert counts is not None
    assert dict(counts) == {"t": 0, "u": 0, "r": 0, "e": 1, "j": 1}
