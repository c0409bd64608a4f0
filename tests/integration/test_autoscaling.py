"""The autoscaler's query (deploy/kubernetes/base/worker-autoscaling.yaml) against a real
database, as the metrics login `tenantry migrate` creates from TENANTRY_METRICS_URL:
the value it reads for jobs in every state, a paused queue, webhooks and several
tenants, its cap, and everything that login is refused."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import yaml

from tenantry import db, roles
from tests.acceptance.process import run_cli

ROOT = Path(__file__).resolve().parents[2]
AUTOSCALING = ROOT / "deploy" / "kubernetes" / "base" / "worker-autoscaling.yaml"

A = uuid.UUID("aaaaaaaa-1111-4111-8111-00000000000a")
B = uuid.UUID("bbbbbbbb-2222-4222-8222-00000000000b")
C = uuid.UUID("cccccccc-3333-4333-8333-00000000000c")


def scaler_query() -> str:
    """The query KEDA runs, exactly as the manifest has it."""
    docs = [d for d in yaml.safe_load_all(AUTOSCALING.read_text()) if d]
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    (trigger,) = scaled["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    assert isinstance(query, str)
    return query


@pytest.fixture
async def metrics_url(database_url: str) -> AsyncIterator[str]:
    """A metrics login made by `tenantry migrate`, as the Kubernetes Job makes it."""
    name = f"t_metrics_{uuid.uuid4().hex[:8]}"
    url = roles.with_login(database_url, name, "metrics-pw")
    try:
        code, out, err = await run_cli(
            "migrate", database_url=database_url, env={"TENANTRY_METRICS_URL": url}
        )
        assert code == 0, out + err
        assert "metrics-pw" not in out + err
        yield url
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f"DROP ROLE IF EXISTS {name}")
        finally:
            await admin.close()


@pytest.fixture
async def metrics(metrics_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await db.connect(metrics_url)
    try:
        yield conn
    finally:
        await conn.close()


async def add_jobs(
    admin: asyncpg.Pool, tenant: uuid.UUID, queue: str, state: str, n: int, *, run_at: str = "now()"
) -> None:
    """Rows as they stand in the table, written past the triggers
    (session_replication_role): a scheduled row whose time has passed is one that fell
    due since it was written, which no insert can make directly."""
    lease = (
        "'w1', now() + interval '1 hour', now(), 1" if state == "running" else "NULL, NULL, NULL, 0"
    )
    async with admin.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "INSERT INTO tenantry.jobs (tenant_id, queue, kind, state, run_at, lease_owner,"
            " lease_expires_at, started_at, attempts)"
            f" SELECT $1, $2, 'k', $3::tenantry.job_state, {run_at}, {lease}"
            " FROM generate_series(1, $4)",
            tenant,
            queue,
            state,
            n,
        )


async def add_deliveries(
    admin: asyncpg.Pool,
    tenant: uuid.UUID,
    endpoint: uuid.UUID,
    state: str,
    n: int,
    *,
    due: str = "now()",
) -> None:
    lease = "now() + interval '1 minute', 'w1'" if state == "sending" else "NULL, NULL"
    await admin.execute(
        "INSERT INTO tenantry.webhook_deliveries (tenant_id, endpoint_id, event_id, event_type,"
        " body, state, next_attempt_at, lease_until, lease_owner)"
        f" SELECT $1, $2, g, 'e', '{{}}', $3, {due}, {lease} FROM generate_series(1, $4) g"
        " ON CONFLICT DO NOTHING",
        tenant,
        endpoint,
        state,
        n,
    )


async def test_the_scaler_query_counts_the_work_waiting_for_workers(
    admin_pool: asyncpg.Pool, metrics: asyncpg.Connection
) -> None:
    query = scaler_query()
    assert query == "SELECT tenantry.worker_demand('default')"
    # Nothing waits: the value is 0, at the activation threshold, so the workers may
    # scale to zero.
    assert await metrics.fetchval(query) == 0

    hour = "now() + interval '1 hour'"
    minute_ago = "now() - interval '1 minute'"
    await add_jobs(admin_pool, A, "default", "queued", 3)
    await add_jobs(admin_pool, B, "default", "queued", 2)
    await add_jobs(admin_pool, A, "default", "scheduled", 4, run_at=hour)  # not due: no
    await add_jobs(admin_pool, B, "default", "scheduled", 2, run_at=minute_ago)  # due
    await add_jobs(admin_pool, C, "default", "running", 1)
    await add_jobs(admin_pool, C, "email", "queued", 6)  # a queue the workers do not work
    assert await metrics.fetchval(query) == 3 + 2 + 2 + 1

    # Several queues; a name twice counts once.
    both = "SELECT tenantry.worker_demand('default', 'email', 'default')"
    assert await metrics.fetchval(both) == 8 + 6

    # A paused queue: its waiting jobs ask for no worker, its running ones still do.
    await admin_pool.execute(
        "INSERT INTO tenantry.queue_controls (queue, paused, updated_by)"
        " VALUES ('default', true, 'test')"
    )
    assert await metrics.fetchval(query) == 1
    assert await metrics.fetchval(both) == 1 + 6
    await admin_pool.execute("UPDATE tenantry.queue_controls SET paused = false")
    assert await metrics.fetchval(query) == 8

    # Webhook work (only workers fan out and deliver): the outbox's events not yet
    # fanned out, deliveries due or being sent; not a retry due later, nor a finished one.
    e1, e2, e3 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await add_deliveries(admin_pool, A, e1, "pending", 2)
    await add_deliveries(admin_pool, B, e2, "pending", 1)
    await add_deliveries(admin_pool, B, e3, "pending", 3, due=hour)
    await add_deliveries(admin_pool, C, e3, "sending", 1)
    await add_deliveries(admin_pool, C, e1, "delivered", 4)
    assert await metrics.fetchval(query) == 8 + 2 + 1 + 1
    await admin_pool.execute(
        "INSERT INTO tenantry.outbox (tenant_id, aggregate_type, aggregate_id, version,"
        " event_type) SELECT $1, 'thing', 'x', g, 'thing.happened'"
        " FROM generate_series(1, 2) g",
        A,
    )
    assert await metrics.fetchval(query) == 8 + 4 + 2


async def test_the_count_is_capped(admin_pool: asyncpg.Pool, metrics: asyncpg.Connection) -> None:
    """A backlog of any size costs one bounded read, and reads as 10,000."""
    await add_jobs(admin_pool, A, "default", "queued", 6_000)
    await add_jobs(admin_pool, B, "default", "scheduled", 6_000, run_at="now() - interval '1 s'")
    await add_jobs(admin_pool, C, "default", "running", 50)
    assert await metrics.fetchval(scaler_query()) == 10_000


async def test_bad_queue_lists_are_refused(metrics: asyncpg.Connection) -> None:
    for call in (
        "SELECT tenantry.worker_demand(VARIADIC ARRAY[]::text[])",
        "SELECT tenantry.worker_demand(VARIADIC NULL::text[])",
        "SELECT tenantry.worker_demand('default', NULL)",
        "SELECT tenantry.worker_demand(VARIADIC array_fill('q'::text, ARRAY[101]))",
    ):
        with pytest.raises(asyncpg.InvalidParameterValueError, match="1 to 100 queue names"):
            await metrics.fetchval(call)


async def test_the_metrics_login_can_do_nothing_else(
    admin_pool: asyncpg.Pool,
    metrics: asyncpg.Connection,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
) -> None:
    await add_jobs(admin_pool, A, "default", "queued", 1)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await metrics.fetch("SELECT * FROM tenantry.jobs")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await metrics.fetch("SELECT * FROM tenantry.queue_depth(ARRAY['default'], 10, 10)")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await metrics.execute(
            "INSERT INTO tenantry.queue_controls (queue, paused, updated_by)"
            " VALUES ('default', true, 'metrics')"
        )
    # No table, view or sequence of the schema; no function but the one.
    readable = await metrics.fetch(
        "SELECT c.oid::regclass::text AS name FROM pg_catalog.pg_class c"
        " WHERE c.relnamespace = 'tenantry'::regnamespace"
        " AND c.relkind IN ('r', 'v', 'm', 'S', 'p')"
        " AND (has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')"
        "      OR (c.relkind = 'S' AND has_sequence_privilege(c.oid, 'USAGE, SELECT')))"
    )
    assert [r["name"] for r in readable] == []
    # The one function that reads with more rights than the caller's.  (A few helpers
    # that read nothing, run with the caller's rights, and so as this login, read no
    # table either: webhook_matches, webhook_body, dead_job_matches.)
    definers = await metrics.fetch(
        "SELECT p.oid::regprocedure::text AS sig FROM pg_catalog.pg_proc p"
        " WHERE p.pronamespace = 'tenantry'::regnamespace AND p.prosecdef"
        " AND has_function_privilege(p.oid, 'EXECUTE')"
    )
    assert [r["sig"] for r in definers] == ["tenantry.worker_demand(text[])"]
    # It passes the logins' startup check for its own role, and nothing more.
    await roles.check_login(metrics, "TENANTRY_METRICS_URL", roles.METRICS_ROLES)
    # The service's and the worker's logins cannot read the demand (nor would they be
    # accepted as the metrics login: below).
    for other in (pool, worker_pool):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await other.fetchval(scaler_query())


async def test_migrate_refuses_a_metrics_login_that_could_do_more(
    database_url: str, worker_url: str, app_url: str
) -> None:
    """TENANTRY_METRICS_URL pointing at the worker's or the admin's login: `tenantry
    migrate` fails (exit 1) and says why, as the service's startup check would."""
    for url, reason in (
        (worker_url, "can SET ROLE to tenantry_operator, tenantry_worker"),
        (app_url, "can SET ROLE to tenantry_service"),
        (database_url, "is a superuser"),
    ):
        code, out, err = await run_cli(
            "migrate", database_url=database_url, env={"TENANTRY_METRICS_URL": url}
        )
        assert code == 1, out + err
        assert "TENANTRY_METRICS_URL" in err and reason in err, err
        assert "Traceback" not in err
    # Refused before anything was granted: the logins are as they were.
    admin = await asyncpg.connect(database_url)
    try:
        for url in (worker_url, app_url):
            assert not await admin.fetchval(
                "SELECT pg_has_role($1, 'tenantry_metrics', 'MEMBER')", roles.login_of(url).user
            )
    finally:
        await admin.close()


@pytest.mark.parametrize(
    ("grant", "reason"),
    [
        ("GRANT pg_read_all_data TO {name}", "can SET ROLE to pg_read_all_data"),
        ("GRANT pg_write_all_data TO {name}", "can SET ROLE to pg_write_all_data"),
        (
            "GRANT USAGE ON SCHEMA tenantry TO {name};"
            " GRANT SELECT ON tenantry.operator_sessions TO {name}",
            "can read or write tenantry.operator_sessions",
        ),
    ],
    ids=["read_all_data", "write_all_data", "table_grant"],
)
async def test_migrate_refuses_an_existing_metrics_login_that_reaches_tables(
    database_url: str, grant: str, reason: str
) -> None:
    """A login that exists already is checked before it is granted anything: one that
    reads or writes the schema's tables past their grants (PostgreSQL's predefined
    data roles) or by a grant of its own is refused, as the service's or the worker's
    login would be."""
    name = f"t_metrics_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'metrics-pw'")
        await admin.execute(grant.format(name=name))
        url = roles.with_login(database_url, name, "metrics-pw")
        code, out, err = await run_cli(
            "migrate", database_url=database_url, env={"TENANTRY_METRICS_URL": url}
        )
        assert code == 1, out + err
        assert "TENANTRY_METRICS_URL" in err and reason in err, err
        assert not await admin.fetchval(
            "SELECT pg_has_role($1, 'tenantry_metrics', 'MEMBER')", name
        )
    finally:
        await admin.execute(f"DROP OWNED BY {name}")
        await admin.execute(f"DROP ROLE {name}")
        await admin.close()


async def test_a_metrics_login_that_cannot_log_in_is_named(database_url: str) -> None:
    """A metrics login the server turns away (here: NOLOGIN; as well a wrong password)
    is reported against TENANTRY_METRICS_URL, not against DATABASE_URL, whose login is
    fine."""
    name = f"t_metrics_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {name} NOLOGIN")
        url = roles.with_login(database_url, name, "another-pw")
        code, out, err = await run_cli(
            "migrate", database_url=database_url, env={"TENANTRY_METRICS_URL": url}
        )
        assert code == 1, out + err
        assert "TENANTRY_METRICS_URL" in err and name in err, err
        assert "not permitted to log in" in err, err
        assert roles.DEFAULT_LOGIN not in err, err
        assert "another-pw" not in err
    finally:
        await admin.execute(f"DROP ROLE {name}")
        await admin.close()


async def test_due_deliveries_count_behind_a_thousand_endpoints_waiting_to_retry(
    admin_pool: asyncpg.Pool, metrics: asyncpg.Connection
) -> None:
    """A thousand endpoints (more than the walk reads) each with a retry due in an hour
    sort before an endpoint whose delivery is due now: the workers must still be asked
    for, or that delivery waits, with the workers at zero, for the first of the retries."""
    await admin_pool.execute(
        "INSERT INTO tenantry.webhook_deliveries (tenant_id, endpoint_id, event_id,"
        " event_type, body, state, next_attempt_at)"
        " SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,"
        "        gen_random_uuid(), g, 'e', '{}', 'pending', now() + interval '1 hour'"
        " FROM generate_series(1, 1000) g"
    )
    assert await metrics.fetchval(scaler_query()) == 0  # nothing is due anywhere yet
    await add_deliveries(admin_pool, C, uuid.uuid4(), "pending", 1)
    assert await metrics.fetchval(scaler_query()) >= 1
