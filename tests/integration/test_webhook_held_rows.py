"""An endpoint's row held elsewhere for long (an operator's open transaction, an
application's own transaction that updated the endpoint and went on with other work)
holds up that endpoint's deliveries only: every other tenant's are still claimed, sent
and recorded, and the held endpoint's are recorded once the row is let go."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tenantry.app import Service
from tenantry.db import Conn
from tests.helpers import eventually, wait_lock_waiter
from tests.integration.test_webhooks import Tenant, new_tenant, service
from tests.receiver import running_receiver


@asynccontextmanager
async def _updated_in_an_open_transaction(
    admin_pool: asyncpg.Pool, endpoint_id: str
) -> AsyncIterator[Conn]:
    """An operator's `UPDATE` of the endpoint in a transaction left open."""
    async with admin_pool.acquire() as holder:
        tx = holder.transaction()
        await tx.start()
        try:
            await holder.execute(
                "UPDATE tenantry.webhook_endpoints SET description = 'being edited' WHERE id = $1",
                uuid.UUID(endpoint_id),
            )
            yield holder
        finally:
            await tx.rollback()


async def _states(admin_pool: asyncpg.Pool, tenant: Tenant) -> list[tuple[str, int]]:
    rows = await admin_pool.fetch(
        "SELECT d.state, (SELECT count(*) FROM tenantry.webhook_attempts a"
        "                  WHERE a.tenant_id = d.tenant_id AND a.delivery_id = d.id)::integer"
        "  FROM tenantry.webhook_deliveries d WHERE d.tenant_id = $1"
        " ORDER BY d.created_at, d.event_id",
        tenant.id,
    )
    return [(r[0], r[1]) for r in rows]


# Rows and results for the tests that call the record's functions directly.
BREAKER = {"failures": 10, "ratio": 0.5, "volume": 20, "window_s": 60,
           "cooldown_s": 30, "disable_after_s": 432000}  # fmt: skip


async def sending_delivery(
    admin_pool: asyncpg.Pool, name: str, attempts: int
) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """A tenant, its endpoint, and a delivery out on attempt `attempts`, leased to
    owner 'o' for a minute: (tenant, endpoint, delivery)."""
    tenant = await admin_pool.fetchval(
        "INSERT INTO tenantry.tenants (id, slug, name) VALUES (gen_random_uuid(),"
        " lower($1) || '-' || substr(md5(random()::text), 1, 8), $1) RETURNING id",
        name,
    )
    endpoint = await admin_pool.fetchval(
        "INSERT INTO tenantry.webhook_endpoints (tenant_id, url, secret)"
        " VALUES ($1, 'https://' || lower($2) || '.example/', '\\x00'::bytea) RETURNING id",
        tenant,
        name,
    )
    delivery = await admin_pool.fetchval(
        "INSERT INTO tenantry.webhook_deliveries (tenant_id, endpoint_id, event_id,"
        " event_type, body, state, attempts, lease_owner, lease_until)"
        " VALUES ($1, $2, 1, 'invoice.paid', '{}', 'sending', $3, 'o',"
        "         now() + interval '1 min') RETURNING id",
        tenant,
        endpoint,
        attempts,
    )
    return tenant, endpoint, delivery


def attempt_result(
    rows: tuple[uuid.UUID, uuid.UUID, uuid.UUID], attempted_at: str, *, ok: bool
) -> dict[str, object]:
    """Attempt 1's result as the deliverer sends it: delivered (204), or failed (500)
    with the next attempt 5 s later."""
    tenant, endpoint, delivery = rows
    return {
        "tenant_id": str(tenant), "delivery_id": str(delivery),
        "endpoint_id": str(endpoint), "attempt": 1, "attempted_at": attempted_at,
        "url": "https://x.example/", "result": "delivered" if ok else "failed",
        "request_headers": {}, "request_body": "{}", "response_status": 204 if ok else 500,
        "response_headers": {}, "response_body": "", "duration_ms": 1.5,
        "error_class": None, "error": None, "next_state": "delivered" if ok else "pending",
        "next_attempt_at": None if ok else "2026-12-08T01:00:05+00:00", "reason": None,
        "success": ok,
    }  # fmt: skip


async def _until_states(
    admin_pool: asyncpg.Pool, tenant: Tenant, expected: list[tuple[str, int]]
) -> None:
    async def reached() -> bool:
        return await _states(admin_pool, tenant) == expected

    await eventually(reached, timeout=10)


async def test_a_held_rate_limited_endpoint_holds_up_no_other_tenants_claims(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """The claim spends a rate-limited endpoint's tokens on its row: it waited for the
    row while holding the claims' lock, so no process claimed any tenant's delivery
    until the transaction holding it ended."""
    async with running_receiver() as receiver, service(tmp_path, app_url, pool, worker_pool) as svc:
        acme = await new_tenant(pool, svc, "Acme")
        other = await new_tenant(pool, svc, "Other")
        limited = await acme.endpoint(receiver.url("/limited"), rate_limit=100)
        await other.endpoint(receiver.url("/other"))
        async with _updated_in_an_open_transaction(admin_pool, limited["id"]):
            await acme.emit(pool, "invoice.paid")
            await other.emit(pool, "invoice.paid")
            await receiver.wait_count("/other", 1, timeout=10)
            await _until_states(admin_pool, other, [("delivered", 1)])
            assert await _states(admin_pool, acme) == [("pending", 0)]
        await receiver.wait_count("/limited", 1, timeout=10)  # its turn once let go
        await _until_states(admin_pool, acme, [("delivered", 1)])


async def test_a_held_endpoint_holds_up_no_other_tenants_records(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """A record moves each endpoint's circuit on its row: it waited for the row, the
    process's later records queued behind it, and every delivery the process sent
    stayed `sending`, holding its endpoint's places, until the row was let go."""
    async with running_receiver() as receiver, service(tmp_path, app_url, pool, worker_pool) as svc:
        acme = await new_tenant(pool, svc, "Acme")
        other = await new_tenant(pool, svc, "Other")
        held = await acme.endpoint(receiver.url("/held"))
        await other.endpoint(receiver.url("/other"))
        release = receiver.hold("/held")
        await acme.emit(pool, "invoice.paid")
        await receiver.wait_count("/held", 1)
        async with _updated_in_an_open_transaction(admin_pool, held["id"]):
            release.set()  # its attempt ends while the row is held
            for n in range(1, 4):
                await other.emit(pool, "invoice.paid")
                await receiver.wait_count("/other", n, timeout=10)
            await _until_states(admin_pool, other, [("delivered", 1)] * 3)
            assert await _states(admin_pool, acme) == [("sending", 0)]
        await _until_states(admin_pool, acme, [("delivered", 1)])  # recorded once, later
        assert len(receiver.at("/held")) == 1


async def test_results_left_for_later_move_the_circuit_in_the_order_they_came(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """A held endpoint's results wait together, a later one never recorded before an
    earlier one: a failure and then a success leave the circuit's failure streak at 0
    (the success recorded first, then the failure, would leave it at 1)."""
    async with running_receiver() as receiver, service(tmp_path, app_url, pool, worker_pool) as svc:
        acme = await new_tenant(pool, svc, "Acme")
        ep = await acme.endpoint(receiver.url("/flaky"))

        async def by_type(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            return web.Response(status=500 if body["type"] == "x.fails" else 204)

        receiver.on("/flaky", by_type)
        async with _updated_in_an_open_transaction(admin_pool, ep["id"]):
            await acme.emit(pool, "x.fails")
            await receiver.wait_count("/flaky", 1)
            await acme.emit(pool, "x.ok")
            await receiver.wait_count("/flaky", 2)

            async def both_left_for_later() -> bool:
                return len(svc.deliverer._results) == 2

            await eventually(both_left_for_later)
        await _until_states(admin_pool, acme, [("pending", 1), ("delivered", 1)])
        row = await admin_pool.fetchrow(
            "SELECT circuit_state, circuit_failures FROM tenantry.webhook_endpoints WHERE id = $1",
            uuid.UUID(ep["id"]),
        )
        assert row is not None and tuple(row) == ("closed", 0)


@pytest.mark.parametrize("lease_seconds", [3.0, 1.0])
async def test_a_result_left_out_keeps_its_deliverys_lease(
    lease_seconds: float, tmp_path: Path, app_url: str, pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """A result waiting for its endpoint's row no longer held the delivery's row
    either: once the lease ran out, the rescue took the delivery for a stopped
    process's, put an `interrupted` attempt on record and had it sent again.  With a
    margin of a second, the lease kept a margin ahead ran out between two tries a
    second apart (attack, 0cc6136)."""
    async with (
        running_receiver() as receiver,
        service(
            tmp_path, app_url, pool, worker_pool, webhook_timeout=1,
            lease_seconds=lease_seconds,
        ) as svc,
    ):  # fmt: skip
        acme = await new_tenant(pool, svc, "Acme")
        ep = await acme.endpoint(receiver.url("/held"))
        async with _updated_in_an_open_transaction(admin_pool, ep["id"]):
            await acme.emit(pool, "invoice.paid")
            await receiver.wait_count("/held", 1)
            first_lease = await admin_pool.fetchval(
                "SELECT lease_until FROM tenantry.webhook_deliveries WHERE tenant_id = $1",
                acme.id,
            )

            async def past_the_first_lease() -> bool:
                return bool(await admin_pool.fetchval("SELECT now() > $1", first_lease))

            await eventually(past_the_first_lease)

            async def tries_a_second_apart() -> bool:
                return svc.deliverer._held_pause.get(ep["id"], 0.0) >= 1.0

            await eventually(tries_a_second_apart)
            # The rescue's passes (what the service's maintenance runs every few
            # seconds), over two tries a second apart.
            for _ in range(2):
                tries = svc.deliverer._held_until.get(ep["id"])

                async def tried_again(before: float | None = tries) -> bool:
                    return svc.deliverer._held_until.get(ep["id"]) != before

                await eventually(tried_again)
                # Leased past the next try (a pause from now), and not rescued.
                ahead = await admin_pool.fetchval(
                    "SELECT extract(epoch FROM lease_until - clock_timestamp())::float8"
                    "  FROM tenantry.webhook_deliveries WHERE tenant_id = $1",
                    acme.id,
                )
                assert ahead > svc.deliverer._held_pause[ep["id"]], ahead
                assert await admin_pool.fetchval("SELECT tenantry.webhook_rescue(10, 100)") == 0
            assert await _states(admin_pool, acme) == [("sending", 0)]
        await _until_states(admin_pool, acme, [("delivered", 1)])
        assert len(receiver.at("/held")) == 1


async def test_a_late_result_does_not_move_a_delivery_out_on_its_next_attempt(
    admin_pool: asyncpg.Pool,
) -> None:
    """A result recorded after the rescue put its delivery back and the same process
    claimed it again: it moved the delivery, out on its next attempt, to the late
    attempt's state (here back to pending, with that attempt in flight)."""
    rows = await sending_delivery(admin_pool, "Late", attempts=2)
    delivery = rows[2]
    late = attempt_result(rows, "2026-12-08T01:00:00.123456+00:00", ok=False)
    left_out = await admin_pool.fetchval(
        "SELECT tenantry.webhook_record_leaving_held('o', $1::jsonb, $2::jsonb)", [late], BREAKER
    )
    assert left_out == []
    state = await admin_pool.fetchrow(
        "SELECT state, attempts, lease_owner FROM tenantry.webhook_deliveries WHERE id = $1",
        delivery,
    )
    assert state is not None and tuple(state) == ("sending", 2, "o")
    on_record = await admin_pool.fetchval(
        "SELECT count(*) FROM tenantry.webhook_attempts WHERE delivery_id = $1", delivery
    )
    assert on_record == 1


async def test_another_tenants_endpoint_with_the_same_id_is_not_taken_for_the_held_one(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """An endpoint's id is unique within its tenant only (a tenant may insert its own):
    the record compared the locked endpoints by id alone, took the held endpoint for
    the other tenant's that it had locked, and waited for the held row after all,
    with the other tenant's result in the same transaction."""
    async with running_receiver() as receiver, service(tmp_path, app_url, pool, worker_pool) as svc:
        acme = await new_tenant(pool, svc, "Acme")
        other = await new_tenant(pool, svc, "Other")
        held = await acme.endpoint(receiver.url("/held"))
        async with _updated_in_an_open_transaction(admin_pool, held["id"]):
            await acme.emit(pool, "invoice.paid")
            await receiver.wait_count("/held", 1)

            async def left_out() -> bool:
                return len(svc.deliverer._results) == 1 and not svc.deliverer.in_flight

            await eventually(left_out)
            await admin_pool.execute(
                "INSERT INTO tenantry.webhook_endpoints (tenant_id, id, url, secret)"
                " SELECT $1, e.id, $2, e.secret FROM tenantry.webhook_endpoints e"
                "  WHERE e.id = $3",
                other.id,
                receiver.url("/same-id"),
                uuid.UUID(held["id"]),
            )
            await other.emit(pool, "invoice.paid")

            async def others_attempt_on_record() -> bool:
                states = await _states(admin_pool, other)
                return len(states) == 1 and states[0][1] == 1

            await eventually(others_attempt_on_record, timeout=10)
        await _until_states(admin_pool, acme, [("delivered", 1)])


async def test_the_calls_of_the_version_before_keep_their_shapes_and_leave_nothing_out(
    admin_pool: asyncpg.Pool,
) -> None:
    """A process of the version before, still running after a newer one migrated (a
    rolling deploy), calls webhook_record_and_claim: it read the new left-out rows as
    claimed deliveries (one with no body crashed its deliverer) and took the left-out
    results for recorded.  The old calls keep their shapes, and wait for a held row as
    that version did."""
    shapes = {
        r[0]: r[1]
        for r in await admin_pool.fetch(
            "SELECT p.proname, pg_get_function_result(p.oid) FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'tenantry'"
            " AND p.proname IN ('webhook_record', 'webhook_record_and_claim')"
        )
    }
    assert shapes == {
        "webhook_record": "integer",
        "webhook_record_and_claim": "TABLE(tenant_id uuid, id uuid, endpoint_id uuid,"
        " event_id bigint, event_type text, body text, attempts integer, url text,"
        " headers jsonb, secret bytea, previous_secret bytea, timeout_seconds integer,"
        " retry_schedule integer[], probe boolean)",
    }
    rows = await sending_delivery(admin_pool, "Old", attempts=1)
    endpoint, delivery = rows[1], rows[2]
    result = attempt_result(rows, "2026-12-08T03:00:00.123456+00:00", ok=True)
    async with _updated_in_an_open_transaction(admin_pool, str(endpoint)):
        recording = asyncio.create_task(
            admin_pool.fetch(
                "SELECT * FROM tenantry.webhook_record_and_claim('o', $1::jsonb, $2::jsonb,"
                " 0, gen_random_uuid(), 4, 10, 30, 16)",
                [result],
                BREAKER,
            )
        )
        await wait_lock_waiter(admin_pool)  # it waits for the row, as it did
    assert await recording == []
    state = await admin_pool.fetchval(
        "SELECT state FROM tenantry.webhook_deliveries WHERE id = $1", delivery
    )
    assert state == "delivered"


async def test_a_claim_that_can_take_nothing_locks_no_endpoint_row(
    admin_pool: asyncpg.Pool,
) -> None:
    """The claim locked every rate-limited endpoint with something due, whether or not
    it could take from it (here each is at its places): a transaction id and a row lock
    written per claim, and records of those endpoints met the locks (attack, 825e47c:
    11 KiB of WAL a claim over 200 such endpoints, against 36 bytes before)."""
    tenant = await admin_pool.fetchval(
        "INSERT INTO tenantry.tenants (id, slug, name) VALUES (gen_random_uuid(),"
        " 'rl-' || substr(md5(random()::text), 1, 8), 'Rate limited') RETURNING id"
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.webhook_endpoints (tenant_id, url, secret, rate_limit)"
        " SELECT $1, 'https://rl.example/' || g, '\\x00'::bytea, 10"
        "   FROM generate_series(1, 50) g",
        tenant,
    )
    # Each endpoint at its 4 places, one more delivery due.
    await admin_pool.execute(
        "INSERT INTO tenantry.webhook_deliveries (tenant_id, endpoint_id, event_id,"
        " event_type, body, state, attempts, lease_owner, lease_until)"
        " SELECT $1, e.id, g, 'x', '{}', CASE WHEN g <= 4 THEN 'sending' ELSE 'pending' END,"
        "        CASE WHEN g <= 4 THEN 1 ELSE 0 END, CASE WHEN g <= 4 THEN 'elsewhere' END,"
        "        CASE WHEN g <= 4 THEN now() + interval '1 hour' END"
        "   FROM tenantry.webhook_endpoints e, generate_series(1, 5) g WHERE e.tenant_id = $1",
        tenant,
    )
    async with admin_pool.acquire() as conn:
        first = await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
        for _ in range(20):
            claimed = await conn.fetch(
                "SELECT * FROM tenantry.webhook_claim('p', 10, gen_random_uuid(), 4, 10, 30, 1000)"
            )
            assert claimed == []
        last = await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
    assert last - first == 1  # only the second reading's own


async def test_busy_claims_elsewhere_leave_no_rate_limited_result_out(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """Other processes' claims (here with no place for the endpoint: they take nothing)
    locked a rate-limited endpoint's row a moment each; a record that met such a lock
    skipped the row at once and left its results out for 50 ms or more (attack: 200
    deliveries took 9.9 s beside three busy claimers, 0.5 s before the change)."""
    async with running_receiver() as receiver, service(tmp_path, app_url, pool, worker_pool) as svc:
        left = 0
        record = svc.deliverer._record

        async def counting(
            batch: list[dict[str, object]], *, claim_again: bool = False
        ) -> tuple[bool, frozenset[str]]:
            nonlocal left
            took_all_due, left_out = await record(batch, claim_again=claim_again)
            left += len(left_out)
            return took_all_due, left_out

        svc.deliverer._record = counting  # type: ignore[method-assign]
        acme = await new_tenant(pool, svc, "Acme")
        ep = await acme.endpoint(receiver.url("/limited"), rate_limit=10000)
        stop = asyncio.Event()

        async def claims_elsewhere() -> None:
            async with admin_pool.acquire() as conn:
                while not stop.is_set():
                    await conn.fetch(
                        "SELECT * FROM tenantry.webhook_claim('elsewhere', 10,"
                        " gen_random_uuid(), 0, 10, 30, 100)"
                    )

        claimers = [asyncio.create_task(claims_elsewhere()) for _ in range(3)]
        try:
            for k in range(200):
                await acme.emit(pool, "invoice.paid", {"k": k})

            async def all_delivered() -> bool:
                n = await admin_pool.fetchval(
                    "SELECT count(*) FROM tenantry.webhook_deliveries"
                    " WHERE endpoint_id = $1 AND state = 'delivered'",
                    uuid.UUID(ep["id"]),
                )
                return bool(n == 200)

            await eventually(all_delivered, timeout=60)
        finally:
            stop.set()
            await asyncio.gather(*claimers)
        assert left == 0


async def test_left_out_results_are_tried_again_on_their_own_pause_not_with_every_record(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """Left-out results went with every record of the process: each try rewrote their
    deliveries' rows (the lease) and, waiting for the held row, delays the record
    (attack: 73 of them while 300 other deliveries went through)."""
    async with running_receiver() as receiver, service(tmp_path, app_url, pool, worker_pool) as svc:
        acme = await new_tenant(pool, svc, "Acme")
        other = await new_tenant(pool, svc, "Other")
        held = await acme.endpoint(receiver.url("/held"))
        await other.endpoint(receiver.url("/other"))
        tries = 0
        record = svc.deliverer._record

        async def counting(
            batch: list[dict[str, object]], *, claim_again: bool = False
        ) -> tuple[bool, frozenset[str]]:
            nonlocal tries
            took_all_due, left_out = await record(batch, claim_again=claim_again)
            tries += bool(left_out)
            return took_all_due, left_out

        svc.deliverer._record = counting  # type: ignore[method-assign]
        async with _updated_in_an_open_transaction(admin_pool, held["id"]):
            for _ in range(4):
                await acme.emit(pool, "invoice.paid")
            await receiver.wait_count("/held", 4)

            async def left_out() -> bool:
                return len(svc.deliverer._results) == 4 and not svc.deliverer.in_flight

            await eventually(left_out)
            tries, started = 0, time.monotonic()
            for _ in range(300):
                await other.emit(pool, "invoice.paid")
            await receiver.wait_count("/other", 300, timeout=30)
            # Pauses of 50 ms doubling to a second: about one try a second at most.
            assert tries <= 6 + (time.monotonic() - started), tries
        await _until_states(admin_pool, acme, [("delivered", 1)] * 4)


def _refused_for(svc: Service, path: str) -> None:
    """Results of attempts to `path` are ones the database refuses (request headers
    NULL): their batch is recorded one by one, theirs without its details."""
    attempt = svc.deliverer._attempt

    async def refused(session: aiohttp.ClientSession, row: Any) -> dict[str, Any]:
        result = await attempt(session, row)
        if row.url.endswith(path):
            result["request_headers"] = None
        return result

    svc.deliverer._attempt = refused  # type: ignore[method-assign]


async def test_a_pause_ends_with_its_endpoints_last_result_whatever_path_recorded_it(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:  # fmt: skip
    """A left-out result later recorded on the error path (one by one) left its
    endpoint's pause behind, long over: while another endpoint's row was held, the
    record loop found a pause due at once, flushed nothing, and did so again, some
    15,000 times a second (attack, 0cc6136)."""
    async with running_receiver() as receiver, service(tmp_path, app_url, pool, worker_pool) as svc:
        acme = await new_tenant(pool, svc, "Acme")
        other = await new_tenant(pool, svc, "Other")
        refused = await acme.endpoint(receiver.url("/refused"))
        held = await other.endpoint(receiver.url("/held"))
        _refused_for(svc, "/refused")
        deliverer = svc.deliverer
        async with _updated_in_an_open_transaction(admin_pool, refused["id"]):
            await acme.emit(pool, "invoice.paid")

            async def paused() -> bool:
                return len(deliverer._results) == 1 and refused["id"] in deliverer._held_until

            await eventually(paused)
        await _until_states(admin_pool, acme, [("delivered", 1)])  # one by one, later
        flushes = 0
        flush = deliverer._flush

        async def counting(*, claim_again: bool = False, every: bool = False) -> None:
            nonlocal flushes
            flushes += 1
            await flush(claim_again=claim_again, every=every)

        deliverer._flush = counting  # type: ignore[method-assign]
        async with _updated_in_an_open_transaction(admin_pool, held["id"]):
            await other.emit(pool, "invoice.paid")

            async def left_out() -> bool:
                return held["id"] in deliverer._held_until

            await eventually(left_out)
            flushes = 0

            async def tried_three_more_times() -> bool:  # 100, 200, 400 ms apart
                return deliverer._held_pause.get(held["id"], 0.0) >= 0.4

            await eventually(tried_three_more_times)
            assert flushes < 20, flushes  # a flush a try, not thousands
        await _until_states(admin_pool, other, [("delivered", 1)])
