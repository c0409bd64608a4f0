"""The SSE hub after the database handed out transaction ids again: a crash lost its
latest transactions (the provisioning steps commit without waiting for the disk), or
a failover went to a standby that lagged.  The hub's snapshot, kept in memory, is then
ahead of the server's ids, and rows committed under the ids given again are behind it,
where following never looks."""

from __future__ import annotations

import uuid

import anyio
import asyncpg
import pytest

from tenantry import tenant_tx
from tenantry.hub import IDS_WENT_BACK, Hub
from tenantry.onboarding.model import AGGREGATE, TERMINAL_EVENTS
from tenantry.outbox.store import Position, emit, snapshot
from tenantry.tenants import store


async def _emit(pool: asyncpg.Pool, tenant: uuid.UUID, aggregate: str, version: int) -> None:
    async with tenant_tx(pool, tenant) as tx:
        await emit(
            tx,
            tenant_id=tenant,
            aggregate_type=AGGREGATE,
            aggregate_id=aggregate,
            event_type="onboarding.step_completed",
            payload={},
            version=version,
        )


def _hub(worker_pool: asyncpg.Pool) -> Hub:
    """A hub that reads only when told (no poll): each test says when."""
    return Hub(
        worker_pool,
        aggregate_type=AGGREGATE,
        terminal_events=TERMINAL_EVENTS,
        poll_interval=3600,
        trail=0.01,
        tune_collector=False,
    )


async def _read_now(hub: Hub) -> None:
    """A notification, and the hub's read after it."""
    reads = hub.reads
    hub.notify("outbox")
    await hub.wait_reads(reads + 1)


@pytest.mark.parametrize("how", ["ids_behind_the_snapshot", "another_epoch"])
async def test_streams_resume_when_the_server_may_give_ids_out_again(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, how: str
) -> None:
    """Regression (found by test_database_crash.py: a stream never got the steps done
    again after a crash): every stream ends with a reason, for its client to resume
    from its last event (read by version), and the hub follows from the server's
    snapshot from then on.  The hub tells by the server's epoch (a crash's recovery
    resets the statistics); for good measure also by ids below its snapshot's, which
    is what a crash leaves, but which later transactions may have passed again by the
    hub's first read after it."""
    hub = _hub(worker_pool)
    tenant = (await store.create_tenant(pool, name="Acme")).id
    aggregate = str(uuid.uuid4())
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            await tg.start(hub.run)
            with hub.subscribe(tenant, aggregate) as sub:
                await _emit(pool, tenant, aggregate, 1)
                await _read_now(hub)
                assert [v for v, *_ in sub.frames] == [1]
                position = hub._position
                assert position is not None
                if how == "ids_behind_the_snapshot":
                    # What a crash leaves: the hub's snapshot ahead of every id the
                    # server gives out now.
                    ahead = int(position.snapshot.split(":")[1]) + 1_000_000
                    hub._position = Position(f"{ahead}:{ahead}:", position.server_epoch)
                else:
                    # A crash's recovery, which later transactions hid: the epoch moved.
                    await admin_pool.execute(  # (what the recovery does to it)
                        "SELECT pg_stat_reset_shared('archiver')"
                    )
                await _emit(pool, tenant, aggregate, 2)
                await _read_now(hub)
                assert sub.closed and sub.reason == IDS_WENT_BACK
            # A stream opened after it is served, from the server's snapshot.
            with hub.subscribe(tenant, aggregate) as again:
                await _emit(pool, tenant, aggregate, 3)
                await _read_now(hub)
                assert [v for v, *_ in again.frames] == [3]
                assert not again.closed
            tg.cancel_scope.cancel()


async def test_the_servers_epoch_does_not_depend_on_the_sessions_time_settings(
    worker_pool: asyncpg.Pool,
) -> None:
    """Regression (attack): the epoch was the timestamp's text, which follows the
    session's TimeZone and DateStyle: a connection set up otherwise (ALTER DATABASE ...
    SET TimeZone, reached by the hub's next connection) ended every stream."""
    async with worker_pool.acquire() as a, worker_pool.acquire() as b:
        await b.execute("SET TimeZone = 'America/New_York'; SET DateStyle = 'SQL, DMY'")
        try:
            first, second = await snapshot(a), await snapshot(b)
            assert first.server_epoch == second.server_epoch != ""
        finally:
            await b.execute("RESET TimeZone; RESET DateStyle")


async def test_a_stream_opened_while_the_ended_one_goes_gets_the_redone_versions(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """Regression (attack): the hub drops an event at or below the last version it fanned
    out for the aggregate, and forgot that version only when the aggregate's last stream
    went.  A stream of it opened before the stream ended by the epoch's change had gone
    (its client reconnecting at once) never got the versions the crash lost and the
    provisioning did again."""
    hub = _hub(worker_pool)
    tenant = (await store.create_tenant(pool, name="Acme")).id
    aggregate = str(uuid.uuid4())
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            await tg.start(hub.run)
            with hub.subscribe(tenant, aggregate) as old:
                await _emit(pool, tenant, aggregate, 1)
                await _emit(pool, tenant, aggregate, 2)
                await _read_now(hub)
                assert [v for v, *_ in old.frames] == [1, 2]
                # The crash lost version 2 (here: a row deleted), and its recovery moved
                # the epoch.
                await admin_pool.execute(
                    "DELETE FROM tenantry.outbox WHERE aggregate_id = $1 AND version = 2",
                    aggregate,
                )
                await admin_pool.execute("SELECT pg_stat_reset_shared('archiver')")
                await _read_now(hub)
                assert old.closed
                with hub.subscribe(tenant, aggregate) as new:  # before `old` has gone
                    await _emit(pool, tenant, aggregate, 2)  # done again
                    await _read_now(hub)
                    assert [v for v, *_ in new.frames] == [2]
            tg.cancel_scope.cancel()
