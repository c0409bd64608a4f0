"""Webhooks under strain: the circuit breaker, auto-disabling, the rate limit, and the
fan-out racing itself across processes while events commit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from tenantry import tenant_tx
from tenantry.app import Service
from tenantry.outbox.store import emit
from tenantry.tenants import store
from tenantry.webhooks import fanout
from tenantry.webhooks.fanout import FanOut
from tests.integration.test_webhooks import finished, new_tenant, service
from tests.receiver import Receiver, answer, running_receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as r:
        yield r


class Switch:
    """A receiver path whose answer the test changes."""

    def __init__(self, status: int) -> None:
        self.status = status

    async def __call__(self, _: web.Request) -> web.StreamResponse:
        return web.Response(status=self.status)


async def test_the_circuit_opens_parks_deliveries_probes_once_and_closes(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    receiver: Receiver,
) -> None:  # fmt: skip
    async with service(
        tmp_path, app_url, pool, worker_pool,
        webhook_breaker_failures=3, webhook_breaker_volume=1000, webhook_breaker_cooldown=1.0,
    ) as svc:  # fmt: skip
        acme = await new_tenant(pool, svc)
        ep = await acme.endpoint(
            receiver.url("/flaky"), event_types=["invoice.*"], retry_schedule=[0] * 10
        )
        await acme.endpoint(receiver.url("/ops"), event_types=["webhook.endpoint.*"])
        switch = Switch(500)
        receiver.on("/flaky", switch)
        await acme.emit(pool, "invoice.paid")
        [opened] = await receiver.wait_count("/ops", 1)
        assert opened.json()["type"] == "webhook.endpoint.circuit_opened"
        assert opened.json()["data"]["consecutive_failures"] == 3
        _, state = await acme.call("GET", f"/v1/webhook-endpoints/{ep['id']}")
        assert state["circuit"]["state"] == "open" and state["circuit"]["retry_at"]
        # Parked: the delivery kept its remaining attempts, and a new event waits too.
        [d] = await acme.deliveries(endpoint_id=ep["id"])
        assert (d["state"], d["attempts"]) == ("pending", 3)
        await acme.emit(pool, "invoice.voided")
        switch.status = 204
        [_, closed] = await receiver.wait_count("/ops", 2)
        assert closed.json()["type"] == "webhook.endpoint.circuit_closed"
        got = await receiver.wait_count("/flaky", 5)
        # Nothing reached the endpoint during the cool-down, and one probe came first.
        assert got[3].at - got[2].at >= 0.9
        assert got[4].at >= got[3].at
        for row in await acme.deliveries(endpoint_id=ep["id"]):
            assert (await finished(acme, row["id"]))["state"] == "delivered"
        assert len(receiver.at("/flaky")) == 5


async def test_an_endpoint_failing_too_long_is_disabled_and_says_so(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    receiver: Receiver,
) -> None:  # fmt: skip
    async with service(
        tmp_path, app_url, pool, worker_pool,
        webhook_breaker_failures=1000, webhook_breaker_volume=1000, webhook_disable_after=1.0,
    ) as svc:  # fmt: skip
        acme = await new_tenant(pool, svc)
        ep = await acme.endpoint(
            receiver.url("/dead"), event_types=["invoice.*"], retry_schedule=[0, 1, 1, 1, 1]
        )
        await acme.endpoint(receiver.url("/ops"), event_types=["webhook.endpoint.*"])
        receiver.on("/dead", answer(500))
        await acme.emit(pool, "invoice.paid")
        [note] = await receiver.wait_count("/ops", 1)
        assert note.json()["type"] == "webhook.endpoint.disabled"
        assert "no successful delivery since" in note.json()["data"]["reason"]
        _, state = await acme.call("GET", f"/v1/webhook-endpoints/{ep['id']}")
        assert state["enabled"] is False and state["failing_since"] is not None
        # Enabling it again starts afresh.
        receiver.on("/dead", answer(204))
        status, again = await acme.call(
            "PATCH", f"/v1/webhook-endpoints/{ep['id']}", {"enabled": True}
        )
        assert status == 200 and again["enabled"] and again["disabled_reason"] is None
        assert again["failing_since"] is None and again["circuit"]["state"] == "closed"
        [d] = await acme.deliveries(endpoint_id=ep["id"])
        assert (await finished(acme, d["id"]))["state"] == "delivered"


async def test_the_rate_limit_spreads_an_endpoints_deliveries(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    receiver: Receiver,
) -> None:  # fmt: skip
    async with service(tmp_path, app_url, pool, worker_pool) as svc:
        acme = await new_tenant(pool, svc)
        await acme.endpoint(receiver.url("/slow"), rate_limit=5)
        other = await new_tenant(pool, svc, "Other Co")
        await other.endpoint(receiver.url("/fast"))
        for _ in range(20):
            await acme.emit(pool, "invoice.paid")
            await other.emit(pool, "invoice.paid")
        fast = await receiver.wait_count("/fast", 20)
        slow = await receiver.wait_count("/slow", 20)
    # A bucket of 5 to start with, then 5 a second: 15 more take about 3 s.
    assert slow[-1].at - slow[0].at >= 2.4
    # The other tenant's endpoint was not held to it.
    assert fast[-1].at - fast[0].at < slow[-1].at - slow[0].at


async def _emitter(pool: asyncpg.Pool, tenant: uuid.UUID, n: int) -> None:
    for i in range(n):
        async with tenant_tx(pool, tenant) as tx:
            await emit(
                tx,
                tenant_id=tenant,
                aggregate_type="thing",
                aggregate_id=f"{i % 7}-{uuid.uuid4()}",
                event_type="thing.made",
                payload={"i": i},
            )


async def test_followers_racing_while_events_commit_fan_out_each_event_once(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, app_url: str
) -> None:
    from tenantry import db, roles  # noqa: PLC0415

    tenants = [(await store.create_tenant(pool, name=f"Tenant {i}")).id for i in range(4)]
    for t in tenants:
        for n in range(2):
            await admin_pool.execute(
                "INSERT INTO tenantry.webhook_endpoints (tenant_id, url, secret)"
                " VALUES ($1, $2, '\\x01')",
                t,
                f"https://example.com/{n}",
            )
    second = await db.create_pool(roles.worker_url_for(app_url), min_size=1, max_size=2)
    followers = [FanOut(worker_pool, lambda: None), FanOut(second, lambda: None)]
    writing = True

    async def follow(f: FanOut) -> None:
        while writing:
            await f.run_once()
            await asyncio.sleep(0)

    try:
        tasks = [asyncio.create_task(follow(f)) for f in followers]
        await asyncio.gather(*(_emitter(pool, t, 150) for t in tenants))
        writing = False
        await asyncio.gather(*tasks)
        while await followers[0].run_once() != 0 or (await fanout.lag(worker_pool)).events:
            pass
    finally:
        await second.close()
    rows = await admin_pool.fetch("SELECT event_id, endpoint_id FROM tenantry.webhook_deliveries")
    events = await admin_pool.fetchval("SELECT count(*) FROM tenantry.outbox")
    assert len(rows) == 2 * events == 2 * 600
    assert len({(r["event_id"], r["endpoint_id"]) for r in rows}) == len(rows)
    lag: Any = await fanout.lag(worker_pool)
    assert lag.events == 0 and lag.oldest_seconds is None


async def test_an_event_for_a_tenant_without_endpoints_makes_nothing(
    svc_for_lag: Service, pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    acme = await new_tenant(pool, svc_for_lag)
    await acme.emit(pool, "invoice.paid")
    await svc_for_lag.fanout.run_once()
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.webhook_deliveries") == 0


@pytest.fixture
async def svc_for_lag(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[Service]:
    async with service(tmp_path, app_url, pool, worker_pool) as s:
        yield s
