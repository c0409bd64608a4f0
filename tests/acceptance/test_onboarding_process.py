"""The real `tenantry` process: provisioning survives kill -9 in the middle of every
step, several processes serve one database, and SIGTERM ends open streams at once."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg
import pytest

from tenantry import roles
from tenantry.onboarding.model import STEPS
from tenantry.onboarding.provision import STEP_GROUPS
from tests.acceptance.process import ServiceProcess
from tests.helpers import (
    TEST_TOKEN_SECRET,
    Frame,
    sse_frames,
    wait_lock_waiter,
    wait_no_lock_waiter,
)

SIGN_UP = {"email": "kim@example.com", "tenant_name": "Crash Test Dummies", "plan": "pro"}


def env(data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "TENANTRY_DATA_DIR": str(data_dir),
        "TENANTRY_TOKEN_SECRET": TEST_TOKEN_SECRET,
        "TENANTRY_LEASE_SECONDS": "1",
        "TENANTRY_MAINTENANCE_INTERVAL": "0.2",
        "TENANTRY_LOG_LEVEL": "info",
        "TENANTRY_SHUTDOWN_GRACE": "2",
        **extra,
    }


async def post(port: int, body: dict[str, Any] = SIGN_UP) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/v1/onboardings", json=body) as r,
    ):
        assert r.status == 202, await r.text()
        answer: dict[str, Any] = await r.json()
        return answer


async def follow_to_end(port: int, answer: dict[str, Any], timeout: float = 30) -> list[Frame]:
    with anyio.fail_after(timeout):
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}{answer['events_url']}") as r,
        ):
            assert r.status == 200
            return [f async for f in sse_frames(r) if f.event]


async def wait_blocked(admin: asyncpg.Connection, proc: ServiceProcess) -> None:
    """Until the service's step transaction waits on the row this test holds."""
    waiting = asyncio.create_task(wait_lock_waiter(admin, roles.DEFAULT_LOGIN))
    died = asyncio.create_task(proc.proc.wait())
    done, _ = await asyncio.wait({waiting, died}, return_when=asyncio.FIRST_COMPLETED)
    died.cancel()
    if waiting not in done:
        waiting.cancel()
        raise AssertionError("the service died:\n" + "\n".join(proc.raw[-20:]))
    waiting.result()


@pytest.mark.timeout(180)
async def test_kill_9_in_the_middle_of_every_step_leaves_exactly_one_of_everything(
    database_url: str, tmp_path: Path
) -> None:
    # Accepted by a process that does not provision (it claims no jobs).
    first = await ServiceProcess.start(database_url, **env(tmp_path, TENANTRY_WORKER="false"))
    try:
        answer = await post(await first.started())
    finally:
        first.signal(signal.SIGTERM)
        assert await first.wait_exit() == 0
    tid, oid = uuid.UUID(answer["tenant_id"]), uuid.UUID(answer["id"])
    admin = await asyncpg.connect(database_url)
    try:
        for step in STEPS:
            # Hold the ledger row of `step`, uncommitted: the step does its work, then
            # waits to record itself.  Killed right there, its transaction never commits.
            tx = admin.transaction()
            await tx.start()
            await admin.execute(
                "INSERT INTO tenantry.onboarding_steps (tenant_id, onboarding_id, step)"
                " VALUES ($1, $2, $3)",
                tid,
                oid,
                step,
            )
            proc = await ServiceProcess.start(database_url, **env(tmp_path))
            try:
                await proc.started()
                await wait_blocked(admin, proc)
            finally:
                await proc.kill()  # SIGKILL
            # The killed process's statement, blocked on the held row, is cancelled once
            # its backend finds the client gone (client_connection_check_interval), not
            # left to commit when the row is let go.
            await wait_no_lock_waiter(admin, roles.DEFAULT_LOGIN)
            await tx.rollback()
            done = await admin.fetchval(
                "SELECT count(*) FROM tenantry.onboarding_steps WHERE onboarding_id = $1", oid
            )
            # The steps of a group commit together: a crash in one leaves none of them.
            group = next(g for g in STEP_GROUPS if step in g)
            assert done == STEPS.index(group[0]), f"crashed in {step}: {done} steps recorded"
        # A last process: the job's lease expired with its killer, rescue hands it on.
        last = await ServiceProcess.start(database_url, **env(tmp_path))
        try:
            frames = await follow_to_end(await last.started(), answer)
        finally:
            last.signal(signal.SIGTERM)
            assert await last.wait_exit() == 0
        assert frames[-1].event == "onboarding.completed"
        versions = await admin.fetch(
            "SELECT version, event_type FROM tenantry.outbox"
            " WHERE aggregate_type = 'onboarding' AND aggregate_id = $1 ORDER BY version",
            str(oid),
        )
        assert [r["version"] for r in versions] == list(range(1, len(STEPS) + 2))
        counts = await admin.fetchrow(
            """
            SELECT (SELECT count(*) FROM tenantry.tenants) AS tenants,
                   (SELECT count(*) FROM tenantry.users) AS users,
                   (SELECT count(*) FROM tenantry.roles) AS roles,
                   (SELECT count(*) FROM tenantry.workspaces) AS workspaces,
                   (SELECT count(*) FROM tenantry.memberships) AS memberships,
                   (SELECT count(*) FROM tenantry.onboarding_steps) AS steps,
                   (SELECT count(*) FROM tenantry.outbox
                     WHERE event_type = 'tenant.provisioned') AS provisioned,
                   (SELECT count(*) FROM tenantry.jobs) AS live_jobs,
                   (SELECT count(*) FROM tenantry.dead_jobs) AS dead_jobs,
                   (SELECT state FROM tenantry.tenants WHERE id = $1) AS tenant_state
            """,
            tid,
        )
    finally:
        await admin.close()
    assert counts is not None
    assert dict(counts) == {
        "tenants": 1,
        "users": 1,
        "roles": 3,
        "workspaces": 1,
        "memberships": 1,
        "steps": len(STEPS),
        "provisioned": 1,
        "live_jobs": 0,
        "dead_jobs": 0,
        "tenant_state": "active",
    }
    assert [p.name for p in (tmp_path / "tenants").iterdir()] == [str(tid)]
    assert len(list((tmp_path / "mail").glob("*.eml"))) == 1


@pytest.mark.timeout(120)
async def test_a_stream_on_one_process_follows_work_done_by_another(
    database_url: str, tmp_path: Path
) -> None:
    """Behind a load balancer: the sign-up and its stream on process A, which does not
    provision; process B, started after the stream is open, does the work.  Every event
    reaches A's stream live, through the database."""
    a = await ServiceProcess.start(database_url, **env(tmp_path / "a", TENANTRY_WORKER="false"))
    b: ServiceProcess | None = None
    try:
        port_a = await a.started()
        answer = await post(port_a)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port_a}{answer['events_url']}") as r,
        ):
            frames = sse_frames(r).__aiter__()
            assert (await anext(frames)).retry is not None
            assert (await anext(frames)).event == "onboarding.accepted"
            b = await ServiceProcess.start(database_url, **env(tmp_path / "b"))
            await b.started()
            with anyio.fail_after(30):
                live = [f async for f in frames if f.event]
        assert [f.id for f in live] == [str(v) for v in range(2, len(STEPS) + 2)]
        assert live[-1].event == "onboarding.completed"
        # B logs the steps once each, in order, one line per commit of a group of them
        # (the last line written after its commit, which the stream may show first).
        await b.wait_log("onboarding_steps_done", lambda x: x["steps"][-1] == STEPS[-1])
        said = [step for line in b.find("onboarding_steps_done") for step in line["steps"]]
        assert said == list(STEPS) and not a.find("onboarding_steps_done")
    finally:
        for p in (a, b):
            if p is not None:
                p.signal(signal.SIGTERM)
                assert await p.wait_exit() == 0


@pytest.mark.timeout(60)
async def test_sigterm_ends_open_streams_at_once_and_exits(
    database_url: str, tmp_path: Path
) -> None:
    proc = await ServiceProcess.start(database_url, **env(tmp_path, TENANTRY_WORKER="false"))
    try:
        port = await proc.started()
        answer = await post(port)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}{answer['events_url']}") as r,
        ):
            frames = sse_frames(r).__aiter__()
            first = await anext(frames)  # the retry hint
            assert first.retry is not None
            assert (await anext(frames)).event == "onboarding.accepted"
            proc.signal(signal.SIGTERM)
            with anyio.fail_after(5):
                rest = [f async for f in frames]
        assert [f for f in rest if f.event] == []
        assert await proc.wait_exit(timeout=10) == 0
    finally:
        await proc.kill()


@pytest.mark.timeout(120)
async def test_a_worker_killed_on_the_last_attempt_still_ends_the_onboarding(
    database_url: str, tmp_path: Path
) -> None:
    """Regression: a last attempt whose worker died (or that timed out) buried the job
    without the failure path: the onboarding stayed unfinished forever, and its stream
    never ended.  The job's dead-letter hook now fails it, with compensation."""
    first = await ServiceProcess.start(database_url, **env(tmp_path, TENANTRY_WORKER="false"))
    try:
        answer = await post(await first.started())
    finally:
        first.signal(signal.SIGTERM)
        assert await first.wait_exit() == 0
    tid, oid = uuid.UUID(answer["tenant_id"]), uuid.UUID(answer["id"])
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("UPDATE tenantry.jobs SET max_attempts = 1")
        tx = admin.transaction()
        await tx.start()
        await admin.execute(
            "SELECT 1 FROM tenantry.onboardings WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
            tid,
            oid,
        )
        doomed = await ServiceProcess.start(database_url, **env(tmp_path))
        try:
            await doomed.started()
            await wait_blocked(admin, doomed)  # its one and only attempt is under way
        finally:
            await doomed.kill()  # SIGKILL
        # Its blocked statement is cancelled once its backend finds the client gone.
        await wait_no_lock_waiter(admin, roles.DEFAULT_LOGIN)
        await tx.rollback()
        last = await ServiceProcess.start(database_url, **env(tmp_path))
        try:
            frames = await follow_to_end(await last.started(), answer)
            await last.wait_log("onboarding_compensated")
        finally:
            last.signal(signal.SIGTERM)
            assert await last.wait_exit() == 0
        state = await admin.fetchrow(
            "SELECT state, failure_reason FROM tenantry.onboardings WHERE id = $1", oid
        )
        dead = await admin.fetchrow("SELECT kind, reason FROM tenantry.dead_jobs")
        live = await admin.fetchval("SELECT count(*) FROM tenantry.jobs")
    finally:
        await admin.close()
    assert [f.event for f in frames] == ["onboarding.accepted", "onboarding.failed"]
    assert state is not None and state["state"] == "failed"
    assert state["failure_reason"].startswith("gave up after 1 attempts (exhausted)")
    assert "the last one's worker stopped" in state["failure_reason"]
    assert dead is not None and tuple(dead) == ("onboarding.provision", "exhausted")
    assert live == 0
