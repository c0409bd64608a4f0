"""A soak through two real `tenantry run` processes: a mixed workload (delayed jobs,
retries, a tenant cap, priorities, a periodic job, kinds no process knows, handlers
that raise poison errors or time out, sign-ups followed to their end), while each
process is killed with SIGKILL and started again in turn.  At the end every job
succeeded or was dead-lettered exactly once, nothing is left behind, every period of
the periodic job ran once, and every onboarding ended."""

from __future__ import annotations

import itertools
import random
import signal
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import asyncpg
import pytest

from tenantry import db, roles
from tenantry.jobs import queue as jobs
from tests.acceptance.process import ServiceProcess
from tests.acceptance.workload import (
    ACCEPTANCE_LOG,
    Browser,
    Producer,
    all_ran_once,
    assert_no_effect_twice,
)
from tests.helpers import TEST_TOKEN_SECRET, eventually

TENANTS = [uuid.uuid4() for _ in range(6)]
KINDS_THAT_DIE = {"poison": 6, "slow": 4, "future.kind": 4}


def env(data_dir: Path) -> dict[str, str]:
    return {
        "TENANTRY_HANDLERS": "tests.acceptance.soak_handlers:registry",
        "TENANTRY_DATA_DIR": str(data_dir),
        "TENANTRY_TOKEN_SECRET": TEST_TOKEN_SECRET,
        "TENANTRY_LOG_LEVEL": "info",
        "TENANTRY_LEASE_SECONDS": "1",
        "TENANTRY_MAINTENANCE_INTERVAL": "0.2",
        "TENANTRY_SHUTDOWN_GRACE": "2",
        "TENANTRY_QUEUES": "default=8",
        "TENANTRY_TENANT_CONCURRENCY": "2",
        "TENANTRY_UNKNOWN_KIND_RETRY": "2",
        "TENANTRY_SIGNUP_RATE": "1000",
        "TENANTRY_SIGNUP_BURST": "1000",
    }


@pytest.mark.timeout(240)
async def test_a_mixed_workload_through_two_processes_killed_in_turn(
    database_url: str, tmp_path: Path
) -> None:
    admin = await asyncpg.connect(database_url)
    await admin.execute(
        ACCEPTANCE_LOG + "; CREATE TABLE public.ticks (period text PRIMARY KEY);"
        " GRANT INSERT ON public.ticks TO tenantry_service"
    )
    procs: dict[str, ServiceProcess] = {}
    ports: dict[str, int] = {}
    pool = await db.create_pool(roles.with_login(database_url, roles.DEFAULT_LOGIN), max_size=4)

    async def start(name: str) -> None:
        procs[name] = await ServiceProcess.start(database_url, **env(tmp_path))
        ports[name] = await procs[name].started()

    browser = Browser(lambda: [f"http://127.0.0.1:{p}" for p in ports.values()])
    producer = Producer(pool, TENANTS)
    streams: list[list[str]] = []

    async def onboard(n: int) -> None:
        streams.append(await browser.follow(await browser.sign_up(n), timeout=120))

    async def others() -> None:
        """Delayed, prioritised, retried, poisoned, timed-out and unknown jobs."""
        now = datetime.now(UTC)
        for i in range(30):
            await jobs.enqueue(
                pool,
                tenant_id=random.choice(TENANTS),
                kind="flaky" if i % 2 else "record",
                payload={"n": 10_000 + i},
                run_at=now + timedelta(seconds=random.uniform(0, 4)) if i % 3 == 0 else None,
                priority=5 if i % 5 == 0 else 0,
            )
        for kind, count in KINDS_THAT_DIE.items():
            for _ in range(count):
                await jobs.enqueue(pool, tenant_id=random.choice(TENANTS), kind=kind)

    async def restart(name: str, after: float, how: str) -> None:
        await anyio.sleep(after)
        del ports[name]  # the load balancer stops sending it anything
        if how == "kill":
            await procs[name].kill()  # SIGKILL, whatever it was doing
        else:
            procs[name].signal(signal.SIGTERM)
            assert await procs[name].wait_exit(timeout=30) == 0
        await anyio.sleep(1.0)
        await start(name)

    try:
        await start("a")
        await start("b")
        with anyio.fail_after(150):
            async with anyio.create_task_group() as tg:
                tg.start_soon(producer.run, 300, 0.05)
                tg.start_soon(others)
                tg.start_soon(restart, "a", 3.0, "kill")
                tg.start_soon(restart, "b", 7.0, "kill")
                tg.start_soon(restart, "a", 11.0, "kill")
                tg.start_soon(restart, "b", 14.0, "term")
                for n in range(16):
                    tg.start_soon(onboard, n)
                    await anyio.sleep(0.8)
        count = producer.count
        numbers = set(range(count)) | {10_000 + i for i in range(30)}
        await eventually(lambda: all_ran_once(admin, numbers), 60)
        await eventually(lambda: _only_dead_left(admin), 60)
        await anyio.sleep(2.2)  # two more periods of the periodic job
        for name in ("a", "b"):
            procs[name].signal(signal.SIGTERM)
        for name in ("a", "b"):
            assert await procs[name].wait_exit(timeout=30) == 0
        await assert_no_effect_twice(admin)
        dead = await admin.fetch("SELECT kind, count(*) AS n FROM tenantry.dead_jobs GROUP BY 1")
        assert {r["kind"]: r["n"] for r in dead} == KINDS_THAT_DIE
        reasons = await admin.fetch("SELECT DISTINCT kind, reason FROM tenantry.dead_jobs")
        assert {(r["kind"], r["reason"]) for r in reasons} == {
            ("poison", "exhausted"),
            ("slow", "exhausted"),
            ("future.kind", "unknown_kind"),
        }
        ticks = sorted(datetime.fromisoformat(r["period"]) for r in await admin.fetch(
            "SELECT period FROM public.ticks"
        ))  # fmt: skip
        assert len(ticks) >= 10
        assert all((b - a) == timedelta(seconds=1) for a, b in itertools.pairwise(ticks))
        assert await admin.fetchval("SELECT count(*) FROM tenantry.jobs WHERE kind <> 'tick'") == 0
        states = await admin.fetch("SELECT state, count(*) FROM tenantry.onboardings GROUP BY 1")
        assert {r["state"]: r["count"] for r in states} == {"completed": 16}
        assert len(streams) == 16 and all(s[-1] == "onboarding.completed" for s in streams)
        assert browser.statuses[500] == 0, browser.statuses
    finally:
        for p in procs.values():
            await p.kill()
        pool.terminate()
        await admin.close()


async def _only_dead_left(admin: asyncpg.Connection) -> bool:
    left: int = await admin.fetchval("SELECT count(*) FROM tenantry.jobs WHERE kind <> 'tick'")
    dead: int = await admin.fetchval("SELECT count(*) FROM tenantry.dead_jobs")
    return left == 0 and dead == sum(KINDS_THAT_DIE.values())
