"""Row-level security: tenant A's context can neither see nor touch tenant B's rows, in
any tenant table, by any statement; an unset context sees and writes nothing; the
service's login cannot get out of it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.lowlevel
import asyncpg
import pytest

from tenantry import db, migrate, roles, tenancy
from tenantry.db import Conn
from tenantry.errors import InsecureRole, TenantContextError
from tenantry.jobs import queue as jobs
from tenantry.jobs.model import Job
from tenantry.jobs.registry import Registry
from tenantry.sql import load
from tenantry.tenancy import set_transaction_setting, tenant_tx, tenant_tx_on
from tests.conftest import with_database
from tests.helpers import TEST_TENANT_CONTEXT, running_worker

ROOT = Path(__file__).resolve().parents[2]
A = uuid.UUID("aaaaaaaa-1111-4111-8111-000000000001")
B = uuid.UUID("bbbbbbbb-2222-4222-8222-000000000002")
# Fixed ids in B, so that A's statements can aim at B's rows precisely.
B_USER = uuid.UUID("bbbbbbbb-0000-4000-8000-0000000000a1")
B_WORKSPACE = uuid.UUID("bbbbbbbb-0000-4000-8000-0000000000b1")
SHARED_EMAIL = "same@example.com"
SHARED_SLUG = "main"
SHARED_HASH = b"\x01" * 32


async def seed(admin: asyncpg.Pool, tenant: uuid.UUID, user: uuid.UUID, ws: uuid.UUID) -> None:
    """One row of every tenant table for `tenant` (as a superuser: no policies)."""
    await admin.execute(
        "INSERT INTO tenantry.tenants (id, slug, name) VALUES ($1, $2, $2)",
        tenant,
        f"t-{tenant.hex[:8]}",
    )
    await admin.execute(
        "INSERT INTO tenantry.users (tenant_id, id, email) VALUES ($1, $2, $3)",
        tenant,
        user,
        SHARED_EMAIL,
    )
    await admin.execute(
        "INSERT INTO tenantry.workspaces (tenant_id, id, slug, name) VALUES ($1, $2, $3, 'Main')",
        tenant,
        ws,
        SHARED_SLUG,
    )
    await admin.execute("INSERT INTO tenantry.roles (tenant_id, name) VALUES ($1, 'owner')", tenant)
    await admin.execute(
        "INSERT INTO tenantry.memberships (tenant_id, workspace_id, user_id, role)"
        " VALUES ($1, $2, $3, 'owner')",
        tenant,
        ws,
        user,
    )
    await admin.execute(
        "INSERT INTO tenantry.api_keys (tenant_id, secret_hash) VALUES ($1, $2)",
        tenant,
        SHARED_HASH,
    )
    await admin.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind, dedup_key) VALUES ($1, 'k', 'same-key')",
        tenant,
    )
    await admin.execute(
        "INSERT INTO tenantry.dead_jobs (tenant_id, id, queue, kind, payload, priority,"
        " attempts, errors, reason, created_at)"
        " VALUES ($1, 1, 'default', 'k', '{}', 0, 1, '[]', 'permanent', now())",
        tenant,
    )
    await admin.execute(
        "INSERT INTO tenantry.job_counters (tenant_id, queue, kind, minute, succeeded)"
        " VALUES ($1, 'default', 'k', date_trunc('minute', now()), 1)",
        tenant,
    )
    await admin.execute(
        "INSERT INTO tenantry.outbox (tenant_id, aggregate_type, aggregate_id, version,"
        " event_type) VALUES ($1, 'thing', 'same', 1, 'thing.made')",
        tenant,
    )
    await admin.execute(
        "INSERT INTO tenantry.onboardings (tenant_id, id, email, tenant_name, plan)"
        " VALUES ($1, $1, $2, 'Same name', 'free')",
        tenant,
        SHARED_EMAIL,
    )
    # The webhook rows share their ids across tenants (the endpoint's and the
    # delivery's id is the tenant's): no key may tell one tenant of another's.
    await admin.execute(
        "INSERT INTO tenantry.webhook_endpoints (tenant_id, id, url, secret)"
        " VALUES ($1, $1, 'https://example.com/hook', '\\x01')",
        tenant,
    )
    await admin.execute(
        "INSERT INTO tenantry.webhook_deliveries (tenant_id, id, endpoint_id, event_id,"
        " event_type, body) VALUES ($1, $1, $1, 1, 'thing.made', '{}')",
        tenant,
    )
    await admin.execute(
        "INSERT INTO tenantry.webhook_attempts (tenant_id, delivery_id, endpoint_id, attempt,"
        " attempted_at, url, result, request_headers, request_body, duration_ms)"
        " VALUES ($1, $1, $1, 1, now(), 'https://example.com/hook', 'delivered', '{}', '', 1)",
        tenant,
    )
    await admin.execute(
        "INSERT INTO tenantry.onboarding_steps (tenant_id, onboarding_id, step)"
        " VALUES ($1, $1, 'tenant')",
        tenant,
    )


@dataclass(frozen=True)
class Table:
    name: str
    column: str  # the tenant column
    # Inserts one row for tenant $1 (not colliding with the seeded rows).
    insert: str
    # What the service's login may do at all (row-level security then decides which
    # rows): dead_jobs only SELECT and DELETE (only the worker's bury writes them), the
    # outbox only SELECT and INSERT (append-only).
    insertable: bool = True
    updatable: bool = True
    deletable: bool = True

    def refusal(self, allowed: bool) -> str:
        return "row-level security" if allowed else "permission denied"


TABLES = [
    Table(
        "tenants",
        "id",
        "INSERT INTO tenantry.tenants (id, slug, name)"
        " VALUES ($1::uuid, 'x-' || left(md5($1::uuid::text), 8), 'x')",
    ),
    Table(
        "users",
        "tenant_id",
        "INSERT INTO tenantry.users (tenant_id, id, email)"
        " VALUES ($1, gen_random_uuid(), 'new@example.com')",
    ),
    Table(
        "workspaces",
        "tenant_id",
        "INSERT INTO tenantry.workspaces (tenant_id, id, slug, name)"
        " VALUES ($1, gen_random_uuid(), 'other', 'Other')",
    ),
    Table(
        "roles", "tenant_id", "INSERT INTO tenantry.roles (tenant_id, name) VALUES ($1, 'member')"
    ),
    Table(
        "memberships",
        "tenant_id",
        # B's seeded user in B's seeded workspace: needs no other row.
        "INSERT INTO tenantry.memberships (tenant_id, workspace_id, user_id, role)"
        f" VALUES ($1, '{B_WORKSPACE}', '{B_USER}', 'owner')",
    ),
    Table(
        "api_keys",
        "tenant_id",
        "INSERT INTO tenantry.api_keys (tenant_id, secret_hash)"
        " VALUES ($1::uuid, sha256($1::uuid::text::bytea))",
    ),
    Table("jobs", "tenant_id", "INSERT INTO tenantry.jobs (tenant_id, kind) VALUES ($1, 'k')"),
    Table(
        "dead_jobs",
        "tenant_id",
        "INSERT INTO tenantry.dead_jobs (tenant_id, id, queue, kind, payload, priority,"
        " attempts, errors, reason, created_at)"
        " VALUES ($1, 2, 'default', 'k', '{}', 0, 1, '[]', 'permanent', now())",
        insertable=False,
        updatable=False,
    ),
    Table(
        "job_counters",
        "tenant_id",
        "INSERT INTO tenantry.job_counters (tenant_id, queue, kind, minute)"
        " VALUES ($1, 'other', 'k', now())",
    ),
    Table(
        "outbox",
        "tenant_id",
        "INSERT INTO tenantry.outbox (tenant_id, aggregate_type, aggregate_id, version,"
        " event_type) VALUES ($1, 'thing', 'other', 1, 'thing.made')",
        updatable=False,
        deletable=False,
    ),
    Table(
        "onboardings",
        "tenant_id",
        "INSERT INTO tenantry.onboardings (tenant_id, id, email, tenant_name, plan)"
        " VALUES ($1, gen_random_uuid(), 'n@example.com', 'New one', 'free')",
    ),
    Table(
        "onboarding_steps",
        "tenant_id",
        # Every seeded onboarding's id is its tenant's id.
        "INSERT INTO tenantry.onboarding_steps (tenant_id, onboarding_id, step)"
        " VALUES ($1, $1, 'other')",
    ),
    Table(
        "webhook_endpoints",
        "tenant_id",
        "INSERT INTO tenantry.webhook_endpoints (tenant_id, url, secret)"
        " VALUES ($1, 'https://example.com/other', '\\x01')",
    ),
    Table(
        "webhook_deliveries",
        "tenant_id",
        # The seeded delivery's event is 1 and its endpoint the tenant's id.
        "INSERT INTO tenantry.webhook_deliveries (tenant_id, endpoint_id, event_id,"
        " event_type, body) VALUES ($1, $1, 2, 'thing.made', '{}')",
        deletable=False,
    ),
    Table(
        "webhook_attempts",
        "tenant_id",
        "INSERT INTO tenantry.webhook_attempts (tenant_id, delivery_id, endpoint_id, attempt,"
        " attempted_at, url, result, request_headers, request_body, duration_ms)"
        " VALUES ($1, $1, $1, 2, now(), 'u', 'delivered', '{}', '', 1)",
        insertable=False,
        updatable=False,
        deletable=False,
    ),
]
TABLE_IDS = [t.name for t in TABLES]


@pytest.fixture
async def seeded(admin_pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    await seed(admin_pool, A, uuid.uuid4(), uuid.uuid4())
    await seed(admin_pool, B, B_USER, B_WORKSPACE)
    yield admin_pool


async def test_every_tenant_table_has_forced_rls_and_the_restrictive_policy(
    admin_pool: asyncpg.Pool,
) -> None:
    """The matrix below covers every table with a tenant column; nothing is missed."""
    rows = await admin_pool.fetch(
        """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
               (SELECT count(*) FROM pg_policy p
                 WHERE p.polrelid = c.oid AND NOT p.polpermissive AND p.polcmd = '*'
                   AND pg_get_expr(p.polqual, p.polrelid) LIKE '%current_setting(''app.tenant_id''%'
                   AND pg_get_expr(p.polwithcheck, p.polrelid)
                       LIKE '%current_setting(''app.tenant_id''%') AS restrictive
          FROM pg_class c
         WHERE c.relnamespace = 'tenantry'::regnamespace AND c.relkind = 'r'
           AND (EXISTS (SELECT 1 FROM pg_attribute a
                         WHERE a.attrelid = c.oid AND a.attname = 'tenant_id')
                OR c.relname = 'tenants')
           -- Keyed by the idempotency key, not the tenant (tested on its own below).
           AND c.relname <> 'idempotency_keys'
        """
    )
    assert sorted(r["relname"] for r in rows) == sorted(TABLE_IDS)
    for r in rows:
        assert r["relrowsecurity"] and r["relforcerowsecurity"], r["relname"]
        assert r["restrictive"] == 1, r["relname"]


async def test_no_view_or_materialized_view_runs_with_its_owners_rights(
    admin_pool: asyncpg.Pool,
) -> None:
    rows = await admin_pool.fetch(
        "SELECT c.relname, c.relkind::text AS kind, c.reloptions FROM pg_class c"
        " WHERE c.relnamespace = 'tenantry'::regnamespace AND c.relkind IN ('v', 'm')"
    )
    assert rows, "the schema has a view to check"
    for r in rows:
        assert r["kind"] == "v", f"{r['relname']}: a materialized view has no row security"
        assert "security_invoker=true" in (r["reloptions"] or []), r["relname"]


@pytest.mark.parametrize("table", TABLES, ids=TABLE_IDS)
async def test_select_sees_only_the_own_tenant(
    seeded: asyncpg.Pool, pool: asyncpg.Pool, table: Table
) -> None:
    async with tenant_tx(pool, A) as tx:
        seen = await tx.fetch(f"SELECT {table.column} AS t FROM tenantry.{table.name}")
        aimed = await tx.fetchval(
            f"SELECT count(*) FROM tenantry.{table.name} WHERE {table.column} = $1", B
        )
    assert {r["t"] for r in seen} == {A}
    assert aimed == 0


@pytest.fixture
def context_mode() -> Iterator[Callable[[str], None]]:
    """Switch the process's tenant-context mode for one test, then back."""
    yield tenancy.use_tenant_context
    tenancy.use_tenant_context(TEST_TENANT_CONTEXT)


@pytest.mark.parametrize(
    ("mode", "statement"),
    [
        ("set_config", "SELECT set_config('app.tenant_id', "),
        ("set_local", "SET LOCAL app.tenant_id = "),
    ],
)
async def test_each_tenant_context_mode_scopes_a_transaction_and_dies_with_it(
    seeded: asyncpg.Pool,
    pool: asyncpg.Pool,
    context_mode: Callable[[str], None],
    mode: str,
    statement: str,
) -> None:
    context_mode(mode)
    sent: list[str] = []
    async with pool.acquire() as conn:
        conn.add_query_logger(lambda record: sent.append(record.query))
        async with tenant_tx_on(conn, A) as tx:
            seen = await tx.fetch("SELECT tenant_id FROM tenantry.jobs")
            await set_transaction_setting(tx, "app.idempotency_key", "ab" * 32)
            presented = await tx.fetchval("SELECT current_setting('app.idempotency_key')")
        after = await conn.fetchval("SELECT current_setting('app.tenant_id', true)")
    assert {r["tenant_id"] for r in seen} == {A}
    assert presented == "ab" * 32
    assert after in (None, "")  # transaction-local in both modes
    assert sent[0] == f"BEGIN; {statement}" + (
        f"'{A}', true)" if mode == "set_config" else f"'{A}'"
    )


@pytest.mark.parametrize("mode", ["set_config", "set_local"])
async def test_index_plans_hold_for_the_transaction_alone_and_only_when_asked(
    seeded: asyncpg.Pool,
    pool: asyncpg.Pool,
    context_mode: Callable[[str], None],
    mode: str,
) -> None:
    """The service's own tenant transactions (tenant_scope) plan without sequential
    scans; an application's tenant_tx keeps the session's settings unless it asks."""
    context_mode(mode)

    async def read(c: Conn) -> tuple[str, str]:
        row = await c.fetchrow("SELECT current_setting('enable_seqscan'), current_setting('jit')")
        assert row is not None
        return row[0], row[1]

    async with pool.acquire() as conn:
        session = await read(conn)
        async with tenant_tx_on(conn, A, index_plans=True) as tx:
            asked = await read(tx)
            seen = await tx.fetch("SELECT tenant_id FROM tenantry.jobs")
        after = await read(conn)
        async with tenant_tx_on(conn, A) as tx:
            plain = await read(tx)
        async with tenancy.tenant_scope(conn, A) as tx:
            scoped = await read(tx)
    assert session == ("on", "on")
    assert asked == ("off", "off")
    assert {r["tenant_id"] for r in seen} == {A}
    assert after == plain == session
    assert scoped == ("off", "off")


@pytest.mark.parametrize(
    ("name", "value"),
    [("app.tenant_id", "x'; RESET ROLE; --"), ("app.tenant_id', '1", "ab"), ("search_path", "ab")],
)
async def test_only_known_settings_and_hex_values_are_inlined(
    pool: asyncpg.Pool, name: str, value: str
) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(ValueError, match="not a setting that can be inlined"):
            await set_transaction_setting(conn, name, value)


@pytest.mark.parametrize("context", [None, ""], ids=["unset", "empty"])
@pytest.mark.parametrize("table", TABLES, ids=TABLE_IDS)
async def test_no_context_sees_and_writes_nothing(
    seeded: asyncpg.Pool, pool: asyncpg.Pool, table: Table, context: str | None
) -> None:
    update = f"UPDATE tenantry.{table.name} SET {table.column} = {table.column}"
    async with pool.acquire() as conn:
        for sql, allowed, ok in (
            (f"SELECT count(*) FROM tenantry.{table.name}", True, "0"),
            (f"DELETE FROM tenantry.{table.name}", table.deletable, "DELETE 0"),
            (update, table.updatable, "UPDATE 0"),
            (table.insert, table.insertable, None),
        ):
            async with conn.transaction():
                if context is not None:
                    await conn.execute("SELECT set_config('app.tenant_id', $1, true)", context)
                args = (A,) if sql is table.insert else ()
                if ok is None or not allowed:
                    with pytest.raises(
                        asyncpg.InsufficientPrivilegeError, match=table.refusal(allowed)
                    ):
                        await conn.execute(sql, *args)
                elif sql.startswith("SELECT"):
                    assert str(await conn.fetchval(sql)) == ok
                else:
                    assert await conn.execute(sql) == ok
    assert await seeded.fetchval(f"SELECT count(*) FROM tenantry.{table.name}") == 2


@pytest.mark.parametrize("table", TABLES, ids=TABLE_IDS)
async def test_cannot_insert_update_or_delete_another_tenants_rows(
    seeded: asyncpg.Pool, pool: asyncpg.Pool, table: Table
) -> None:
    before = await seeded.fetch(f"SELECT * FROM tenantry.{table.name} WHERE {table.column} = $1", B)
    col = table.column
    aimed = (
        (table.insert, table.insertable, None),
        (f"DELETE FROM tenantry.{table.name} WHERE {col} = $1", table.deletable, "DELETE 0"),
        (
            f"UPDATE tenantry.{table.name} SET {col} = {col} WHERE {col} = $1",
            table.updatable,
            "UPDATE 0",
        ),
        # Moving an own row into B is refused too, by WITH CHECK on the new row (it is
        # checked before any unique or foreign key).
        (f"UPDATE tenantry.{table.name} SET {col} = $1", table.updatable, None),
    )
    async with pool.acquire() as conn:
        for sql, allowed, ok in aimed:
            if ok is None or not allowed:
                with pytest.raises(
                    asyncpg.InsufficientPrivilegeError, match=table.refusal(allowed)
                ):
                    async with tenant_tx_on(conn, A):
                        await conn.execute(sql, B)
            else:
                async with tenant_tx_on(conn, A):
                    assert await conn.execute(sql, B) == ok
    after = await seeded.fetch(f"SELECT * FROM tenantry.{table.name} WHERE {table.column} = $1", B)
    assert after == before


@pytest.mark.parametrize("table", TABLES, ids=TABLE_IDS)
async def test_copy_out_shows_only_the_own_tenant_and_copy_in_is_refused(
    seeded: asyncpg.Pool, pool: asyncpg.Pool, table: Table
) -> None:
    async with pool.acquire() as conn:
        async with tenant_tx_on(conn, A):
            out = io.BytesIO()
            await conn.copy_from_table(
                table.name, schema_name="tenantry", columns=[table.column], output=out
            )
        assert out.getvalue().decode().split() == [str(A)]
        refused = (
            asyncpg.FeatureNotSupportedError
            if table.insertable
            else asyncpg.InsufficientPrivilegeError
        )
        with pytest.raises(refused, match=table.refusal(table.insertable)):
            async with tenant_tx_on(conn, A):
                await conn.copy_to_table(
                    table.name,
                    schema_name="tenantry",
                    columns=[table.column],
                    source=io.BytesIO(f"{B}\n".encode()),
                )


async def test_unique_keys_do_not_reveal_another_tenants_values(
    seeded: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """B holds this email, workspace slug, key hash and dedup key: A can use them all,
    so no unique violation tells A that they exist."""
    for table in ("memberships", "users", "workspaces", "api_keys", "jobs"):
        await seeded.execute(f"DELETE FROM tenantry.{table} WHERE tenant_id = $1", A)
    async with tenant_tx(pool, A) as tx:
        await tx.execute(
            "INSERT INTO tenantry.users (tenant_id, id, email) VALUES ($1, $2, $3)",
            A,
            uuid.uuid4(),
            SHARED_EMAIL.upper(),
        )
        await tx.execute(
            "INSERT INTO tenantry.workspaces (tenant_id, id, slug, name) VALUES ($1, $2, $3, 'x')",
            A,
            uuid.uuid4(),
            SHARED_SLUG,
        )
        await tx.execute(
            "INSERT INTO tenantry.api_keys (tenant_id, secret_hash) VALUES ($1, $2)",
            A,
            SHARED_HASH,
        )
    b_job = await seeded.fetchval("SELECT id FROM tenantry.jobs WHERE tenant_id = $1", B)
    a_job = await jobs.enqueue(pool, tenant_id=A, kind="k", dedup_key="same-key")
    assert a_job != b_job  # a new job, not B's live one
    # The keys do work within a tenant (on the normalised email, too).
    with pytest.raises(asyncpg.UniqueViolationError):
        async with tenant_tx(pool, A) as tx:
            await tx.execute(
                "INSERT INTO tenantry.users (tenant_id, id, email) VALUES ($1, $2, $3)",
                A,
                uuid.uuid4(),
                SHARED_EMAIL,
            )


async def test_foreign_keys_do_not_reveal_another_tenants_rows(
    seeded: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Pointing at B's workspace fails exactly as pointing at no workspace does."""

    async def membership_error(workspace: uuid.UUID) -> str:
        a_user = await seeded.fetchval("SELECT id FROM tenantry.users WHERE tenant_id = $1", A)
        with pytest.raises(asyncpg.ForeignKeyViolationError) as err:
            async with tenant_tx(pool, A) as tx:
                await tx.execute(
                    "INSERT INTO tenantry.memberships (tenant_id, workspace_id, user_id, role)"
                    " VALUES ($1, $2, $3, 'owner')",
                    A,
                    workspace,
                    a_user,
                )
        return str(err.value.detail).replace(str(workspace), "<id>")

    missing = uuid.uuid4()
    assert await membership_error(B_WORKSPACE) == await membership_error(missing)


async def test_sql_enqueue_is_bound_to_the_context(
    seeded: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as conn:
        for context in (A, None):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                async with conn.transaction():
                    if context is not None:
                        await conn.execute(
                            "SELECT set_config('app.tenant_id', $1, true)", str(context)
                        )
                    await conn.execute("SELECT tenantry.enqueue($1, 'k')", B)
        async with tenant_tx_on(conn, A):
            assert await conn.fetchval("SELECT tenantry.enqueue($1, 'k')", A) is not None
    assert await seeded.fetchval("SELECT count(*) FROM tenantry.jobs WHERE tenant_id = $1", B) == 1


# --- the service's login -----------------------------------------------------------


async def test_service_login_cannot_escape_row_level_security(
    seeded: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as conn:
        for role in ("tenantry_owner", "tenantry_system", "postgres"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(f"SET ROLE {role}")
        for ddl in (
            "ALTER TABLE tenantry.users DISABLE ROW LEVEL SECURITY",
            "ALTER TABLE tenantry.users NO FORCE ROW LEVEL SECURITY",
            "DROP POLICY tenant_isolation ON tenantry.users",
            "CREATE POLICY open ON tenantry.users USING (true)",
            "ALTER TABLE tenantry.users OWNER TO tenantry_app",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(ddl)
        # row_security = off does not bypass: the query fails instead.
        await conn.execute("SET row_security = off")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await conn.fetch("SELECT * FROM tenantry.users")
        await conn.execute("RESET row_security")
        # Cross-tenant functions of our own are the only way across, and the service
        # cannot define one: it may not create anything in the schema.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "CREATE FUNCTION tenantry.peek() RETURNS int LANGUAGE sql AS 'SELECT 1'"
            )
        await roles.check_login(conn, "DATABASE_URL", roles.SERVICE_ROLES)  # it agrees


async def test_reset_all_and_commit_end_the_context(
    seeded: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as conn:
        async with tenant_tx_on(conn, A):
            assert await conn.fetchval("SELECT count(*) FROM tenantry.users") == 1
            await conn.execute("RESET ALL")
            assert await conn.fetchval("SELECT count(*) FROM tenantry.users") == 0
        async with tenant_tx_on(conn, A):
            assert await conn.fetchval("SELECT count(*) FROM tenantry.users") == 1
        # The next transaction on the same connection has no tenant.
        assert await conn.fetchval("SELECT current_setting('app.tenant_id', true)") in ("", None)
        assert await conn.fetchval("SELECT count(*) FROM tenantry.users") == 0


async def test_pooled_connections_never_carry_a_context_over(
    admin_pool: asyncpg.Pool, app_url: str
) -> None:
    """Many tenants interleaved on a two-connection pool: every transaction sees its
    own tenant's rows only, and a context-less use right after sees none."""
    tenants = [uuid.uuid4() for _ in range(12)]
    for t in tenants:
        await seed(admin_pool, t, uuid.uuid4(), uuid.uuid4())
    # No reset on release: the context must end with its transaction on its own.
    small = await asyncpg.create_pool(app_url, min_size=2, max_size=2, reset=_no_reset)
    assert small is not None
    mixed: list[str] = []

    async def use(t: uuid.UUID, i: int) -> None:
        async with tenant_tx(small, t) as tx:
            seen = {r["tenant_id"] for r in await tx.fetch("SELECT tenant_id FROM tenantry.users")}
            if seen != {t}:
                mixed.append(f"{t}: saw {seen}")
            await anyio.lowlevel.checkpoint()  # let the others interleave inside the transaction
            if i % 3 == 0:
                raise RuntimeError("rolled back")
        bare = await small.fetchval("SELECT count(*) FROM tenantry.users")
        if bare:
            mixed.append(f"after {t}: a context-less query saw {bare} rows")

    async def run(t: uuid.UUID, i: int) -> None:
        with contextlib.suppress(RuntimeError):
            await use(t, i)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(240):
                tg.start_soon(run, tenants[i % len(tenants)], i)
    finally:
        await small.close()
    assert mixed == []


async def _no_reset(_conn: object) -> None:
    pass


async def test_a_handler_sees_only_its_jobs_tenant(
    worker_pool: asyncpg.Pool, seeded: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    reg = Registry()
    seen: dict[str, object] = {}

    @reg.handler("k")  # the seeded jobs
    async def noop(_job: Job) -> None:
        pass

    @reg.handler("peek")
    async def peek(job: Job) -> None:
        async with job.tenant_tx() as tx:
            seen["own"] = await tx.fetchval("SELECT count(*) FROM tenantry.users")
            seen["other"] = await tx.fetchval(
                "SELECT count(*) FROM tenantry.users WHERE tenant_id = $1", B
            )
            seen["all_tenants"] = await tx.fetch("SELECT DISTINCT tenant_id FROM tenantry.users")
            seen["update_other"] = await tx.execute(
                "UPDATE tenantry.users SET display_name = 'pwned' WHERE tenant_id = $1", B
            )

    await jobs.enqueue(pool, tenant_id=A, kind="peek")
    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_for(lambda: "update_other" in seen)
    assert seen["own"] == 1
    assert seen["other"] == 0
    assert [r["tenant_id"] for r in seen["all_tenants"]] == [A]  # type: ignore[attr-defined]
    assert seen["update_other"] == "UPDATE 0"
    assert (
        await seeded.fetchval("SELECT display_name FROM tenantry.users WHERE tenant_id = $1", B)
        == ""
    )


# --- the startup check ---------------------------------------------------------------


async def test_startup_check_refuses_unsafe_logins(
    admin_pool: asyncpg.Pool, database_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    # The two logins as migrated pass, each for its own purpose only.
    async with pool.acquire() as conn:
        await roles.check_login(conn, "DATABASE_URL", roles.SERVICE_ROLES)
        with pytest.raises(InsecureRole):
            await roles.check_login(conn, "TENANTRY_WORKER_URL", ())
    async with worker_pool.acquire() as conn:
        await roles.check_login(conn, "TENANTRY_WORKER_URL", roles.WORKER_ROLES)
        with pytest.raises(InsecureRole, match="can SET ROLE to tenantry_operator"):
            await roles.check_login(conn, "DATABASE_URL", roles.SERVICE_ROLES)
    async with admin_pool.acquire() as conn:
        with pytest.raises(InsecureRole, match="is a superuser"):
            await roles.check_login(conn, "DATABASE_URL", roles.SERVICE_ROLES)
    # A superuser that switches to the service role when it connects is still one.
    sneaky = await asyncpg.connect(database_url, server_settings={"role": roles.DEFAULT_LOGIN})
    try:
        assert await sneaky.fetchval("SELECT current_user") == roles.DEFAULT_LOGIN
        with pytest.raises(InsecureRole, match="switches to role") as err:
            await roles.check_login(sneaky, "DATABASE_URL", roles.SERVICE_ROLES)
        assert "is a superuser" in str(err.value)
    finally:
        await sneaky.close()

    suffix = uuid.uuid4().hex[:8]
    cases = {
        f"t_bypass_{suffix}": ("LOGIN BYPASSRLS", None, "has BYPASSRLS"),
        f"t_createrole_{suffix}": ("LOGIN CREATEROLE", None, "has CREATEROLE"),
        f"t_owner_{suffix}": ("LOGIN", "tenantry_owner", "owns the tenantry schema"),
        f"t_system_{suffix}": ("LOGIN", "tenantry_system", "can SET ROLE to tenantry_system"),
        f"t_worker_{suffix}": ("LOGIN", "tenantry_worker", "can SET ROLE to tenantry_worker"),
        f"t_files_{suffix}": (
            "LOGIN",
            "pg_write_server_files",
            "can SET ROLE to pg_write_server_files",
        ),
    }
    try:
        for name, (options, extra, _) in cases.items():
            await admin_pool.execute(f"CREATE ROLE {name} {options}")
            await admin_pool.execute(f"GRANT tenantry_service TO {name}")
            if extra:
                await admin_pool.execute(f"GRANT {extra} TO {name}")
        for name, (_, _, reason) in cases.items():
            login = await asyncpg.connect(roles.with_login(database_url, name))
            try:
                with pytest.raises(InsecureRole, match=reason):
                    await roles.check_login(login, "DATABASE_URL", roles.SERVICE_ROLES)
            finally:
                await login.close()
    finally:
        for name in cases:
            await admin_pool.execute(f"DROP ROLE IF EXISTS {name}")


async def test_tenant_code_cannot_call_the_cross_tenant_functions(
    seeded: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """The login handlers and HTTP requests run on has no EXECUTE on any of them, so
    no bug in tenant code can claim, complete, inspect or prune another tenant's jobs."""
    functions = await seeded.fetch(
        "SELECT p.oid::regprocedure::text AS sig, p.pronargs FROM pg_proc p"
        " WHERE p.pronamespace = 'tenantry'::regnamespace"
        " AND (p.prosecdef OR p.proowner = 'tenantry_system'::regrole)"
    )
    assert len(functions) >= 10
    async with pool.acquire() as conn:
        for f in functions:
            assert not await conn.fetchval(
                "SELECT has_function_privilege($1, 'EXECUTE')", f["sig"]
            ), f["sig"]
        async with tenant_tx_on(conn, A):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(
                    "SELECT * FROM tenantry.dead_jobs_page(NULL, NULL, NULL, NULL, NULL, 10)"
                )
        # Nor can it forge a dead job (only the worker's bury writes them).
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with tenant_tx_on(conn, A):
                await conn.execute(
                    "INSERT INTO tenantry.dead_jobs (tenant_id, id, queue, kind, payload,"
                    " priority, attempts, errors, reason, created_at)"
                    " VALUES ($1, 99, 'default', 'k', '{}', 0, 1, '[]', 'permanent', now())",
                    A,
                )
        # Nor choose a job's id (operators address dead jobs by id): not plainly...
        with pytest.raises(asyncpg.GeneratedAlwaysError):
            async with tenant_tx_on(conn, A):
                await conn.execute(
                    "INSERT INTO tenantry.jobs (tenant_id, id, kind) VALUES ($1, 7, 'k')", A
                )
        # ...nor by overriding the identity (regression: that needed only INSERT, and
        # another tenant's job id made `tenantry dead retry` fail with "more than one
        # row"), nor any column an enqueue does not set.
        for column, value in (("id", "7"), ("state", "'running'"), ("attempts", "9")):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with tenant_tx_on(conn, A):
                    await conn.execute(
                        f"INSERT INTO tenantry.jobs (tenant_id, {column}, kind)"
                        f" OVERRIDING SYSTEM VALUE VALUES ($1, {value}, 'k')",
                        A,
                    )


async def test_migrating_as_a_createrole_admin_that_is_not_a_superuser(
    admin_pool: asyncpg.Pool, server_url: str
) -> None:
    """The managed-Postgres path: the admin can create roles but is no superuser.
    (The roles exist already in this cluster, as if the admin had created them: it
    holds them WITH ADMIN OPTION, as PostgreSQL 16+ gives a role's creator.)"""
    suffix = uuid.uuid4().hex[:8]
    admin_name, dbname = f"t_admin_{suffix}", f"t_managed_{suffix}"
    login = roles.Login(f"t_app_{suffix}", "pw")
    grant_roles = ", ".join(
        ("tenantry_owner", "tenantry_system", *roles.SERVICE_ROLES, *roles.WORKER_ROLES)
    )
    bootstrap = await asyncpg.connect(server_url)
    try:
        await bootstrap.execute(f"CREATE ROLE {admin_name} LOGIN CREATEROLE")
        await bootstrap.execute(f"GRANT {grant_roles} TO {admin_name} WITH ADMIN OPTION")
        await bootstrap.execute(f"CREATE DATABASE {dbname} OWNER {admin_name}")
        url = roles.with_login(with_database(server_url, dbname), admin_name)
        conn = await db.connect(url)
        try:
            await migrate.migrate(conn)
            await roles.ensure_login(conn, login, roles.SERVICE_ROLES)
            assert (await migrate.status(conn)).current
            owners = await conn.fetch(
                "SELECT DISTINCT pg_get_userbyid(relowner) AS o FROM pg_class"
                " WHERE relnamespace = 'tenantry'::regnamespace AND relkind IN ('r', 'v')"
            )
            assert [r["o"] for r in owners] == ["tenantry_owner"]
        finally:
            await conn.close()
        app = await asyncpg.connect(roles.with_login(with_database(server_url, dbname), login.user))
        try:
            await roles.check_login(app, "DATABASE_URL", roles.SERVICE_ROLES)
        finally:
            await app.close()
    finally:
        await bootstrap.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        for name in (login.user, admin_name):
            await bootstrap.execute(f"DROP OWNED BY {name} CASCADE")
            await bootstrap.execute(f"DROP ROLE IF EXISTS {name}")
        await bootstrap.close()


# --- EXPLAIN: the tenant predicate is an index condition ---------------------------

WEBHOOKS_FILE = "service/tenantry/webhooks/queries.sql"

# Every tenant-scoped statement the package issues, with arguments to plan it with.
TENANT_STATEMENTS: dict[tuple[str, str], tuple[object, ...]] = {
    ("service/tenantry/tenants/queries.sql", "create_tenant"): (A, "a-new", "A", "free", "active"),
    ("service/tenantry/tenants/queries.sql", "get_tenant"): (A,),
    ("service/tenantry/tenants/queries.sql", "create_key"): (A, "k", b"\x02" * 32),
    ("service/tenantry/tenants/queries.sql", "find_key"): (A, b"\x02" * 32),
    ("service/tenantry/tenants/queries.sql", "list_keys"): (A,),
    ("service/tenantry/tenants/queries.sql", "revoke_key"): (A, 1),
    ("service/tenantry/tenants/queries.sql", "delete_tenant"): (A,),
    ("service/tenantry/jobs/queries.sql", "complete_one"): (A, 1, "probe"),
    ("service/tenantry/onboarding/queries.sql", "get"): (A, A),
    ("service/tenantry/onboarding/queries.sql", "steps"): (A, A),
    ("service/tenantry/onboarding/queries.sql", "lock"): (A, A),
    ("service/tenantry/onboarding/queries.sql", "transition"): (A, A, 1, "provisioning", None),
    ("service/tenantry/outbox/queries.sql", "events_after"): (A, "onboarding", str(A), 0, 100),
    (WEBHOOKS_FILE, "count_endpoints"): (A,),
    (WEBHOOKS_FILE, "lock_tenant_endpoints"): (A,),
    (WEBHOOKS_FILE, "insert_endpoint"): (A, A, "https://x.test/", "", [], {}, None, None, None,
                                         b"\x01"),
    (WEBHOOKS_FILE, "list_endpoints"): (A, 10),
    (WEBHOOKS_FILE, "get_endpoint"): (A, A),
    (WEBHOOKS_FILE, "endpoint_history"): (A, str(A), 50),
    (WEBHOOKS_FILE, "lock_endpoint"): (A, A),
    (WEBHOOKS_FILE, "update_endpoint"): (A, A, "https://x.test/", "", [], {}, None, None, None,
                                         True, "r"),
    (WEBHOOKS_FILE, "rotate_secret"): (A, A, b"\x01", 10.0),
    (WEBHOOKS_FILE, "delete_endpoint"): (A, A),
    (WEBHOOKS_FILE, "cancel_endpoint_deliveries"): (A, A),
    (WEBHOOKS_FILE, "insert_test_delivery"): (A, A, 1),
    (WEBHOOKS_FILE, "list_deliveries"): (A, datetime(9999, 1, 1, tzinfo=UTC), A, None, None,
                                         None, None, 10),
    (WEBHOOKS_FILE, "get_delivery"): (A, A),
    (WEBHOOKS_FILE, "delivery_attempts"): (A, A),
    (WEBHOOKS_FILE, "replay_delivery"): (A, A),
    (WEBHOOKS_FILE, "recover_deliveries"): (A, A, datetime(2000, 1, 1, tzinfo=UTC), None),
}  # fmt: skip

# The webhooks file's statements that are not a tenant's: the worker's cross-tenant
# functions, and the wake-up.
WEBHOOKS_CROSS_TENANT = {"wake_deliverers", "fan_out", "fanout_lag", "claim", "record",
                         "record_and_claim", "rescue",
                         "prune", "ops_deliveries", "ops_delivery", "ops_act", "ops_endpoints",
                         "ops_stats"}  # fmt: skip


# Statements of that file that are not tenant-scoped: the operator's, through a
# SECURITY DEFINER function of their own.
CROSS_TENANT_STATEMENTS = {"list_tenants"}


def _queries(path: str) -> dict[str, str]:
    q = load(ROOT / path)
    return {n: q[n] for n in q.names()}


async def test_every_tenant_statement_uses_the_tenant_as_an_index_condition(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    tenant_file = "service/tenantry/tenants/queries.sql"
    listed = {n for f, n in TENANT_STATEMENTS if f == tenant_file} | CROSS_TENANT_STATEMENTS
    assert listed == set(_queries(tenant_file)), (
        "a tenant statement was added or removed: list it in TENANT_STATEMENTS"
    )
    webhook_listed = {n for f, n in TENANT_STATEMENTS if f == WEBHOOKS_FILE}
    assert webhook_listed | WEBHOOKS_CROSS_TENANT == set(_queries(WEBHOOKS_FILE)), (
        "a webhooks statement was added or removed: list it in TENANT_STATEMENTS"
    )
    # Enough rows across many tenants that a scan of everything would be the cheap
    # plan if the tenant predicate could not be used.
    many = [uuid.uuid4() for _ in range(2000)]
    await admin_pool.execute(
        "INSERT INTO tenantry.tenants (id, slug, name)"
        " SELECT t, 's' || replace(t::text, '-', ''), 'x' FROM unnest($1::uuid[]) t",
        [A, *many],
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.api_keys (tenant_id, secret_hash)"
        " SELECT t, sha256((t::text || g)::bytea)"
        " FROM unnest($1::uuid[]) t, generate_series(1, 2) g",
        many,
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind) SELECT t, 'k'"
        " FROM unnest($1::uuid[]) t, generate_series(1, 2)",
        many,
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.onboardings (tenant_id, id, email, tenant_name, plan)"
        " SELECT t, t, 'o@example.com', 'Name', 'free' FROM unnest($1::uuid[]) t",
        many,
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.onboarding_steps (tenant_id, onboarding_id, step)"
        " SELECT t, t, s FROM unnest($1::uuid[]) t, unnest(ARRAY['tenant', 'owner']) s",
        many,
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.outbox (tenant_id, aggregate_type, aggregate_id, version,"
        " event_type) SELECT t, 'onboarding', t::text, v, 'x'"
        " FROM unnest($1::uuid[]) t, generate_series(1, 3) v",
        many,
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.webhook_endpoints (tenant_id, id, url, secret)"
        " SELECT t, t, 'https://example.com/h', '\\x01' FROM unnest($1::uuid[]) t",
        many,
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.webhook_deliveries (tenant_id, endpoint_id, event_id,"
        " event_type, body) SELECT t, t, g, 'x', '{}'"
        " FROM unnest($1::uuid[]) t, generate_series(1, 3) g",
        many,
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.webhook_attempts (tenant_id, delivery_id, endpoint_id, attempt,"
        " attempted_at, url, result, request_headers, request_body, duration_ms)"
        " SELECT d.tenant_id, d.id, d.endpoint_id, 1, now(), 'u', 'failed', '{}', '', 1"
        " FROM tenantry.webhook_deliveries d"
    )
    await admin_pool.execute("ANALYZE")
    for (path, name), args in TENANT_STATEMENTS.items():
        sql = _queries(path)[name]
        async with pool.acquire() as conn:
            with pytest.raises(_Rollback):
                async with tenant_tx_on(conn, A):
                    plan = "\n".join(
                        r[0] for r in await conn.fetch("EXPLAIN (COSTS OFF) " + sql, *args)
                    )
                    raise _Rollback
        _assert_tenant_index_conditions(name, plan)
    # Statements that call a function: the plans of the statements inside it, as they
    # run (auto_explain's nested statements, sent as notices), under the service's role.
    t = many[0]  # has a tenant, an onboarding (id = tenant id) with events 1-3, jobs
    await admin_pool.execute("UPDATE tenantry.onboardings SET version = 3 WHERE id = $1", t)
    await admin_pool.execute(
        "DELETE FROM tenantry.onboarding_steps WHERE onboarding_id = $1 AND step = 'owner'", t
    )
    for (path, name), args in _function_statements(t).items():
        plans = await _nested_plans(admin_pool, t, _queries(path)[name], args)
        assert any("Index Cond:" in plan for plan in plans), f"{name}: {plans}"
        for plan in plans:
            _assert_tenant_index_conditions(name, plan)


def _function_statements(t: uuid.UUID) -> dict[tuple[str, str], tuple[object, ...]]:
    steps = ["tenant", "owner", "roles", "workspace", "storage", "welcome_email", "provisioned"]
    return {
        ("service/tenantry/onboarding/queries.sql", "run_steps"): (
            t, t, ["owner", "roles", "workspace", "storage", "welcome_email", "provisioned"],
            steps, ["x"], uuid.uuid4(), ["owner"], ["a,b"], uuid.uuid4(), "r", None, None,
            {"queue": "default", "payload": {}},
        ),
        ("service/tenantry/jobs/queries.sql", "complete_one"): (t, 1, "probe"),
    }  # fmt: skip


async def _nested_plans(
    admin_pool: asyncpg.Pool, tenant: uuid.UUID, sql: str, args: tuple[object, ...]
) -> list[str]:
    """The plans of every statement `sql` runs (those inside the functions it calls
    included), run in `tenant`'s context as the service's login and rolled back."""
    notices: list[str] = []

    def heard(_conn: object, msg: asyncpg.PostgresLogMessage) -> None:
        notices.append(str(msg.message))

    async with admin_pool.acquire() as conn:
        conn.add_log_listener(heard)
        try:
            await conn.execute(
                "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;"
                " SET auto_explain.log_nested_statements = on;"
                " SET auto_explain.log_level = notice; SET client_min_messages = notice;"
                f' SET ROLE "{roles.DEFAULT_LOGIN}"'
            )
            with pytest.raises(_Rollback):
                async with tenant_tx_on(conn, tenant):
                    await conn.fetch(sql, *args)
                    raise _Rollback
        finally:
            await conn.execute("RESET ROLE; RESET ALL")
            conn.remove_log_listener(heard)
    # Each notice: "duration: ... plan:\nQuery Text: ...\n<the plan>".  Not checked: the
    # outer statement (a function scan), and PostgreSQL's own foreign key checks
    # (`SELECT 1 FROM ONLY ...`, planned on their own: a scan of a tiny table).
    return [
        n.split("\n", 2)[2]
        for n in notices
        if n.startswith("duration:")
        and "tenantry.onboarding_run_steps(" not in n
        and "tenantry.complete_job($1" not in n
        and "SELECT 1 FROM ONLY" not in n
    ]


def _assert_tenant_index_conditions(name: str, plan: str) -> None:
    assert "Seq Scan" not in plan, f"{name}:\n{plan}"
    for line in plan.splitlines():
        if "Filter:" in line:
            assert "tenant_id" not in line and "(id = " not in line, f"{name}:\n{plan}"
    scans = [line for line in plan.splitlines() if "Index" in line and "Scan" in line]
    conds = [line for line in plan.splitlines() if "Index Cond:" in line]
    assert len(conds) == len(scans), f"{name}:\n{plan}"
    for cond in conds:
        assert "tenant_id =" in cond or "(id =" in cond, f"{name}:\n{plan}"


class _Rollback(Exception):
    pass


async def test_migrate_creates_the_login_once_with_a_hashed_password(
    admin_pool: asyncpg.Pool, app_url: str
) -> None:
    name = f"tenantry_t_login_{uuid.uuid4().hex[:8]}"
    try:
        async with admin_pool.acquire() as conn:
            login = roles.Login(name, "s3cret-pw")
            assert await roles.ensure_login(conn, login, roles.SERVICE_ROLES)
            assert not await roles.ensure_login(conn, login, roles.SERVICE_ROLES)
        row = await admin_pool.fetchrow(
            "SELECT rolcanlogin, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolpassword,"
            " pg_has_role(oid, 'tenantry_service', 'MEMBER') AS service"
            " FROM pg_authid WHERE rolname = $1",
            name,
        )
        assert row is not None
        assert row["rolcanlogin"] and row["service"]
        assert not (row["rolsuper"] or row["rolbypassrls"] or row["rolcreaterole"])
        assert not row["rolcreatedb"]
        assert row["rolpassword"].startswith("SCRAM-SHA-256$4096:")
        assert "s3cret" not in row["rolpassword"]
    finally:
        await admin_pool.execute(f"DROP ROLE IF EXISTS {name}")


async def test_joining_a_transaction_of_another_tenant_is_an_error(
    seeded: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as conn:
        for context in (B, None):
            with pytest.raises(TenantContextError, match="open it with tenant_tx"):
                async with conn.transaction():
                    if context is not None:
                        await conn.execute(
                            "SELECT set_config('app.tenant_id', $1, true)", str(context)
                        )
                    await jobs.enqueue(conn, tenant_id=A, kind="k")
        with pytest.raises(TenantContextError, match="open it with tenant_tx"):
            async with tenant_tx_on(conn, B):
                await jobs.enqueue(conn, tenant_id=A, kind="k")
        async with tenant_tx_on(conn, A):
            assert await jobs.enqueue(conn, tenant_id=A, kind="k") > 0
    assert await seeded.fetchval("SELECT count(*) FROM tenantry.jobs WHERE tenant_id = $1", A) == 2


async def test_an_idempotency_key_row_is_visible_only_to_who_presents_the_key(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Requests come before their tenant exists, so the key's row is not a tenant's:
    the policy shows it to a transaction that presents the key, and to no other."""
    mine, other = hashlib.sha256(b"mine").digest(), hashlib.sha256(b"other").digest()
    for key in (mine, other):
        await admin_pool.execute(
            "INSERT INTO tenantry.idempotency_keys (key_hash, request_hash, tenant_id,"
            " onboarding_id) VALUES ($1, $1, $2, $2)",
            key,
            A,
        )
    async with pool.acquire() as conn:
        for presented, visible in ((None, []), ("", []), (mine.hex(), [mine])):
            async with conn.transaction():
                if presented is not None:
                    await conn.execute(
                        "SELECT set_config('app.idempotency_key', $1, true)", presented
                    )
                rows = await conn.fetch("SELECT key_hash FROM tenantry.idempotency_keys")
                assert [r[0] for r in rows] == visible
        # Nor can a transaction write a row for a key it does not present.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.idempotency_key', $1, true)", mine.hex())
                await conn.execute(
                    "INSERT INTO tenantry.idempotency_keys (key_hash, request_hash, tenant_id,"
                    " onboarding_id) VALUES ($1, $1, $2, $2)",
                    hashlib.sha256(b"third").digest(),
                    A,
                )
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            async with conn.transaction():
                await conn.execute("DELETE FROM tenantry.idempotency_keys")
