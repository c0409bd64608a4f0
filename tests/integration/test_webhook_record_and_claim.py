"""A deliverer's record claims again in its own transaction (webhook_record_and_claim):
what the attacks on that change found, each held here.  In most, something holds the
row of a delivery being recorded a while, so that its record waits for it (a record
never waits for an endpoint's row: tests/integration/test_webhook_held_rows.py); the
last is a record sent again after its answer was lost."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from aiohttp import web

from tenantry.db import Conn
from tests.helpers import eventually, wait_lock_waiter
from tests.integration.test_webhook_held_rows import BREAKER, attempt_result, sending_delivery
from tests.integration.test_webhooks import Tenant, new_tenant, service
from tests.receiver import running_receiver


@asynccontextmanager
async def _delivery_held(
    admin_pool: asyncpg.Pool, tenant: Tenant, endpoint_id: str | None = None
) -> AsyncIterator[Conn]:
    """The rows of the tenant's deliveries being sent (to `endpoint_id`, if given),
    locked by another transaction: their record waits for them."""
    async with admin_pool.acquire() as holder:
        tx = holder.transaction()
        await tx.start()
        try:
            await holder.execute(
                "SELECT 1 FROM tenantry.webhook_deliveries WHERE tenant_id = $1"
                " AND state = 'sending' AND ($2::uuid IS NULL OR endpoint_id = $2) FOR UPDATE",
                tenant.id,
                None if endpoint_id is None else uuid.UUID(endpoint_id),
            )
            yield holder
        finally:
            await tx.rollback()


async def _states(admin_pool: asyncpg.Pool, tenant: Tenant) -> list[tuple[str, int]]:
    rows = await admin_pool.fetch(
        "SELECT state, attempts FROM tenantry.webhook_deliveries WHERE tenant_id = $1"
        " ORDER BY created_at, event_id",
        tenant.id,
    )
    return [(r["state"], r["attempts"]) for r in rows]


async def test_a_lease_counts_from_the_claim_not_from_a_wait_before_it(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """The claim leased from now(), its transaction's start: in a record that first
    waited for a row, the lease was short by the wait, and ran out while the
    attempt was within its timeout (the rescue sent it a second time)."""
    async with (
        running_receiver() as receiver,
        service(
            tmp_path, app_url, pool, worker_pool,
            webhook_endpoint_concurrency=1, webhook_timeout=3, lease_seconds=1.0,
        ) as svc,
    ):  # fmt: skip
        acme = await new_tenant(pool, svc)
        await acme.endpoint(receiver.url("/one"))
        release = asyncio.Event()
        second_held = asyncio.Event()  # the second attempt stays in flight: its lease is read

        async def held(_: web.Request) -> web.StreamResponse:
            await (second_held if release.is_set() else release).wait()
            return web.Response(status=204)

        receiver.on("/one", held)
        await acme.emit(pool, "invoice.paid")
        await acme.emit(pool, "invoice.voided")
        await receiver.wait_count("/one", 1)  # the first in flight, the second waits
        async with _delivery_held(admin_pool, acme) as holder:
            release.set()
            await wait_lock_waiter(admin_pool)  # the first's record waits for its row
            released_at = await holder.fetchval("SELECT clock_timestamp()")
        await receiver.wait_count("/one", 2)
        lease = await admin_pool.fetchval(
            "SELECT lease_until FROM tenantry.webhook_deliveries"
            " WHERE tenant_id = $1 AND state = 'sending'",
            acme.id,
        )
        second_held.set()
        # Claimed after the row was let go: leased for the timeout plus the margin
        # (4 s) from then at least.
        assert (lease - released_at).total_seconds() > 4.0, (lease, released_at)


async def test_a_record_waiting_for_a_row_leaves_the_other_places_to_the_claim_loop(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """The record reserved every free place of the process for its claim, for as long
    as it waited: no tenant's delivery was claimed meanwhile."""
    async with running_receiver() as receiver, service(tmp_path, app_url, pool, worker_pool) as svc:
        acme = await new_tenant(pool, svc, "Acme")
        other = await new_tenant(pool, svc, "Other")
        await acme.endpoint(receiver.url("/held"))
        await other.endpoint(receiver.url("/other"))
        release = receiver.hold("/held")
        await acme.emit(pool, "invoice.paid")
        await receiver.wait_count("/held", 1)
        async with _delivery_held(admin_pool, acme):
            release.set()
            await wait_lock_waiter(admin_pool)
            await other.emit(pool, "invoice.paid")
            await receiver.wait_count("/other", 1)  # while the record still waits


async def test_a_wake_up_during_a_records_claim_is_not_lost(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """A delivery fanned out while a record and its claim were under way (here, the
    record waits for a delivery's row) woke a claim loop that found no free place (the
    record's claim had reserved them); the record's claim came back with fewer than it
    asked for, and the delivery waited for the next poll."""
    async with (
        running_receiver() as receiver,
        service(tmp_path, app_url, pool, worker_pool, poll_interval=30.0) as svc,
    ):
        acme = await new_tenant(pool, svc, "Acme")
        other = await new_tenant(pool, svc, "Other")
        await acme.endpoint(receiver.url("/held"))
        await other.endpoint(receiver.url("/other"))
        release = receiver.hold("/held")
        await acme.emit(pool, "invoice.paid")
        await receiver.wait_count("/held", 1)
        async with _delivery_held(admin_pool, acme):
            release.set()
            await wait_lock_waiter(admin_pool)  # the record (and its claim) waits
            await other.emit(pool, "invoice.paid")

            async def fanned_out() -> bool:
                return len(await _states(admin_pool, other)) == 1

            await eventually(fanned_out)
        await receiver.wait_count("/other", 1, timeout=10)  # not the 30 s poll


async def test_a_soft_stop_sends_what_a_records_claim_under_way_took(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """A record's claim that returned after a soft stop began found no sender: the
    delivery stayed `sending`, unattempted, until its lease ran out and the rescue put
    an `interrupted` attempt on record that never happened."""
    async with (
        running_receiver() as receiver,
        service(tmp_path, app_url, pool, worker_pool, webhook_endpoint_concurrency=1) as svc,
    ):
        acme = await new_tenant(pool, svc)
        await acme.endpoint(receiver.url("/one"))
        release = receiver.hold("/one")
        await acme.emit(pool, "invoice.paid")
        await acme.emit(pool, "invoice.voided")
        await receiver.wait_count("/one", 1)
        async with _delivery_held(admin_pool, acme):
            release.set()
            await wait_lock_waiter(admin_pool)  # the record, and its claim, under way
            stopping = asyncio.create_task(svc.deliverer.shutdown(grace=10))
            await asyncio.sleep(0)  # the stop has begun (it claims nothing more)
        await stopping
        # The second: sent and recorded if the record's claim took it, else left
        # pending (that claim did not run: the claims' lock was taken); never left
        # `sending` without an attempt.
        first, second = await _states(admin_pool, acme)
        assert (first, second in (("delivered", 1), ("pending", 0))) == (("delivered", 1), True)
        ids = [r.webhook_id for r in receiver.at("/one")]
        assert len(ids) == len(set(ids)) == (2 if second[0] == "delivered" else 1)


async def test_a_place_freed_while_the_process_was_full_wakes_the_claim_loop(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """The process full of attempts and a record's claim under way: the loop, woken by
    a new delivery, found no place and slept.  An attempt's end woke it only when the
    attempts alone had filled the process, so the freed place waited for the poll."""
    async with (
        running_receiver() as receiver,
        service(
            tmp_path, app_url, pool, worker_pool,
            webhook_concurrency=3, webhook_endpoint_concurrency=1, poll_interval=30.0,
        ) as svc,
    ):  # fmt: skip
        acme = await new_tenant(pool, svc, "Acme")
        other = await new_tenant(pool, svc, "Other")
        waits = await acme.endpoint(receiver.url("/waits"), event_types=["x.one"])
        await acme.endpoint(receiver.url("/ends"), event_types=["x.two"])
        await other.endpoint(receiver.url("/fills"), event_types=["a.one"])
        await other.endpoint(receiver.url("/next"), event_types=["a.two"])
        release_first = receiver.hold("/waits")
        release_second = receiver.hold("/ends")
        receiver.hold("/fills")
        await acme.emit(pool, "x.one")
        await acme.emit(pool, "x.two")
        await receiver.wait_count("/waits", 1)
        await receiver.wait_count("/ends", 1)
        async with _delivery_held(admin_pool, acme, waits["id"]):
            release_first.set()
            await wait_lock_waiter(admin_pool)  # its record, a place reserved, waits
            await other.emit(pool, "a.one")
            await receiver.wait_count("/fills", 1)  # the process's last place
            await other.emit(pool, "a.two")

            async def the_loop_found_no_place() -> bool:
                return len(await _states(admin_pool, other)) == 2 and svc.deliverer._starved

            await eventually(the_loop_found_no_place)
            release_second.set()  # a place frees up
            await receiver.wait_count("/next", 1, timeout=10)  # not the 30 s poll


async def test_a_record_sent_again_after_its_answer_was_lost_records_nothing_twice(
    admin_pool: asyncpg.Pool,
) -> None:
    """A record committed, and its answer lost (the connection cut, a hard stop): the
    deliverer sends the same results again.  Each attempt was stored twice, counted
    twice toward its endpoint's circuit, and applied again to a delivery already out
    on its next attempt (back to pending while that attempt was in flight)."""
    rows = await sending_delivery(admin_pool, "Twice", attempts=1)
    _, endpoint, delivery = rows
    results = [attempt_result(rows, "2026-12-07T23:00:00.123456+00:00", ok=False)]
    record = "SELECT tenantry.webhook_record('o', $1::jsonb, $2::jsonb)"
    await admin_pool.fetchval(record, results, BREAKER)
    # Its retry is due at once: the same process claims it again before the answer
    # lost is noticed and the record sent again.
    await admin_pool.execute(
        "UPDATE tenantry.webhook_deliveries SET state = 'sending', attempts = 2,"
        " lease_owner = 'o', lease_until = now() + interval '1 min' WHERE id = $1",
        delivery,
    )
    await admin_pool.fetchval(record, results, BREAKER)
    state = await admin_pool.fetchrow(
        "SELECT state, attempts FROM tenantry.webhook_deliveries WHERE id = $1", delivery
    )
    assert state is not None and tuple(state) == ("sending", 2)  # the second attempt's
    attempts = await admin_pool.fetchval(
        "SELECT count(*) FROM tenantry.webhook_attempts WHERE delivery_id = $1", delivery
    )
    counted = await admin_pool.fetchrow(
        "SELECT window_attempts, window_failures, circuit_failures"
        " FROM tenantry.webhook_endpoints WHERE id = $1",
        endpoint,
    )
    assert counted is not None
    assert (attempts, tuple(counted)) == (1, (1, 1, 1))
