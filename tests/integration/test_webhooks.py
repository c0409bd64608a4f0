"""Webhooks end to end in one process: the tenant API registers endpoints, events
appended to the outbox reach a real receiver on loopback signed (verified with the
independent `standardwebhooks` package), and every attempt is on record."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from standardwebhooks.webhooks import WebhookVerificationError

from tenantry import roles, tenant_tx
from tenantry.app import Service
from tenantry.outbox.store import emit
from tenantry.tenants import store
from tests.helpers import (
    TEST_SECRET_KEY,
    background_service,
    eventually,
    service_settings,
    wait_lock_waiter,
)
from tests.receiver import (
    Receiver,
    answer,
    endless_body,
    hang,
    redirect,
    reset,
    running_receiver,
    slow_body,
)


@asynccontextmanager
async def service(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool, **overrides: Any
) -> AsyncIterator[Service]:
    settings = service_settings(tmp_path, **overrides)
    async with background_service(settings, app_url, pool, worker_pool) as svc:
        yield svc


class Tenant:
    """A tenant with an API key, and a client of the service that sends it."""

    def __init__(self, tenant_id: uuid.UUID, key: str, base: str) -> None:
        self.id = tenant_id
        self.key = key
        self.base = base

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.key}"}
        async with (
            aiohttp.ClientSession() as s,
            s.request(method, self.base + path, json=body, headers=headers, **kw) as r,
        ):
            return r.status, await r.json(content_type=None) if r.content_length != 0 else None

    async def endpoint(self, url: str, **fields: Any) -> dict[str, Any]:
        status, body = await self.call("POST", "/v1/webhook-endpoints", {"url": url, **fields})
        assert status == 201, body
        return dict(body)

    async def emit(self, pool: asyncpg.Pool, event_type: str, payload: Any = None) -> int:
        async with tenant_tx(pool, self.id) as tx:
            return await emit(
                tx,
                tenant_id=self.id,
                aggregate_type="thing",
                aggregate_id=str(uuid.uuid4()),
                event_type=event_type,
                payload=payload or {},
            )

    async def delivery(self, delivery_id: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/v1/webhook-deliveries/{delivery_id}")
        assert status == 200, body
        return dict(body)

    async def deliveries(self, **query: str) -> list[dict[str, Any]]:
        status, body = await self.call("GET", "/v1/webhook-deliveries", params=query)
        assert status == 200, body
        return list(body["data"])

    async def wait_deliveries(self, n: int, **query: str) -> list[dict[str, Any]]:
        """The deliveries once there are `n` (the fan-out makes them after the commit,
        in the background)."""
        found: list[dict[str, Any]] = []

        async def enough() -> bool:
            found[:] = await self.deliveries(**query)
            return len(found) >= n

        await eventually(enough)
        return found


async def new_tenant(pool: asyncpg.Pool, svc: Service, name: str = "Acme Inc") -> Tenant:
    t = await store.create_tenant(pool, name=name)
    key = await store.create_key(pool, t.id)
    return Tenant(t.id, key.secret, f"http://127.0.0.1:{svc.http.port}")


async def finished(tenant: Tenant, delivery_id: str, timeout: float = 20) -> dict[str, Any]:
    """The delivery once it left pending/sending (polled: its state changes in the
    database, where no event reaches the test)."""
    seen: dict[str, Any] = {}

    async def done() -> bool:
        seen.update(await tenant.delivery(delivery_id))
        return seen["state"] not in ("pending", "sending")

    await eventually(done, timeout)
    return seen


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as r:
        yield r


@pytest.fixture
async def svc(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[Service]:
    async with service(tmp_path, app_url, pool, worker_pool) as s:
        yield s


async def test_an_event_reaches_the_endpoint_signed_as_standard_webhooks_says(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    ep = await acme.endpoint(receiver.url("/hook"), description="billing")
    assert ep["secret"].startswith("whsec_") and ep["enabled"] is True
    assert ep["circuit"]["state"] == "closed"

    event_id = await acme.emit(pool, "invoice.paid", {"invoice": 42, "note": "ünïcode ✓"})
    [got] = await receiver.wait_count("/hook", 1)

    payload = got.verify(ep["secret"])  # raises unless the signature verifies
    assert payload["type"] == "invoice.paid"
    assert payload["data"] == {"invoice": 42, "note": "ünïcode ✓"}
    assert payload["timestamp"].endswith("Z")
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"].startswith("Tenantry-Webhooks/")
    assert got.webhook_id.startswith("msg_")
    with pytest.raises(WebhookVerificationError):
        got.verify("whsec_" + "QUJD" * 8)  # another secret does not verify it

    [listed] = await acme.deliveries()
    assert listed["event_id"] == event_id and listed["webhook_id"] == got.webhook_id
    done = await finished(acme, listed["id"])
    assert done["state"] == "delivered" and done["attempts"] == 1
    [attempt] = done["attempt_log"]
    assert attempt["result"] == "delivered" and attempt["response"]["status"] == 204
    assert attempt["request"]["body"] == got.body.decode()
    assert attempt["request"]["headers"]["webhook-signature"] == got.headers["webhook-signature"]


async def test_endpoints_get_only_the_events_they_subscribed_to(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    await acme.endpoint(receiver.url("/invoices"), event_types=["invoice.*"])
    await acme.endpoint(receiver.url("/users"), event_types=["user.created"])
    await acme.endpoint(receiver.url("/all"))
    other = await new_tenant(pool, svc, "Other Co")
    await other.endpoint(receiver.url("/other"))

    for t in ("invoice.paid", "invoice.voided", "user.created", "user.deleted", "invoices.x"):
        await acme.emit(pool, t)
    await receiver.wait_count("/all", 5)
    await receiver.wait_count("/invoices", 2)
    await receiver.wait_count("/users", 1)
    # Every matching delivery has arrived once all five reached /all: nothing more comes.
    types = {p: sorted(r.json()["type"] for r in receiver.at(p)) for p in ("/invoices", "/users")}
    assert types == {"/invoices": ["invoice.paid", "invoice.voided"], "/users": ["user.created"]}
    assert receiver.at("/other") == []  # another tenant's events never reach it


async def test_a_failing_delivery_is_retried_then_delivered_with_every_attempt_logged(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    ep = await acme.endpoint(receiver.url("/flaky"), retry_schedule=[0, 0, 0, 0])
    answers = iter([answer(500, body=b"boom"), answer(503), answer(200, body=b"ok")])

    async def flaky(request: web.Request) -> web.StreamResponse:
        return await next(answers)(request)

    receiver.on("/flaky", flaky)
    await acme.emit(pool, "invoice.paid")
    got = await receiver.wait_count("/flaky", 3)
    assert len({r.webhook_id for r in got}) == 1  # receivers deduplicate by it
    for r in got:
        r.verify(ep["secret"])
    [d] = await acme.wait_deliveries(1)
    done = await finished(acme, d["id"])
    assert done["state"] == "delivered" and done["attempts"] == 3
    log = done["attempt_log"]
    assert [a["result"] for a in log] == ["failed", "failed", "delivered"]
    assert [a["response"]["status"] for a in log] == [500, 503, 200]
    assert log[0]["response"]["body"] == "boom"


async def test_retries_run_out_into_the_dead_letters_with_the_full_log(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    await acme.endpoint(receiver.url("/down"), retry_schedule=[0, 0, 0])
    receiver.on("/down", answer(500, body=b"down for maintenance"))
    await acme.emit(pool, "invoice.paid")
    [d] = await acme.wait_deliveries(1)
    done = await finished(acme, d["id"])
    assert (done["state"], done["reason"], done["attempts"]) == ("dead", "exhausted", 3)
    assert len(done["attempt_log"]) == 3
    assert all(a["response"]["body"] == "down for maintenance" for a in done["attempt_log"])
    assert len(receiver.at("/down")) == 3


@pytest.mark.parametrize(
    ("behaviour", "error_class"),
    [(hang, "timeout"), (reset, "reset")],
    ids=["timeout", "reset"],
)
async def test_no_response_is_a_failed_attempt_with_its_error_class(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver, behaviour: Any, error_class: str
) -> None:
    acme = await new_tenant(pool, svc)
    await acme.endpoint(receiver.url("/x"), retry_schedule=[0], timeout_seconds=1)
    receiver.on("/x", behaviour)
    await acme.emit(pool, "invoice.paid")
    [d] = await acme.wait_deliveries(1)
    done = await finished(acme, d["id"])
    assert done["state"] == "dead"
    [attempt] = done["attempt_log"]
    assert attempt["error_class"] == error_class and attempt["response"] is None


async def test_a_connection_refused_is_a_connect_error(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    # A port nobody listens on: bind one, note it, close it.
    sock = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = sock.sockets[0].getsockname()[1]
    sock.close()
    await sock.wait_closed()
    await acme.endpoint(f"http://127.0.0.1:{port}/nobody", retry_schedule=[0])
    await acme.emit(pool, "invoice.paid")
    [d] = await acme.wait_deliveries(1)
    done = await finished(acme, d["id"])
    assert done["attempt_log"][0]["error_class"] == "connect"


async def test_a_redirect_is_a_failure_and_is_not_followed(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    await acme.endpoint(receiver.url("/moved"), retry_schedule=[0])
    receiver.on("/moved", redirect(receiver.url("/target")))
    await acme.emit(pool, "invoice.paid")
    [d] = await acme.wait_deliveries(1)
    done = await finished(acme, d["id"])
    assert done["state"] == "dead" and done["attempt_log"][0]["response"]["status"] == 302
    assert receiver.at("/target") == []


async def test_an_endless_body_is_read_up_to_the_cap(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    receiver: Receiver,
) -> None:  # fmt: skip
    async with service(tmp_path, app_url, pool, worker_pool, webhook_log_body_bytes=1000) as svc:
        acme = await new_tenant(pool, svc)
        await acme.endpoint(receiver.url("/endless"))
        receiver.on("/endless", endless_body)
        await acme.emit(pool, "invoice.paid", {"big": "y" * 5000})
        [d] = await acme.wait_deliveries(1)
        done = await finished(acme, d["id"])
    assert done["state"] == "delivered"
    [attempt] = done["attempt_log"]
    assert attempt["response"]["body"] == "x" * 1000
    assert len(attempt["request"]["body"]) == 1000


async def test_the_abort_header_ends_the_retries(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    await acme.endpoint(receiver.url("/abort"), retry_schedule=[0, 0, 0])
    receiver.on("/abort", answer(400, {"webhook-delivery": "abort-message"}))
    await acme.emit(pool, "invoice.paid")
    [d] = await acme.wait_deliveries(1)
    done = await finished(acme, d["id"])
    assert (done["state"], done["reason"], done["attempts"]) == ("dead", "aborted", 1)
    assert len(receiver.at("/abort")) == 1


async def test_410_gone_disables_the_endpoint_and_tells_the_tenants_other_endpoints(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    gone = await acme.endpoint(receiver.url("/gone"), event_types=["invoice.*"])
    await acme.endpoint(receiver.url("/ops"), event_types=["webhook.endpoint.*"])
    receiver.on("/gone", answer(410))
    await acme.emit(pool, "invoice.paid")
    [note] = await receiver.wait_count("/ops", 1)
    body = note.json()
    assert body["type"] == "webhook.endpoint.disabled"
    assert body["data"]["endpoint_id"] == gone["id"]
    assert "410" in body["data"]["reason"]
    _, ep = await acme.call("GET", f"/v1/webhook-endpoints/{gone['id']}")
    assert ep["enabled"] is False and "410" in ep["disabled_reason"]
    # Later events do not go to a disabled endpoint.
    await acme.emit(pool, "invoice.voided")
    await acme.emit(pool, "webhook.endpoint.probe")  # reaches /ops: the fan-out has passed
    await receiver.wait_count("/ops", 2)
    assert len(receiver.at("/gone")) == 1


async def test_a_rotated_secret_signs_beside_the_new_one_during_the_grace(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    ep = await acme.endpoint(receiver.url("/rot"))
    old = ep["secret"]
    status, rotated = await acme.call("POST", f"/v1/webhook-endpoints/{ep['id']}/rotate-secret")
    assert status == 200 and rotated["secret"] != old
    assert rotated["previous_secret_expires_at"] is not None
    await acme.emit(pool, "invoice.paid")
    [got] = await receiver.wait_count("/rot", 1)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    got.verify(old)  # a receiver still holding the old secret verifies
    got.verify(rotated["secret"])  # and one that switched already does too

    given = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    status, again = await acme.call(
        "POST", f"/v1/webhook-endpoints/{ep['id']}/rotate-secret", {"secret": given}
    )
    assert status == 200 and again["secret"] == given
    await acme.emit(pool, "invoice.voided")
    got = (await receiver.wait_count("/rot", 2))[1]
    got.verify(given)
    with pytest.raises(WebhookVerificationError):
        got.verify(old)  # two rotations back: no longer signing


async def test_the_test_route_sends_a_test_event_to_that_endpoint_only(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    ep = await acme.endpoint(receiver.url("/a"))
    await acme.endpoint(receiver.url("/b"))
    status, body = await acme.call("POST", f"/v1/webhook-endpoints/{ep['id']}/test")
    assert status == 202
    [got] = await receiver.wait_count("/a", 1)
    assert got.verify(ep["secret"])["type"] == "webhook.test"
    done = await finished(acme, body["delivery_id"])
    assert done["state"] == "delivered"
    # The fan-out has passed the test event (an event after it reached /b) and made no
    # second delivery of it.
    await acme.emit(pool, "after.test")
    # /a and /b are delivered concurrently: wait for each on its own (CI once read /a
    # between the two arrivals).
    await receiver.wait_count("/b", 1)
    await receiver.wait_count("/a", 2)
    assert [r.json()["type"] for r in receiver.at("/b")] == ["after.test"]
    assert [r.json()["type"] for r in receiver.at("/a")] == ["webhook.test", "after.test"]


async def test_replay_and_recover_send_failed_deliveries_again(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    ep = await acme.endpoint(receiver.url("/r"), retry_schedule=[0])
    receiver.on("/r", answer(500))
    for _ in range(3):
        await acme.emit(pool, "invoice.paid")
    await eventually(
        lambda: _all_in_state(acme, "dead", 3),
    )
    receiver.on("/r", answer(204))
    first = (await acme.deliveries())[0]
    status, _ = await acme.call("POST", f"/v1/webhook-deliveries/{first['id']}/replay")
    assert status == 202
    assert (await finished(acme, first["id"]))["state"] == "delivered"
    status, body = await acme.call(
        "POST", f"/v1/webhook-endpoints/{ep['id']}/recover", {"since": "2000-01-01T00:00:00Z"}
    )
    assert (status, body["replaying"]) == (202, 2)
    await eventually(lambda: _all_in_state(acme, "delivered", 3))
    again = await acme.delivery(first["id"])
    # A replayed delivery keeps its webhook-id, and its log keeps every attempt.
    assert [a["result"] for a in again["attempt_log"]] == ["failed", "delivered"]
    status, _ = await acme.call("POST", f"/v1/webhook-deliveries/{first['id']}/replay")
    assert status == 202  # a delivered one may be sent again on purpose


async def _all_in_state(tenant: Tenant, state: str, n: int) -> bool:
    rows = await tenant.deliveries()
    return len(rows) == n and all(r["state"] == state for r in rows)


async def test_deleting_an_endpoint_cancels_its_waiting_deliveries(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    ep = await acme.endpoint(receiver.url("/later"), retry_schedule=[0, 3600])
    receiver.on("/later", answer(500))
    await acme.emit(pool, "invoice.paid")
    await receiver.wait_count("/later", 1)
    [d] = await acme.wait_deliveries(1)

    async def waiting() -> bool:
        now = await acme.delivery(d["id"])
        return bool(now["attempts"] == 1 and now["state"] == "pending")

    await eventually(waiting)
    status, body = await acme.call("DELETE", f"/v1/webhook-endpoints/{ep['id']}")
    assert (status, body["cancelled_deliveries"]) == (200, 1)
    done = await acme.delivery(d["id"])
    assert (done["state"], done["reason"]) == ("cancelled", "endpoint_deleted")
    status, _ = await acme.call("GET", f"/v1/webhook-endpoints/{ep['id']}")
    assert status == 404


async def test_a_hanging_endpoint_holds_only_its_own_places(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    await acme.endpoint(receiver.url("/hang"), timeout_seconds=30, retry_schedule=[0])
    receiver.on("/hang", hang)
    others = [await new_tenant(pool, svc, f"Tenant {i}") for i in range(3)]
    for i, t in enumerate(others):
        await t.endpoint(receiver.url(f"/ok{i}"))
    for _ in range(20):
        await acme.emit(pool, "invoice.paid")
    await receiver.wait_count("/hang", 4)
    for _ in range(30):
        for t in others:
            await t.emit(pool, "invoice.paid")
    for i in range(3):
        await receiver.wait_count(f"/ok{i}", 30)
    # The hanging endpoint never had more than its limit in flight.
    assert len(receiver.at("/hang")) == 4


async def test_tenants_see_and_change_only_their_own_endpoints_and_deliveries(
    svc: Service, pool: asyncpg.Pool, admin_pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    rival = await new_tenant(pool, svc, "Rival Ltd")
    ep = await acme.endpoint(receiver.url("/mine"))
    await acme.emit(pool, "invoice.paid")
    await receiver.wait_count("/mine", 1)
    [d] = await acme.wait_deliveries(1)
    for method, path, body in [
        ("GET", f"/v1/webhook-endpoints/{ep['id']}", None),
        ("PATCH", f"/v1/webhook-endpoints/{ep['id']}", {"description": "mine now"}),
        ("DELETE", f"/v1/webhook-endpoints/{ep['id']}", None),
        ("POST", f"/v1/webhook-endpoints/{ep['id']}/rotate-secret", None),
        ("POST", f"/v1/webhook-endpoints/{ep['id']}/test", None),
        ("POST", f"/v1/webhook-endpoints/{ep['id']}/recover", {"since": "2000-01-01T00:00:00Z"}),
        ("GET", f"/v1/webhook-deliveries/{d['id']}", None),
        ("POST", f"/v1/webhook-deliveries/{d['id']}/replay", None),
    ]:
        status, answer_body = await rival.call(method, path, body)
        assert status == 404, (method, path, answer_body)
    assert (await rival.call("GET", "/v1/webhook-endpoints"))[1]["data"] == []
    assert await rival.deliveries() == []
    status, _ = await acme.call("GET", f"/v1/webhook-endpoints/{ep['id']}")
    assert status == 200
    # The secret is shown once, and stored only encrypted.
    _, shown = await acme.call("GET", f"/v1/webhook-endpoints/{ep['id']}")
    assert "secret" not in shown
    dump = await admin_pool.fetchval(
        "SELECT string_agg(t::text, '') FROM tenantry.webhook_endpoints t"
    )
    raw = ep["secret"].removeprefix("whsec_")
    assert raw not in dump and ep["secret"] not in dump
    assert "\\x01" in dump  # the sealed form's version byte, hex-escaped


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "url"),
        ({"url": "ftp://example.com/x"}, "url"),
        ({"url": "http://user:pw@127.0.0.1/x"}, "url"),
        ({"url": "http://127.0.0.1/x#frag"}, "url"),
        ({"url": 5}, "url"),
        ({"url": "http://127.0.0.1/x", "event_types": "invoice.paid"}, "event_types"),
        ({"url": "http://127.0.0.1/x", "event_types": ["bad type!"]}, "event_types"),
        ({"url": "http://127.0.0.1/x", "headers": {"webhook-id": "x"}}, "headers"),
        ({"url": "http://127.0.0.1/x", "headers": {"X-A": "a\r\nb"}}, "headers"),
        ({"url": "http://127.0.0.1/x", "rate_limit": 0}, "rate_limit"),
        ({"url": "http://127.0.0.1/x", "timeout_seconds": 61}, "timeout_seconds"),
        ({"url": "http://127.0.0.1/x", "retry_schedule": []}, "retry_schedule"),
        ({"url": "http://127.0.0.1/x", "secret": "hunter2"}, "secret"),
        ({"url": "http://127.0.0.1/x", "secret": "whsec_" + "QUJD" * 2}, "secret"),
        ({"url": "http://127.0.0.1/x", "description": "x" * 501}, "description"),
        ({"url": "http://127.0.0.1/x", "colour": "red"}, "colour"),
        # `$` in a pattern matches before a final newline: these were accepted, and the
        # header then failed every attempt, the type never matched.
        ({"url": "http://127.0.0.1/x", "headers": {"X-A\n": "a"}}, "headers"),
        ({"url": "http://127.0.0.1/x", "event_types": ["inv.paid\n"]}, "event_types"),
    ],
)
async def test_bad_endpoint_fields_are_a_422_naming_the_field_and_change_nothing(
    svc: Service, pool: asyncpg.Pool, body: dict[str, Any], field: str
) -> None:
    acme = await new_tenant(pool, svc)
    status, problem = await acme.call("POST", "/v1/webhook-endpoints", body)
    assert status == 422, problem
    assert field in [e["field"] for e in problem["errors"]]
    assert "hunter2" not in str(problem)  # a given secret is never echoed
    assert (await acme.call("GET", "/v1/webhook-endpoints"))[1]["data"] == []


async def test_without_a_key_every_webhook_route_is_401(svc: Service) -> None:
    base = f"http://127.0.0.1:{svc.http.port}"
    async with aiohttp.ClientSession() as s:
        for method, path in [
            ("GET", "/v1/webhook-endpoints"),
            ("POST", "/v1/webhook-endpoints"),
            ("GET", "/v1/webhook-deliveries"),
        ]:
            async with s.request(method, base + path) as r:
                assert r.status == 401
                assert r.content_type == "application/problem+json"


async def test_poison_in_events_and_responses_is_recorded_not_fatal(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    ep = await acme.endpoint(receiver.url("/poison"), retry_schedule=[0, 0])
    weird = answer(500, {"X-Weird": "caf\u00e9"}, body=b"\x00nul \xff\xfe not utf-8 \xed\xa0\x80")
    answers = iter([weird, answer(204)])

    async def poison(request: web.Request) -> web.StreamResponse:
        return await next(answers)(request)

    receiver.on("/poison", poison)
    deep: Any = "bottom"
    for _ in range(200):
        deep = {"d": deep}
    await acme.emit(pool, "invoice.paid", {"deep": deep, "emoji": "🎉", "big": "z" * 100_000})
    got = await receiver.wait_count("/poison", 2)
    assert got[1].verify(ep["secret"])["data"]["emoji"] == "🎉"
    [d] = await acme.wait_deliveries(1)
    done = await finished(acme, d["id"])
    assert done["state"] == "delivered"
    first = done["attempt_log"][0]
    assert first["response"]["status"] == 500 and "nul" in first["response"]["body"]


async def test_operators_list_show_replay_and_discard_across_tenants(
    svc: Service, pool: asyncpg.Pool, app_url: str, database_url: str, receiver: Receiver
) -> None:
    from tests.acceptance.process import run_cli  # noqa: PLC0415

    acme = await new_tenant(pool, svc)
    rival = await new_tenant(pool, svc, "Rival Ltd")
    await acme.endpoint(receiver.url("/a"), retry_schedule=[0])
    await rival.endpoint(receiver.url("/b"), retry_schedule=[0])
    receiver.on("/a", answer(500))
    receiver.on("/b", answer(500))
    for t in (acme, acme, rival):
        await t.emit(pool, "invoice.paid")
    await eventually(lambda: _all_in_state(acme, "dead", 2))
    await eventually(lambda: _all_in_state(rival, "dead", 1))

    code, out, _ = await run_cli(
        "webhooks", "deliveries", "--state", "dead", database_url=database_url
    )
    assert code == 0 and len(out.splitlines()) == 3
    code, out, _ = await run_cli("webhooks", "stats", "--json", database_url=database_url)
    assert code == 0 and '"dead":3' in out and '"fanout_lag_events":0' in out
    code, out, _ = await run_cli("jobs", "stats", database_url=database_url)
    assert code == 0 and "webhooks: fan-out lag 0 events" in out and "dead 3" in out
    [one] = await rival.deliveries()
    code, out, _ = await run_cli("webhooks", "show", one["id"], database_url=database_url)
    assert code == 0 and '"attempt_log"' in out and '"response_status": 500' in out

    code, out, _ = await run_cli(
        "webhooks", "replay", "--tenant", str(acme.id), database_url=database_url
    )
    assert (code, out.strip()) == (0, "2 deliveries match; nothing done (add --yes to replay them)")
    receiver.on("/a", answer(204))
    code, out, _ = await run_cli(
        "webhooks", "replay", "--tenant", str(acme.id), "--yes", database_url=database_url
    )
    assert (code, out.strip()) == (0, "replaying 2 deliveries")
    await eventually(lambda: _all_in_state(acme, "delivered", 2))

    code, out, _ = await run_cli("webhooks", "discard", one["id"], database_url=database_url)
    assert (code, out.strip()) == (0, f"discarded delivery {one['id']}")
    kept = await rival.delivery(one["id"])
    assert (kept["state"], kept["reason"]) == ("cancelled", "discarded")
    assert len(kept["attempt_log"]) == 1  # the record stays
    code, _, err = await run_cli("webhooks", "discard", one["id"], database_url=database_url)
    assert code == 1
    code, _, err = await run_cli(
        "webhooks", "replay", one["id"], "--yes", database_url=database_url
    )
    assert code == 2 and "not both" in err
    code, _, err = await run_cli("webhooks", "show", "not-a-uuid", database_url=database_url)
    assert code == 2
    # A state a replay can never match, an event type no event can have: usage errors.
    code, _, err = await run_cli(
        "webhooks", "replay", "--state", "pending", database_url=database_url
    )
    assert code == 2 and "--state" in err
    code, _, err = await run_cli(
        "webhooks", "deliveries", "--event-type", "bad type", database_url=database_url
    )
    assert code == 2 and "--event-type" in err
    code, out, _ = await run_cli(
        "webhooks", "discard", "--state", "dead", database_url=database_url
    )
    assert (code, out.strip()) == (
        0,
        "0 deliveries match; nothing done (add --yes to discard them)",
    )


async def test_a_slow_body_past_the_timeout_is_a_timeout(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    await acme.endpoint(receiver.url("/slow"), retry_schedule=[0], timeout_seconds=1)
    receiver.on("/slow", slow_body)
    await acme.emit(pool, "invoice.paid")
    [d] = await acme.wait_deliveries(1)
    done = await finished(acme, d["id"])
    [attempt] = done["attempt_log"]
    # The status line came at once; the whole response did not come within the timeout.
    assert (attempt["error_class"], attempt["response"]) == ("timeout", None)


async def test_without_allowed_networks_private_addresses_are_refused_at_every_step(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    receiver: Receiver,
) -> None:  # fmt: skip
    async with service(
        tmp_path, app_url, pool, worker_pool, webhook_allow_networks="", webhook_allow_http=True
    ) as svc:  # fmt: skip
        acme = await new_tenant(pool, svc)
        for url in (
            receiver.url("/x"),
            "http://localhost/x",
            "http://[::1]/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/x",
            "http://0.0.0.0/x",
        ):
            status, problem = await acme.call("POST", "/v1/webhook-endpoints", {"url": url})
            assert status == 422, (url, problem)
            assert problem["errors"][0]["field"] == "url"
        # A name that resolved to a public address at registration and resolves to
        # loopback when the delivery is sent (DNS rebinding): refused, never connected.
        answers = {"rebind.example": ["93.184.216.34"]}

        async def lookup(host: str) -> list[str]:
            return answers[host]

        svc.deliverer._guard._lookup = lookup
        ep = await acme.endpoint(f"http://rebind.example:{receiver.port}/x", retry_schedule=[0])
        answers["rebind.example"] = ["127.0.0.1"]
        await acme.emit(pool, "invoice.paid")
        [d] = await acme.wait_deliveries(1)
        done = await finished(acme, d["id"])
    [attempt] = done["attempt_log"]
    assert (attempt["result"], attempt["error_class"]) == ("refused", "refused")
    assert "127.0.0.1" in attempt["error"]
    assert receiver.requests == []
    assert ep["url"].startswith("http://rebind.example")


async def test_an_endpoint_shows_its_circuit_history(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    receiver: Receiver,
) -> None:  # fmt: skip
    async with service(
        tmp_path, app_url, pool, worker_pool,
        webhook_breaker_failures=2, webhook_breaker_volume=1000, webhook_breaker_cooldown=0.2,
    ) as svc:  # fmt: skip
        acme = await new_tenant(pool, svc)
        ep = await acme.endpoint(receiver.url("/h"), retry_schedule=[0] * 5)
        answers = [answer(500), answer(500)]

        async def flaky(request: web.Request) -> web.StreamResponse:
            # Two failures, then success for everything (the circuit's own events
            # come to this endpoint too: it subscribed to every event).
            return await (answers.pop(0) if answers else answer(204))(request)

        receiver.on("/h", flaky)
        await acme.emit(pool, "invoice.paid")
        [d] = await acme.wait_deliveries(1, event_type="invoice.paid")
        await finished(acme, d["id"])

        async def closed_again() -> bool:
            _, shown = await acme.call("GET", f"/v1/webhook-endpoints/{ep['id']}")
            return [h["type"] for h in shown["history"]] == [
                "webhook.endpoint.circuit_opened",
                "webhook.endpoint.circuit_closed",
            ]

        await eventually(closed_again)


async def test_retention_prunes_old_attempts_and_finished_deliveries_but_keeps_dead_ones(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    from tenantry.webhooks import upkeep  # noqa: PLC0415

    # No service running: its maintenance would prune these rows too.
    acme = await store.create_tenant(pool, name="Acme Inc")
    for state, age in (("delivered", 40), ("dead", 40), ("delivered", 1), ("cancelled", 40)):
        d = uuid.uuid4()
        await admin_pool.execute(
            "INSERT INTO tenantry.webhook_deliveries (tenant_id, id, endpoint_id, event_id,"
            " event_type, body, state, finished_at) VALUES ($1, $2, $2, $3, 'x', '{}', $4,"
            " now() - make_interval(days => $5))",
            acme.id, d, abs(hash(d)) % 1_000_000, state, age,
        )  # fmt: skip
        await admin_pool.execute(
            "INSERT INTO tenantry.webhook_attempts (tenant_id, delivery_id, endpoint_id,"
            " attempt, attempted_at, url, result, request_headers, request_body, duration_ms)"
            " VALUES ($1, $2, $2, 1, now() - make_interval(days => $3), 'u', 'failed', '{}',"
            " '', 1)",
            acme.id, d, age,
        )  # fmt: skip
    pruned = await upkeep.prune(worker_pool, 30, 1000)
    left = await admin_pool.fetch(
        "SELECT d.state, (SELECT count(*) FROM tenantry.webhook_attempts a"
        " WHERE a.delivery_id = d.id) AS attempts FROM tenantry.webhook_deliveries d"
        " ORDER BY d.state"
    )
    assert [(r["state"], r["attempts"]) for r in left] == [("dead", 1), ("delivered", 1)]
    assert pruned == 4  # 2 deliveries, 2 attempts


async def test_operators_register_and_remove_a_tenants_endpoint_from_the_command_line(
    svc: Service, pool: asyncpg.Pool, database_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    from tests.acceptance.process import run_cli  # noqa: PLC0415

    acme = await new_tenant(pool, svc)
    env = {
        "TENANTRY_SECRET_KEY": TEST_SECRET_KEY,  # the service's: it must open the secret
        "TENANTRY_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
        "TENANTRY_WEBHOOK_ALLOW_HTTP": "true",
        "TENANTRY_DATA_DIR": str(tmp_path / "cli"),
    }

    async def cli(*args: str) -> tuple[int, str, str]:
        return await run_cli("webhooks", *args, database_url=database_url, env=env)

    code, out, err = await cli(
        "add", str(acme.id), receiver.url("/cli"), "--event-type", "invoice.*"
    )
    assert code == 0, err
    endpoint_id, secret = out.split()
    await acme.emit(pool, "invoice.paid")
    [got] = await receiver.wait_count("/cli", 1)
    assert got.verify(secret)["type"] == "invoice.paid"

    code, out, _ = await cli("disable", str(acme.id), endpoint_id)
    assert (code, out.strip()) == (0, f"endpoint {endpoint_id} disabled")
    code, out, _ = await cli("enable", str(acme.id), endpoint_id)
    assert (code, out.strip()) == (0, f"endpoint {endpoint_id} enabled")
    code, _, err = await cli("add", str(acme.id), "ftp://example.com/")
    assert code == 2 and "url:" in err
    code, _, err = await cli("add", str(acme.id), receiver.url("/x"), "--event-type", "bad type")
    assert code == 2 and "event_types:" in err
    code, out, _ = await cli("remove", str(acme.id), endpoint_id)
    assert code == 0 and out.startswith(f"removed endpoint {endpoint_id}")
    code, _, err = await cli("remove", str(acme.id), endpoint_id)
    assert code == 1 and "no webhook endpoint" in err
    # Another tenant's endpoint is not found through this tenant.
    code, out, _ = await cli("add", str(acme.id), receiver.url("/cli2"))
    rival = await new_tenant(pool, svc, "Rival Ltd")
    code, _, err = await cli("remove", str(rival.id), out.split()[0])
    assert code == 1


async def test_a_soft_stop_lets_attempts_in_flight_finish_and_records_them(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    await acme.endpoint(receiver.url("/slowly"))
    release = receiver.hold("/slowly")
    await acme.emit(pool, "invoice.paid")
    await receiver.wait_count("/slowly", 1)  # in flight now
    stopping = asyncio.create_task(svc.deliverer.shutdown(grace=10))
    await svc.deliverer.claims_stopped.wait()  # the stop has begun before the answer
    release.set()
    await stopping
    [d] = await acme.deliveries()
    assert (d["state"], d["attempts"]) == ("delivered", 1)


async def test_retry_after_on_429_sets_when_the_next_attempt_comes(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    acme = await new_tenant(pool, svc)
    # Scheduled 1 s later (±20%); the endpoint asks for 2 s, which is within twice it.
    await acme.endpoint(receiver.url("/busy"), retry_schedule=[0, 1])
    answers = [answer(429, {"Retry-After": "2"})]

    async def busy(request: web.Request) -> web.StreamResponse:
        return await (answers.pop(0) if answers else answer(204))(request)

    receiver.on("/busy", busy)
    await acme.emit(pool, "invoice.paid")
    first, second = await receiver.wait_count("/busy", 2)
    assert second.at - first.at >= 1.9
    [d] = await acme.deliveries()
    done = await finished(acme, d["id"])
    assert [a["response"]["status"] for a in done["attempt_log"]] == [429, 204]


def _cursor(when: str) -> str:
    raw = f"{when}|{uuid.UUID(int=0)}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/recover", {"since": "0001-01-01T00:00:00+01:00"}, "since"),
        ("POST", "/recover", {"since": "9999-12-31T23:59:59-01:00"}, "since"),
        # ISO 8601 forms that are not RFC 3339 (the README promises RFC 3339).
        ("POST", "/recover", {"since": "20260101T000000Z"}, "since"),
        ("POST", "/recover", {"since": "2020-W01-1"}, "since"),
        ("GET", "?since=0001-01-01T00:00:00%2B01:00", None, "since"),
        ("GET", "?until=9999-12-31T23:59:59-01:00", None, "until"),
        ("GET", "?event_type=%00", None, "event_type"),
        # A cursor without an offset, and one outside the years a time can have.
        ("GET", f"?cursor={_cursor('2020-01-01T00:00:00')}&until=2030-01-01T00:00:00Z", None,
         "cursor"),
        ("GET", f"?cursor={_cursor('0001-01-01T00:00:00+01:00')}", None, "cursor"),
    ],
)  # fmt: skip
async def test_odd_times_filters_and_cursors_are_a_422_not_a_500(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver,
    method: str, path: str, body: Any, field: str,
) -> None:  # fmt: skip
    acme = await new_tenant(pool, svc)
    ep = await acme.endpoint(receiver.url("/x"))
    url = (
        f"/v1/webhook-endpoints/{ep['id']}{path}"
        if path.startswith("/")
        else f"/v1/webhook-deliveries{path}"
    )
    status, problem = await acme.call(method, url, body)
    assert status == 422, problem
    assert field in [e["field"] for e in problem["errors"]]


async def test_concurrent_registrations_never_pass_the_endpoint_limit(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    receiver: Receiver,
) -> None:  # fmt: skip
    async with service(tmp_path, app_url, pool, worker_pool, webhook_max_endpoints=5) as svc:
        acme = await new_tenant(pool, svc)
        answers = await asyncio.gather(
            *(acme.call("POST", "/v1/webhook-endpoints", {"url": receiver.url(f"/{i}")})
              for i in range(30))
        )  # fmt: skip
        listed = (await acme.call("GET", "/v1/webhook-endpoints"))[1]["data"]
    assert sorted(status for status, _ in answers) == [201] * 5 + [409] * 25
    assert len(listed) == 5


async def test_a_tenant_with_many_hanging_endpoints_holds_only_its_share(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    receiver: Receiver,
) -> None:  # fmt: skip
    async with service(
        tmp_path, app_url, pool, worker_pool,
        webhook_concurrency=10, webhook_tenant_concurrency=4,
    ) as svc:  # fmt: skip
        acme = await new_tenant(pool, svc)
        for i in range(6):  # 6 endpoints x 4 places each would take every slot
            await acme.endpoint(
                receiver.url(f"/hang{i}"), timeout_seconds=30, event_types=["slow.*"]
            )
            receiver.on(f"/hang{i}", hang)
        for _ in range(4):
            await acme.emit(pool, "slow.thing")
        other = await new_tenant(pool, svc, "Other Co")
        await other.endpoint(receiver.url("/fast"))
        await receiver.wait_for(lambda: len(receiver.requests) >= 4)
        for _ in range(5):
            await other.emit(pool, "fast.thing")
        await receiver.wait_count("/fast", 5, timeout=10)  # long before the 30 s timeout
        hanging = [r for r in receiver.requests if r.path.startswith("/hang")]
        assert len(hanging) == 4


async def test_a_failing_endpoint_is_not_fed_its_own_circuit_events(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool, receiver: Receiver,
) -> None:  # fmt: skip
    async with service(
        tmp_path, app_url, pool, worker_pool,
        webhook_breaker_failures=2, webhook_breaker_volume=1000, webhook_breaker_cooldown=0.2,
    ) as svc:  # fmt: skip
        acme = await new_tenant(pool, svc)
        ep = await acme.endpoint(receiver.url("/down"), retry_schedule=[0] * 30)
        watcher = await acme.endpoint(receiver.url("/ops"), event_types=["webhook.endpoint.*"])
        receiver.on("/down", answer(500))
        await acme.emit(pool, "invoice.paid")
        # Several probes fail, each sending the circuit back to open.
        await receiver.wait_count("/down", 6)
    types = [
        r["event_type"]
        for r in await admin_pool.fetch(
            "SELECT event_type FROM tenantry.outbox WHERE aggregate_type = 'webhook_endpoint'"
            " AND aggregate_id = $1 ORDER BY id",
            ep["id"],
        )
    ]
    assert types == ["webhook.endpoint.circuit_opened"]  # once: one real change
    own = await admin_pool.fetchval(
        "SELECT count(*) FROM tenantry.webhook_deliveries WHERE endpoint_id = $1"
        " AND event_type LIKE 'webhook.endpoint.%'",
        uuid.UUID(ep["id"]),
    )
    assert own == 0  # its own circuit news goes to the others, not to itself
    assert watcher["id"] != ep["id"]
    assert {r.json()["type"] for r in receiver.at("/down")} == {"invoice.paid"}


async def test_an_unreadable_retry_after_is_ignored_and_breaks_nothing(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """Regression (review): `Retry-After: ²` passed `isdigit()` and failed `float()`,
    outside any handler: the process stopped, and again after every restart."""
    answered = 0

    async def raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 429 Too Many\r\nRetry-After: \xc2\xb2\r\nContent-Length: 0\r\n\r\n")
        answered += 1
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(raw, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        acme = await new_tenant(pool, svc)
        await acme.endpoint(f"http://127.0.0.1:{port}/x", retry_schedule=[0, 0])
        await acme.endpoint(receiver.url("/ok"))
        await acme.emit(pool, "invoice.paid")
        await acme.emit(pool, "invoice.voided")
        await receiver.wait_count("/ok", 2)
        rows = await acme.wait_deliveries(4)
        for row in rows:
            await finished(acme, row["id"])
    finally:
        server.close()
    assert answered == 4


async def test_a_body_that_is_not_json_is_a_400_or_415_problem(
    svc: Service, pool: asyncpg.Pool
) -> None:
    acme = await new_tenant(pool, svc)
    headers = {"Authorization": f"Bearer {acme.key}"}
    async with aiohttp.ClientSession(acme.base) as http:
        for data, content_type, status in (
            (b"{not json", "application/json", 400),
            (b"url=x", "application/x-www-form-urlencoded", 415),
            (b"[1, 2]", "application/json", 422),
            (b"x" * 70_000, "application/json", 413),
        ):
            async with http.post(
                "/v1/webhook-endpoints",
                data=data,
                headers={**headers, "Content-Type": content_type},
            ) as r:
                assert r.status == status, await r.text()
                assert r.content_type == "application/problem+json"


async def test_flushes_that_overlap_record_each_attempt_once(
    svc: Service, pool: asyncpg.Pool, admin_pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """Regression (read-through): the record loop, a stop and the end of the deliverer
    each flush; two at once took the same head of the results, so one attempt was
    recorded twice and another dropped."""
    acme = await new_tenant(pool, svc)
    await acme.endpoint(receiver.url("/twice"))
    release = receiver.hold("/twice")
    await acme.emit(pool, "invoice.paid")
    await receiver.wait_count("/twice", 1)
    async with admin_pool.acquire() as holder:
        tx = holder.transaction()
        await tx.start()
        # The recording of an attempt updates its delivery's row: held here, the record
        # loop's flush waits, and the second attempt's result queues behind it.
        await holder.execute(
            "SELECT 1 FROM tenantry.webhook_deliveries WHERE tenant_id = $1 FOR UPDATE",
            acme.id,
        )
        release.set()
        await wait_lock_waiter(admin_pool, roles.DEFAULT_LOGIN + "_worker")
        await acme.emit(pool, "invoice.voided")
        await receiver.wait_count("/twice", 2)
        stopping = asyncio.create_task(svc.deliverer.shutdown(grace=10))
        await asyncio.sleep(0)
        await tx.rollback()
    await stopping
    await eventually(lambda: _all_in_state(acme, "delivered", 2))
    counts = await admin_pool.fetch(
        "SELECT delivery_id, count(*) AS n FROM tenantry.webhook_attempts GROUP BY delivery_id"
    )
    assert sorted(r["n"] for r in counts) == [1, 1]


async def test_a_scheme_in_capitals_is_taken_as_the_same_scheme(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """Regression (review): `HTTP://...` passed the checks and then failed the table's
    constraint: a 500."""
    acme = await new_tenant(pool, svc)
    ep = await acme.endpoint(receiver.url("/caps").replace("http://", "HTTP://"))
    assert ep["url"] == receiver.url("/caps")
    status, patched = await acme.call(
        "PATCH", f"/v1/webhook-endpoints/{ep['id']}", {"url": "HtTp://127.0.0.1:1/x"}
    )
    assert (status, patched["url"]) == (200, "http://127.0.0.1:1/x")


async def test_a_bulk_replay_counts_only_what_it_would_replay(
    svc: Service, pool: asyncpg.Pool, receiver: Receiver, database_url: str
) -> None:
    """Regression (review): the count included deliveries of deleted endpoints, which
    the replay then skipped ("40 match", then "replaying 0")."""
    from tests.acceptance.process import run_cli  # noqa: PLC0415

    acme = await new_tenant(pool, svc)
    gone = await acme.endpoint(receiver.url("/gone"), event_types=["a.*"])
    kept = await acme.endpoint(receiver.url("/kept"), event_types=["b.*"])
    await acme.emit(pool, "a.one")
    await acme.emit(pool, "b.one")
    await eventually(lambda: _all_in_state(acme, "delivered", 2))
    await acme.call("DELETE", f"/v1/webhook-endpoints/{gone['id']}")
    code, out, _ = await run_cli(
        "webhooks", "replay", "--state", "delivered", "--tenant", str(acme.id),
        database_url=database_url,
    )  # fmt: skip
    assert (code, out.strip()) == (0, "1 deliveries match; nothing done (add --yes to replay them)")
    assert kept["id"]


async def test_recording_an_attempt_claims_the_next_delivery_in_the_same_round_trip(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool,
    receiver: Receiver,
) -> None:  # fmt: skip
    """With one place per endpoint, each delivery waits for the one before it to be
    recorded.  The claim loop used to claim each of them after that record, a round
    trip and a claim more per delivery (bench.webhooks: 1.4-1.7 claims per record); the
    record's own transaction now claims the places it freed."""
    async with service(tmp_path, app_url, pool, worker_pool, webhook_endpoint_concurrency=1) as svc:
        acme = await new_tenant(pool, svc)
        await acme.endpoint(receiver.url("/in-turn"))
        claimed_by_the_loop: list[int] = []
        claim = svc.deliverer._claim

        async def counted(n: int) -> Any:
            rows = await claim(n)
            claimed_by_the_loop.append(len(rows))
            return rows

        svc.deliverer._claim = counted  # type: ignore[method-assign]
        async with tenant_tx(pool, acme.id) as tx:
            for i in range(12):
                await emit(
                    tx,
                    tenant_id=acme.id,
                    aggregate_type="thing",
                    aggregate_id="one",
                    event_type="invoice.paid",
                    payload={"n": i},
                )
        received = await receiver.wait_count("/in-turn", 12)
        await eventually(lambda: _all_in_state(acme, "delivered", 12))
    assert sorted(r.json()["data"]["n"] for r in received) == list(range(12))
    # The first comes from the loop's claim after the fan-out, most others from records
    # (a record that found the claims' lock taken, by the loop woken by the fan-out's
    # notifications, leaves its places to the loop): every one before.
    assert len([n for n in claimed_by_the_loop if n]) <= 6, claimed_by_the_loop


async def test_a_record_does_not_wait_for_the_claims_lock(
    svc: Service, pool: asyncpg.Pool, admin_pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """The record claims again only if the claims' lock is free at once: it holds the
    endpoint rows it recorded, which a claim holding that lock may wait for (two
    processes would wait on each other), and a record held up would keep its
    deliveries `sending` and every later claim of the process behind it."""
    acme = await new_tenant(pool, svc)
    await acme.endpoint(receiver.url("/held"))
    release = receiver.hold("/held")
    await acme.emit(pool, "invoice.paid")
    await receiver.wait_count("/held", 1)  # claimed, and in flight
    async with admin_pool.acquire() as another_claim:
        lock = "32335, hashtext('tenantry.webhook_claim')"
        await another_claim.execute(f"SELECT pg_advisory_lock({lock})")
        try:
            release.set()
            await eventually(lambda: _all_in_state(acme, "delivered", 1))
        finally:
            await another_claim.execute(f"SELECT pg_advisory_unlock({lock})")
