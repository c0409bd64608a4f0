"""The real process while the database misbehaves: every backend of its logins
terminated, again and again, then the server restarted, while jobs, sign-ups and
streams flow.  At the end: every job's effects happened exactly once, every stream
reached its end, no request was answered 500, and the process is alive and ready.

The server here is an embedded PostgreSQL of this test's own (restarting the suite's
would disturb every other test)."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import anyio
import asyncpg
import pytest

from tenantry import db, roles
from tenantry.embedded import EmbeddedPostgres
from tests.acceptance.cluster import restart, stop_restarted
from tests.acceptance.process import ServiceProcess
from tests.acceptance.workload import ACCEPTANCE_LOG, TERMINAL, Browser, Producer, all_ran_once
from tests.helpers import TENANT_A, TENANT_B, TEST_TOKEN_SECRET, eventually

LOGINS = [roles.DEFAULT_LOGIN, roles.DEFAULT_LOGIN + roles.WORKER_SUFFIX]


async def terminate_backends(url: str) -> int:
    admin = await asyncpg.connect(url)
    try:
        killed: int = await admin.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
            " FROM pg_stat_activity WHERE usename = ANY($1::text[])",
            LOGINS,
        )
        return killed
    finally:
        await admin.close()


@pytest.mark.timeout(240)
async def test_the_service_rides_out_terminated_backends_and_a_restart(
    memory_tmp_path: Path,
) -> None:
    cluster = EmbeddedPostgres(memory_tmp_path / "pg", ephemeral=True)
    url = await anyio.to_thread.run_sync(cluster.start)
    proc: ServiceProcess | None = None
    pool: asyncpg.Pool | None = None
    try:
        proc = await ServiceProcess.start(
            url,
            TENANTRY_DATA_DIR=str(memory_tmp_path / "data"),
            TENANTRY_TOKEN_SECRET=TEST_TOKEN_SECRET,
            TENANTRY_LOG_LEVEL="info",
            TENANTRY_SIGNUP_RATE="1000",
            TENANTRY_SIGNUP_BURST="1000",
            TENANTRY_MAINTENANCE_INTERVAL="0.5",
        )
        port = await proc.started()
        admin = await asyncpg.connect(url)
        try:
            await admin.execute(ACCEPTANCE_LOG)
        finally:
            await admin.close()
        pool = await db.create_pool(roles.with_login(url, roles.DEFAULT_LOGIN), max_size=4)
        base = f"http://127.0.0.1:{port}"
        browser = Browser(lambda: [base])
        producer = Producer(pool, [TENANT_A, TENANT_B])
        streams: list[list[str]] = []

        async def onboard(n: int) -> None:
            answer = await browser.sign_up(n)
            streams.append(await browser.follow(answer))

        async def disturb() -> None:
            await anyio.sleep(0.5)
            for _ in range(5):
                assert await terminate_backends(url) > 0
                await anyio.sleep(1.0)
            await anyio.to_thread.run_sync(restart, cluster, "fast")
            await anyio.sleep(1.0)
            await terminate_backends(url)

        with anyio.fail_after(150):
            async with anyio.create_task_group() as tg:
                tg.start_soon(producer.run, 300, 0.03)
                tg.start_soon(disturb)
                for n in range(20):
                    tg.start_soon(onboard, n)
                    await anyio.sleep(0.4)

        admin = await asyncpg.connect(url)
        try:
            try:
                await eventually(lambda: all_ran_once(admin, set(range(producer.count))), 60)
                await eventually(lambda: _empty(admin), 60)
            except TimeoutError:
                raise AssertionError(await _diagnose(admin, producer.count, proc)) from None
            dead = await admin.fetchval("SELECT count(*) FROM tenantry.dead_jobs")
            states = await admin.fetch(
                "SELECT state, count(*) FROM tenantry.onboardings GROUP BY 1"
            )
        finally:
            await admin.close()
        assert dead == 0
        assert {r["state"]: r["count"] for r in states} == {"completed": 20}
        assert len(streams) == 20
        assert all(s and s[-1] in TERMINAL for s in streams), streams
        assert all(s[-1] == "onboarding.completed" for s in streams)
        assert browser.statuses[500] == 0, browser.statuses
        assert proc.proc.returncode is None, proc.raw[-20:]
        await eventually(lambda: _ready(base), 30)
        assert not proc.find("<non-json>"), [x for x in proc.lines if x["event"] == "<non-json>"]
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(timeout=30) == 0
    finally:
        if pool is not None:
            pool.terminate()
        if proc is not None:
            await proc.kill()
        await anyio.to_thread.run_sync(stop_restarted, cluster)


async def _empty(admin: asyncpg.Connection) -> bool:
    left: int = await admin.fetchval("SELECT count(*) FROM tenantry.jobs")
    return left == 0


async def _ready(base: str) -> bool:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/readyz") as r:
        return r.status == 200


async def _diagnose(admin: asyncpg.Connection, count: int, proc: ServiceProcess) -> str:
    """What is left behind, for a failure's message."""
    ran = {r["n"] for r in await admin.fetch("SELECT DISTINCT n FROM public.acceptance_log")}
    jobs = await admin.fetch(
        "SELECT id, kind, state::text, attempts, lease_owner, lease_expires_at, run_at,"
        " last_error FROM tenantry.jobs ORDER BY id LIMIT 20"
    )
    dead = await admin.fetch("SELECT id, kind, reason, last_error FROM tenantry.dead_jobs LIMIT 10")
    missing = sorted(set(range(count)) - ran)
    warnings = [x for x in proc.lines if x.get("level") in ("warning", "error")][-15:]
    return (
        f"{len(missing)} of {count} jobs never ran: {missing[:20]}\n"
        f"live: {[dict(j) for j in jobs]}\ndead: {[dict(d) for d in dead]}\n"
        f"last warnings: {warnings}"
    )
