"""Connections that fail, and connections that must not hang: the original error of a
broken tenant transaction, keepalives, the worker's timeouts, and readiness that says
when claims fail."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from tenantry import db
from tenantry.jobs import queue as jobs
from tenantry.jobs.model import Job
from tenantry.tenancy import tenant_tx
from tests.helpers import TENANT_A, background_service, eventually, service_settings


async def test_a_broken_tenant_transaction_raises_its_own_error(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """Regression: rolling back after an error asked the connection whether it was
    closed; on a connection whose backend was terminated (the pool has let go of it)
    that raised an error of its own (`... released back to the pool`), which replaced
    the error that mattered."""

    async def gone(tx: object) -> bool:
        try:
            return bool(tx.is_closed())  # type: ignore[attr-defined]
        except asyncpg.InterfaceError:
            return True  # the pool has let go of it

    with pytest.raises(LookupError, match="the handler's own error"):
        async with tenant_tx(pool, TENANT_A) as tx:
            pid = await tx.fetchval("SELECT pg_backend_pid()")
            await admin_pool.execute("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises(db.UNAVAILABLE):
                await tx.fetchval("SELECT 1")
            await eventually(lambda: gone(tx), 5)
            raise LookupError("the handler's own error")
    # The pool goes on with a fresh connection.
    async with tenant_tx(pool, TENANT_A) as tx:
        assert await tx.fetchval("SELECT 1") == 1


async def test_the_workers_statements_never_wait_on_a_lock_for_long(worker_url: str) -> None:
    claim_pool = await db.create_claim_pool(worker_url)
    worker_pool = await db.create_pool(worker_url, settings=db.WORKER_TIMEOUTS)
    try:
        for p in (claim_pool, worker_pool):
            async with p.acquire() as conn:
                assert await conn.fetchval("SHOW lock_timeout") == "5s"
                assert await conn.fetchval("SHOW statement_timeout") == "1min"
                await conn.execute("RESET ALL")  # a pool's reset keeps them
                assert await conn.fetchval("SHOW lock_timeout") == "5s"
    finally:
        await claim_pool.close()
        await worker_pool.close()


async def test_tcp_connections_probe_a_vanished_peer(database_url: str) -> None:
    """Keepalives both ways: without them, a query in flight over a partitioned network
    waits for an answer forever."""
    if not urlsplit(database_url).hostname:
        pytest.skip("the database is on a Unix socket here (the PostgreSQL 15 run checks TCP)")
    conn = await db.connect(database_url)
    try:
        sock = conn._transport.get_extra_info("socket")  # type: ignore[attr-defined]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
        assert await conn.fetchval("SHOW tcp_keepalives_idle") == "10"
    finally:
        await conn.close()


async def test_readiness_says_when_claims_fail(
    tmp_path: Path,
    app_url: str,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:
    """Regression: /readyz answered 200 while no job could run."""
    settings = service_settings(tmp_path)
    async with (
        background_service(settings, app_url, pool, worker_pool) as svc,
        aiohttp.ClientSession(f"http://127.0.0.1:{svc.http.port}") as http,
    ):

        async def status() -> tuple[int, dict[str, object]]:
            async with http.get("/readyz") as r:
                return r.status, await r.json()

        await eventually(lambda: _is(status, 200), 10)  # the listener connects meanwhile
        await admin_pool.execute(
            "REVOKE EXECUTE ON FUNCTION tenantry.claim_jobs(text, integer, text,"
            " double precision, uuid, integer) FROM tenantry_worker"
        )
        try:
            await eventually(lambda: _is(status, 503), 10)
            _, body = await status()
            assert "claims:default" in body["problems"]  # type: ignore[operator]
        finally:
            await admin_pool.execute(
                "GRANT EXECUTE ON FUNCTION tenantry.claim_jobs(text, integer, text,"
                " double precision, uuid, integer) TO tenantry_worker"
            )
        await eventually(lambda: _is(status, 200), 10)


async def _is(status: object, code: int) -> bool:
    got, _ = await status()  # type: ignore[operator]
    return bool(got == code)


async def test_the_pool_resets_a_session_unless_told_nothing_is_left_in_it(app_url: str) -> None:
    """The pool's reset on release (a round trip) is skipped once for a borrower that
    said it left nothing in the session (the accept: one call, its own transaction);
    every other release still resets, and so does one told so inside a transaction."""
    sent: list[str] = []
    async with await db.create_pool(app_url, min_size=1, max_size=1) as one:
        async with one.acquire() as c:
            c.add_query_logger(lambda record: sent.append(record.query))
            reset_query = c.get_reset_query()
            await c.execute("SET application_name = 'left behind'")
        assert sent[-1] == reset_query
        async with one.acquire() as c:
            assert await c.fetchval("SHOW application_name") == "tenantry"
            db.leaves_no_session_state(c)
        assert sent[-1] == "SHOW application_name"
        # Once only: the next borrower is reset as usual.
        async with one.acquire() as c:
            await c.execute("SET application_name = 'left behind'")
        assert await one.fetchval("SHOW application_name") == "tenantry"
        # Told so with a transaction open: the release rolls back and resets.
        async with one.acquire() as c:
            await c.execute("BEGIN; SET application_name = 'in a transaction'")
            await c.execute("SET SESSION application_name = 'left behind'")
            db.leaves_no_session_state(c)
        assert sent[-1] == reset_query
        assert await one.fetchval("SHOW application_name") == "tenantry"


async def test_a_jobs_transactions_skip_the_reset_only_when_the_handler_says_so(
    app_url: str, admin_pool: asyncpg.Pool
) -> None:
    """`Job.tenant_tx(session_untouched=True)` and `complete_in_tx(session_untouched=
    True)` (provisioning's steps) save the pool's reset after a commit; without the
    flag, and after a rollback, the release resets as before."""
    sent: list[str] = []
    async with await db.create_pool(app_url, min_size=1, max_size=1) as one:
        async with one.acquire() as c:
            c.add_query_logger(lambda record: sent.append(record.query))
            reset_query = c.get_reset_query()
        job_id = await jobs.enqueue(one, tenant_id=TENANT_A, kind="x")
        row = await admin_pool.fetchrow(
            "UPDATE tenantry.jobs SET state = 'running', lease_owner = 'me', attempts = 1,"
            " lease_expires_at = now() + interval '1 hour' WHERE id = $1 RETURNING *",
            job_id,
        )
        assert row is not None
        job = Job(
            id=job_id, tenant_id=TENANT_A, queue=row["queue"], kind="x", payload={},
            attempt=1, max_attempts=3, priority=0, created_at=row["created_at"], _pool=one,
            _lease_owner="me",
        )  # fmt: skip
        async with job.tenant_tx() as tx:
            await tx.execute("SELECT 1")
        assert sent[-1] == reset_query
        async with job.tenant_tx(session_untouched=True) as tx:
            await tx.execute("SELECT 2")
        assert sent[-1] != reset_query
        with pytest.raises(RuntimeError):
            async with job.tenant_tx(session_untouched=True) as tx:
                await tx.execute("SELECT 3")
                raise RuntimeError("rolled back")
        assert sent[-1] == reset_query
        async with job.complete_in_tx(session_untouched=True) as tx:
            await tx.execute("SELECT 4")
        assert sent[-1] != reset_query and job.completed_in_tx
        assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0
