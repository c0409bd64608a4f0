"""Webhooks through the real `tenantry run` processes: kill -9 during fan-out and
during deliveries, two processes at once; every event ends delivered to every endpoint,
each (event, endpoint) pair made once, each event received at least once."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tenantry.tenants import store
from tests.acceptance.process import ServiceProcess
from tests.helpers import TEST_SECRET_KEY, eventually
from tests.receiver import Receiver, running_receiver

EVENTS = 300


def env(data_dir: Path) -> dict[str, str]:
    return {
        "TENANTRY_DATA_DIR": str(data_dir),
        "TENANTRY_SECRET_KEY": TEST_SECRET_KEY,
        "TENANTRY_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
        "TENANTRY_WEBHOOK_ALLOW_HTTP": "true",
        "TENANTRY_LEASE_SECONDS": "1",  # a killed process's deliveries come back soon
        "TENANTRY_MAINTENANCE_INTERVAL": "0.2",
        "TENANTRY_LOG_LEVEL": "info",
        "TENANTRY_SHUTDOWN_GRACE": "2",
    }


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as r:
        yield r


async def slow_ok(_: web.Request) -> web.StreamResponse:
    await asyncio.sleep(0.02)  # deliveries are in flight when a process is killed
    return web.Response(status=204)


async def emit_events(admin: asyncpg.Pool, tenant: uuid.UUID, n: int) -> None:
    for i in range(n):
        await admin.execute(
            "SELECT tenantry.emit($1, 'order', $2, 'order.placed',"
            " jsonb_build_object('n', $3::int))",
            tenant,
            str(uuid.uuid4()),
            i,
        )
        if i % 20 == 0:
            await asyncio.sleep(0.01)


@pytest.mark.timeout(180)
async def test_kill_9_during_fan_out_and_delivery_loses_and_doubles_nothing(
    database_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    admin = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    procs: list[ServiceProcess] = []
    try:
        tenant = (await store.create_tenant(admin, name="Kill Nine Ltd")).id
        key = (await store.create_key(admin, tenant)).secret
        a = await ServiceProcess.start(database_url, **env(tmp_path))
        b = await ServiceProcess.start(database_url, **env(tmp_path))
        procs += [a, b]
        port = await a.started()
        await b.started()
        secrets: dict[str, str] = {}
        async with aiohttp.ClientSession() as http:
            for path in ("/one", "/two"):
                receiver.on(path, slow_ok)
                async with http.post(
                    f"http://127.0.0.1:{port}/v1/webhook-endpoints",
                    json={"url": receiver.url(path), "timeout_seconds": 2},
                    headers={"Authorization": f"Bearer {key}"},
                ) as r:
                    assert r.status == 201, await r.text()
                    secrets[path] = (await r.json())["secret"]

        writer = asyncio.create_task(emit_events(admin, tenant, EVENTS))
        await receiver.wait_for(lambda: len(receiver.requests) >= 60, timeout=60)
        await a.kill()  # kill -9, mid fan-out and mid delivery
        await receiver.wait_for(lambda: len(receiver.requests) >= 250, timeout=60)
        await b.kill()
        await writer
        c = await ServiceProcess.start(database_url, **env(tmp_path))
        procs.append(c)
        await c.started()

        async def all_delivered() -> bool:
            states: Any = await admin.fetch(
                "SELECT state, count(*) AS n FROM tenantry.webhook_deliveries GROUP BY state"
            )
            return {r["state"]: r["n"] for r in states} == {"delivered": 2 * EVENTS}

        await eventually(all_delivered, timeout=90, every=0.2)
    finally:
        for p in procs:
            await p.kill()
    pairs = await admin.fetch("SELECT event_id, endpoint_id FROM tenantry.webhook_deliveries")
    interrupted = await admin.fetchval(
        "SELECT count(*) FROM tenantry.webhook_attempts WHERE result = 'interrupted'"
    )
    await admin.close()
    # The kills did land mid-attempt: those attempts are on record, and were retried.
    assert interrupted >= 1
    assert len({(r["event_id"], r["endpoint_id"]) for r in pairs}) == len(pairs) == 2 * EVENTS
    for path, secret in secrets.items():
        got = receiver.at(path)
        # At least once each (a delivery interrupted by the kill is sent again, with the
        # same webhook-id, so the receiver can tell), and every one signed.
        ns = {req.verify(secret)["data"]["n"] for req in got}
        assert ns == set(range(EVENTS)), path
        by_id: dict[str, set[int]] = {}
        for req in got:
            by_id.setdefault(req.webhook_id, set()).add(req.json()["data"]["n"])
        assert len(by_id) == EVENTS and all(len(v) == 1 for v in by_id.values())


async def test_sigterm_lets_attempts_in_flight_finish_and_records_them(
    database_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    """Regression (review): a SIGTERM cancelled the attempts in flight; after a restart
    the lease rescue sent each again, so the receiver handled every event twice."""
    admin = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    release = asyncio.Event()

    async def held(_: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    receiver.on("/held", held)
    proc = await ServiceProcess.start(database_url, **env(tmp_path))
    try:
        tenant = (await store.create_tenant(admin, name="Slow Receiver Co")).id
        key = (await store.create_key(admin, tenant)).secret
        port = await proc.started()
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{port}/v1/webhook-endpoints",
                json={"url": receiver.url("/held"), "timeout_seconds": 20},
                headers={"Authorization": f"Bearer {key}"},
            ) as r,
        ):
            assert r.status == 201, await r.text()
        await emit_events(admin, tenant, 3)
        await receiver.wait_count("/held", 3)  # all three in flight
        proc.signal(signal.SIGTERM)
        await proc.wait_log("stopping")
        release.set()
        assert await proc.wait_exit() == 0
        rows = await admin.fetch("SELECT state, attempts FROM tenantry.webhook_deliveries")
    finally:
        await proc.kill()
        await admin.close()
    assert sorted((r["state"], r["attempts"]) for r in rows) == [("delivered", 1)] * 3
    assert len(receiver.at("/held")) == 3
