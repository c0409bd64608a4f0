"""The real `tenantry run` process: signals, kill -9, HTTP probes, schema checks."""

from __future__ import annotations

import itertools
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import aiohttp
import asyncpg

from tenantry import roles
from tenantry.jobs import queue as jobs
from tenantry.tenancy import SYSTEM_TENANT
from tests.acceptance.process import ServiceProcess
from tests.helpers import TENANT_A, eventually, one, wait_lock_waiter


async def test_sigterm_lets_a_running_job_finish_then_exits_zero(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool, database_url: str
) -> None:
    svc = await ServiceProcess.start(database_url, TENANTRY_SHUTDOWN_GRACE="20")
    try:
        await svc.started()
        job_id = await jobs.enqueue(
            pool, tenant_id=TENANT_A, kind="sleep", payload={"seconds": 0.5}
        )
        await svc.wait_log("job_started", lambda x: x["job_id"] == job_id)
        svc.signal(signal.SIGTERM)
        assert await svc.wait_exit() == 0
    finally:
        await svc.kill()
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0
    assert await admin_pool.fetchval("SELECT sum(succeeded) FROM tenantry.job_counters") == 1
    # Soft stop: no claims after the signal.
    assert svc.find("job_succeeded")


async def test_sigterm_after_grace_releases_the_job_for_a_prompt_retry(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool, database_url: str
) -> None:
    svc = await ServiceProcess.start(database_url, TENANTRY_SHUTDOWN_GRACE="0.3")
    try:
        await svc.started()
        job_id = await jobs.enqueue(
            pool, tenant_id=TENANT_A, kind="sleep", payload={"seconds": 600}
        )
        await svc.wait_log("job_started", lambda x: x["job_id"] == job_id)
        svc.signal(signal.SIGTERM)
        assert await svc.wait_exit() == 0
    finally:
        await svc.kill()
    row = await one(
        admin_pool,
        "SELECT state, attempts, lease_owner, run_at <= now() AS due"
        " FROM tenantry.jobs WHERE id = $1",
        job_id,
    )
    assert dict(row) == {"state": "queued", "attempts": 0, "lease_owner": None, "due": True}


async def test_second_signal_stops_at_once(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool, database_url: str
) -> None:
    svc = await ServiceProcess.start(database_url, TENANTRY_SHUTDOWN_GRACE="600")
    try:
        await svc.started()
        job_id = await jobs.enqueue(
            pool, tenant_id=TENANT_A, kind="sleep", payload={"seconds": 600}
        )
        await svc.wait_log("job_started", lambda x: x["job_id"] == job_id)
        svc.signal(signal.SIGTERM)
        await svc.wait_log("worker_stopping")
        svc.signal(signal.SIGINT)
        assert await svc.wait_exit(timeout=10) == 0
    finally:
        await svc.kill()
    assert svc.find("hard_stop")
    state = await admin_pool.fetchval("SELECT state FROM tenantry.jobs WHERE id = $1", job_id)
    assert state == "queued"


async def test_killed_worker_job_is_rescued_by_another_process(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool, database_url: str
) -> None:
    fast_lease = {"TENANTRY_LEASE_SECONDS": "1", "TENANTRY_MAINTENANCE_INTERVAL": "0.2"}
    first = await ServiceProcess.start(database_url, **fast_lease)
    try:
        await first.started()
        job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="block_first_attempt")
        await first.wait_log("job_started", lambda x: x["job_id"] == job_id)
    finally:
        await first.kill()  # SIGKILL: no cleanup, no lease release
    assert first.proc.returncode == -signal.SIGKILL
    second = await ServiceProcess.start(database_url, **fast_lease)
    try:
        await second.started()
        await second.wait_log("job_rescued", lambda x: x["job_id"] == job_id)
        await second.wait_log(
            "job_succeeded", lambda x: x["job_id"] == job_id and x["attempt"] == 2
        )
        second.signal(signal.SIGTERM)
        assert await second.wait_exit() == 0
    finally:
        await second.kill()
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0


async def test_health_and_readiness_over_http(database_url: str) -> None:
    svc = await ServiceProcess.start(database_url)
    try:
        port = await svc.started()
        # The listener connects in the background (a database not there yet must not
        # hold up the start): ready once it has.
        await svc.wait_log("listener_connected")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                body = await r.json()
                assert r.status == 200, body
                assert body["checks"] == {
                    "running": True,
                    "database": True,
                    "listener": True,
                    "migrations": True,
                }
                assert body["problems"] == {}
        svc.signal(signal.SIGTERM)
        assert await svc.wait_exit() == 0
    finally:
        await svc.kill()
    # Operators parse stdout: every line of it is a JSON log record.
    assert not svc.find("<non-json>"), svc.raw


async def test_refuses_to_serve_a_schema_newer_than_its_code(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool, database_url: str
) -> None:
    await admin_pool.execute(
        "INSERT INTO tenantry.schema_migrations (version, name, checksum)"
        " VALUES (9999, 'future', 'x')"
    )
    svc = await ServiceProcess.start(database_url)
    try:
        code = await svc.wait_exit()
    finally:
        await svc.kill()
    assert code == 1
    assert any("ahead" in line for line in svc.raw), svc.raw


async def test_port_in_use_is_a_clear_error(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        svc = await ServiceProcess.start(database_url, TENANTRY_PORT=str(port))
        try:
            code = await svc.wait_exit()
        finally:
            await svc.kill()
    assert code == 1
    assert any(f"cannot listen on 127.0.0.1:{port}" in line for line in svc.raw), svc.raw
    assert not any("Traceback" in line for line in svc.raw), svc.raw


async def test_refuses_to_run_as_a_login_that_bypasses_row_level_security(
    database_url: str,
) -> None:
    """The deployment mistake of one superuser URL for everything: the service
    refuses to start, says why and how to fix it, and leaks no password."""
    # With a password in the URL (trust auth ignores it): it must not be echoed.
    with_password = roles.with_login(database_url, roles.login_of(database_url).user, "hunter2")
    svc = await ServiceProcess.start(database_url, DATABASE_URL=with_password)
    try:
        code = await svc.wait_exit()
    finally:
        await svc.kill()
    assert code == 1
    message = next(line for line in svc.raw if line.startswith("tenantry: error:"))
    assert "is a superuser" in message
    assert "TENANTRY_ADMIN_URL" in message and "NOBYPASSRLS" in message
    assert not any("Traceback" in line for line in svc.raw), svc.raw
    assert not any("hunter2" in line for line in svc.raw), svc.raw


async def test_a_periodic_job_runs_every_period(
    admin_pool: asyncpg.Pool, database_url: str
) -> None:
    """Regression: periodic jobs went to the system tenant (the nil UUID), which the
    claim never reached; they piled up one per period and never ran (the test only
    checked that they were enqueued).  Here the handler itself records each run."""
    await admin_pool.execute(
        "CREATE TABLE public.ticks (tenant_id uuid, period text UNIQUE);"
        " GRANT INSERT ON public.ticks TO tenantry_service"
    )
    svc = await ServiceProcess.start(
        database_url, TENANTRY_HANDLERS="tests.acceptance.periodic_handlers:registry"
    )
    try:
        await svc.started()
        await eventually(_at_least(admin_pool, "SELECT count(*) FROM public.ticks", 3), 15)
        svc.signal(signal.SIGTERM)
        assert await svc.wait_exit() == 0
    finally:
        await svc.kill()
    ticks = await admin_pool.fetch("SELECT tenant_id, period FROM public.ticks ORDER BY period")
    assert {r["tenant_id"] for r in ticks} == {SYSTEM_TENANT}
    periods = [datetime.fromisoformat(r["period"]) for r in ticks]
    assert all((b - a).total_seconds() == 1 for a, b in itertools.pairwise(periods))
    # Nothing piles up: every period enqueued ran (at most the last is still in flight).
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") <= 1


def _at_least(pool: asyncpg.Pool, sql: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        got: int = await pool.fetchval(sql)
        return got >= n

    return check


async def _blocked_claim(
    database_url: str, admin: asyncpg.Connection, **env: str
) -> ServiceProcess:
    """A service whose claims are stuck behind a lock on the jobs table (what a
    migration or VACUUM FULL holds), started before the lock was taken."""
    svc = await ServiceProcess.start(database_url, **env)
    await svc.started()
    await admin.execute("BEGIN; LOCK TABLE tenantry.jobs IN ACCESS EXCLUSIVE MODE")
    await wait_lock_waiter(admin, roles.DEFAULT_LOGIN + roles.WORKER_SUFFIX)
    return svc


async def test_sigterm_stops_within_the_grace_while_a_claim_is_blocked(
    database_url: str,
) -> None:
    """Regression: with a claim blocked in the database the process was still alive
    10 s after SIGTERM (and 10 s after a second one)."""
    admin = await asyncpg.connect(database_url)
    try:
        svc = await _blocked_claim(database_url, admin, TENANTRY_SHUTDOWN_GRACE="1")
        try:
            started = time.monotonic()
            svc.signal(signal.SIGTERM)
            assert await svc.wait_exit(timeout=15) == 0
            # The grace, the moment an in-flight claim may take to finish (2 s), the
            # pools' close: well inside the lock's hold, which is forever here.
            assert time.monotonic() - started < 8, svc.raw[-10:]
        finally:
            await svc.kill()
    finally:
        await admin.close()


async def test_a_second_signal_stops_at_once_whatever_the_database_does(
    database_url: str,
) -> None:
    admin = await asyncpg.connect(database_url)
    try:
        svc = await _blocked_claim(database_url, admin, TENANTRY_SHUTDOWN_GRACE="600")
        try:
            svc.signal(signal.SIGTERM)
            await svc.wait_log("stopping")
            started = time.monotonic()
            svc.signal(signal.SIGTERM)
            assert await svc.wait_exit(timeout=15) == 0
            assert time.monotonic() - started < 6, svc.raw[-10:]
            assert svc.find("hard_stop")
        finally:
            await svc.kill()
    finally:
        await admin.close()


async def test_sigterm_is_heard_while_the_listener_cannot_connect(database_url: str) -> None:
    """Regression: the start waited for the listener's first connection, and SIGTERM
    went unheard meanwhile.  The listener now connects in the background; readiness
    says it is not connected."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # bound, never listening: refused
        svc = await ServiceProcess.start(
            database_url,
            TENANTRY_LISTEN_URL=f"postgresql://{roles.DEFAULT_LOGIN}@127.0.0.1:{closed_port}/x",
        )
        try:
            port = await svc.started()
            await svc.wait_log("listener_lost")
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/readyz") as r,
            ):
                assert r.status == 503
                assert (await r.json())["checks"]["listener"] is False
            started = time.monotonic()
            svc.signal(signal.SIGTERM)
            assert await svc.wait_exit(timeout=10) == 0
            assert time.monotonic() - started < 5
        finally:
            await svc.kill()


async def test_readyz_answers_503_as_soon_as_a_stop_begins(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Regression: /readyz stayed 200 through the shutdown grace, so load balancers
    went on sending new streams to a draining process."""
    svc = await ServiceProcess.start(database_url, TENANTRY_SHUTDOWN_GRACE="30")
    try:
        port = await svc.started()
        job_id = await jobs.enqueue(
            pool, tenant_id=TENANT_A, kind="sleep", payload={"seconds": 600}
        )
        await svc.wait_log("job_started", lambda x: x["job_id"] == job_id)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 200
            svc.signal(signal.SIGTERM)
            await svc.wait_log("worker_stopping")
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                body = await r.json()
                assert r.status == 503 and body["checks"]["running"] is False, body
        svc.signal(signal.SIGTERM)  # no need to wait out the grace
        assert await svc.wait_exit() == 0
    finally:
        await svc.kill()


async def test_a_worker_only_process_runs_jobs_and_answers_only_probes_and_metrics(
    database_url: str, pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """`tenantry run --no-http`: the jobs run; the port answers /healthz, /readyz and
    /metrics (what Kubernetes and Prometheus ask a worker pod), and nothing public."""
    svc = await ServiceProcess.start(
        database_url, "--no-http", TENANTRY_HANDLERS="tests.acceptance.handlers:registry"
    )
    try:
        port = await svc.started()
        await svc.wait_log("listener_connected")
        job_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="sleep", payload={})

        async def ran() -> bool:
            left: int = await admin_pool.fetchval(
                "SELECT count(*) FROM tenantry.jobs WHERE id = $1", job_id
            )
            return left == 0

        await eventually(ran)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/readyz", "/metrics"):
                async with http.get(base + path) as r:
                    assert r.status == 200, path
            for path in ("/", "/ops", "/openapi.json", "/v1/tenant"):
                async with http.get(base + path) as r:
                    assert r.status == 404, path
            async with http.post(f"{base}/v1/onboardings", json={}) as r:
                assert r.status in (404, 405)
        svc.signal(signal.SIGTERM)
        assert await svc.wait_exit() == 0
    finally:
        await svc.kill()
