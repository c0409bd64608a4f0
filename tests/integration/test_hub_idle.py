"""The SSE hub of a process that serves no stream (a worker, or a web process between
visitors): wake-ups move its snapshot at most once per refresh interval, and a stream
that opens gets every event as before."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import anyio
import asyncpg

from tenantry import tenant_tx
from tenantry.hub import Hub
from tenantry.onboarding.model import AGGREGATE, TERMINAL_EVENTS
from tenantry.outbox.store import emit
from tenantry.tenants import store


class StillClock:
    """Time that moves only when the test says: every notification falls within the
    refresh interval until then."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return self.t


async def test_without_streams_notifications_read_at_most_once_per_refresh(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    """Regression (cost): a hub with no stream took a snapshot on every notification
    and once more after each, 4-6% of the service's CPU while it provisioned sign-ups."""
    clock = StillClock()
    hub = Hub(
        worker_pool,
        aggregate_type=AGGREGATE,
        terminal_events=TERMINAL_EVENTS,
        poll_interval=3600,
        trail=0.01,
        clock=clock,
        tune_collector=False,
    )
    tenant = (await store.create_tenant(pool, name="Acme")).id
    aggregate = str(uuid.uuid4())
    async with anyio.create_task_group() as tg:
        await tg.start(hub.run)
        reads = hub.reads
        for _ in range(20):
            woken = hub.wake_ups
            hub.notify("outbox")
            await hub.wait_wake_ups(woken + 1)
        assert hub.reads == reads

        # Past the refresh interval a notification reads at once.
        clock.t += 1.0
        hub.notify("outbox")
        await hub.wait_reads(reads + 1)

        # With a stream, every notification reads, and the stream gets what committed
        # since the hub's last read (the snapshot it kept for nobody is old enough).
        with hub.subscribe(tenant, aggregate) as sub:
            async with tenant_tx(pool, tenant) as tx:
                await emit(
                    tx,
                    tenant_id=tenant,
                    aggregate_type=AGGREGATE,
                    aggregate_id=aggregate,
                    event_type="onboarding.step_completed",
                    payload={},
                    version=1,
                )
            now = hub.reads
            hub.notify("outbox")
            await hub.wait_reads(now + 1)
            assert [v for v, *_ in sub.frames] == [1]
        tg.cancel_scope.cancel()
