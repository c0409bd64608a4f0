"""Property: whatever random tenants do, in whatever order, every read in a tenant's
context returns exactly that tenant's rows (checked against a model), never another's."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantry.jobs import queue as jobs
from tenantry.tenancy import tenant_tx

TENANTS = [uuid.UUID(int=(i + 1) << 96 | i + 1) for i in range(3)]
TABLES = ("users", "workspaces", "api_keys", "jobs")


@dataclass
class Model:
    # tenant -> email -> display name
    users: dict[uuid.UUID, dict[str, str]] = field(default_factory=dict)
    jobs: dict[uuid.UUID, int] = field(default_factory=dict)


op = st.one_of(
    st.tuples(st.just("add_user"), st.sampled_from(TENANTS), st.integers(0, 5)),
    st.tuples(st.just("rename_all"), st.sampled_from(TENANTS), st.integers(0, 5)),
    st.tuples(st.just("delete_user"), st.sampled_from(TENANTS), st.integers(0, 5)),
    st.tuples(st.just("delete_other"), st.sampled_from(TENANTS), st.sampled_from(TENANTS)),
    st.tuples(st.just("enqueue"), st.sampled_from(TENANTS), st.integers(0, 5)),
    st.tuples(st.just("read"), st.sampled_from(TENANTS), st.integers(0, 5)),
)


async def check_reads(pool: asyncpg.Pool, model: Model, tenant: uuid.UUID) -> None:
    async with tenant_tx(pool, tenant) as tx:
        users = await tx.fetch("SELECT tenant_id, email, display_name FROM tenantry.users")
        job_tenants = await tx.fetch("SELECT tenant_id FROM tenantry.jobs")
        # Aimed at everyone else explicitly: still nothing.
        others = await tx.fetchval(
            "SELECT count(*) FROM tenantry.users WHERE tenant_id <> $1", tenant
        )
        bare = [r["id"] for r in await tx.fetch("SELECT id FROM tenantry.tenants")]
    assert {r["tenant_id"] for r in users} <= {tenant}
    assert {r["email"]: r["display_name"] for r in users} == model.users.get(tenant, {})
    assert len(job_tenants) == model.jobs.get(tenant, 0)
    assert {r["tenant_id"] for r in job_tenants} <= {tenant}
    assert others == 0
    assert bare == [tenant]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op, min_size=1, max_size=12))
async def test_random_operations_never_observe_another_tenant(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool, ops: list[tuple[str, uuid.UUID, object]]
) -> None:
    # Every example starts from the same three tenants and nothing else.
    await admin_pool.execute(
        "TRUNCATE tenantry.tenants, tenantry.users, tenantry.workspaces, tenantry.roles,"
        " tenantry.memberships, tenantry.api_keys, tenantry.jobs CASCADE"
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.tenants (id, slug, name)"
        " SELECT t, 't' || replace(t::text, '-', ''), 'x' FROM unnest($1::uuid[]) t",
        TENANTS,
    )
    model = Model()
    for kind, tenant, arg in ops:
        mine = model.users.setdefault(tenant, {})
        if kind == "add_user":
            email = f"u{arg}@example.com"
            async with tenant_tx(pool, tenant) as tx:
                await tx.execute(
                    "INSERT INTO tenantry.users (tenant_id, id, email) VALUES ($1, $2, $3)"
                    " ON CONFLICT DO NOTHING",
                    tenant,
                    uuid.uuid4(),
                    email,
                )
            mine.setdefault(email, "")
        elif kind == "rename_all":
            # No tenant predicate at all: row-level security alone scopes it.
            async with tenant_tx(pool, tenant) as tx:
                await tx.execute("UPDATE tenantry.users SET display_name = $1", f"n{arg}")
            for email in mine:
                mine[email] = f"n{arg}"
        elif kind == "delete_user":
            async with tenant_tx(pool, tenant) as tx:
                await tx.execute(
                    "DELETE FROM tenantry.users WHERE email = $1", f"u{arg}@example.com"
                )
            mine.pop(f"u{arg}@example.com", None)
        elif kind == "delete_other":
            # Aimed at another tenant (or itself): only ever its own rows go.
            assert isinstance(arg, uuid.UUID)
            async with tenant_tx(pool, tenant) as tx:
                await tx.execute("DELETE FROM tenantry.users WHERE tenant_id = $1", arg)
            if arg == tenant:
                mine.clear()
        elif kind == "enqueue":
            await jobs.enqueue(pool, tenant_id=tenant, kind="k", payload={"n": arg})
            model.jobs[tenant] = model.jobs.get(tenant, 0) + 1
        await check_reads(pool, model, tenant)
    for tenant in TENANTS:
        await check_reads(pool, model, tenant)
    # And the model matches what is really stored, seen from outside.
    stored = await admin_pool.fetch("SELECT tenant_id, email, display_name FROM tenantry.users")
    assert {(r["tenant_id"], r["email"], r["display_name"]) for r in stored} == {
        (t, e, n) for t, users in model.users.items() for e, n in users.items()
    }
