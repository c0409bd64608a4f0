"""The answers the contract fuzz cannot reach, held to the OpenAPI document.

The fuzz (tests/acceptance/test_contract_fuzz.py) runs the service without a worker,
so that every write comes from a request: nothing is provisioned, nothing delivered.
Here the whole service runs in this process, worker included, so the answers that
only background work makes possible are checked too, with Schemathesis' own checks
(status, media type, headers, body): a completed onboarding and its event stream, the
tenant of a provisioned sign-up, a delivery with its attempts (a response, and a 410
that disabled its endpoint), an endpoint's history, a replay and a recovery."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg
import orjson
import pytest
import schemathesis
from openapi_schema_validator import validate
from schemathesis import CheckFunction
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tenantry.app import Service
from tenantry.http import openapi
from tenantry.onboarding.model import STEPS
from tenantry.tenants import store
from tests import smtp
from tests.helpers import background_service, eventually, service_settings
from tests.receiver import Receiver, answer, running_receiver

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
async def svc(
    tmp_path: Path,
    app_url: str,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    smtp_server: smtp.Server,
) -> AsyncIterator[Service]:
    # Mail goes to the test SMTP server, which refuses one address: a failed onboarding.
    settings = service_settings(tmp_path, smtp_url=smtp_server.url())
    async with background_service(settings, app_url, pool, worker_pool) as service:
        yield service


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as r:
        yield r


class Contract:
    """Calls operations of the document on the running service and checks each answer
    against it.  Schemathesis calls synchronously (requests): in a thread, so that the
    service, on this event loop, can answer."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.schema = schemathesis.openapi.from_dict(openapi.document())

    async def call(
        self,
        method: str,
        path: str,
        status: int | tuple[int, ...],
        *,
        path_parameters: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
        body: Any = None,
        checks: list[CheckFunction] = CHECKS,
    ) -> Any:
        operation = self.schema[path][method]
        kwargs: dict[str, Any] = {
            "path_parameters": path_parameters or {},
            "headers": headers or {},
            "query": query or {},
        }
        if body is not None:
            kwargs["body"] = body
            kwargs["media_type"] = "application/json"
        case = operation.Case(**kwargs)

        def call_and_check() -> Any:
            response = case.call(base_url=self.base_url)
            case.validate_response(response, checks=checks)
            return response

        response = await anyio.to_thread.run_sync(call_and_check)
        assert response.status_code in ((status,) if isinstance(status, int) else status), (
            response.text
        )
        content_type = response.headers.get("content-type", [""])[0]  # lower case, a list
        return response.json() if content_type.startswith("application/json") else response.text


async def failed_onboarding_is_answered_as_documented(
    api: Contract, event_schema: dict[str, Any]
) -> None:
    sign_up = {"email": smtp.NO_SUCH_USER, "tenant_name": "Ghost Works", "plan": "free"}
    accepted = await api.call("POST", "/v1/onboardings", 202, body=sign_up)
    token = {"Authorization": f"Bearer {accepted['token']}"}
    oid = {"id": accepted["id"]}

    async def failed() -> bool:
        status = await api.call(
            "GET", "/v1/onboardings/{id}", 200, path_parameters=oid, headers=token
        )
        return bool(status["state"] == "failed" and status["failure_reason"])

    await eventually(failed, timeout=30, every=0.1)
    stream = await api.call(
        "GET", "/v1/onboardings/{id}/events", 200, path_parameters=oid, headers=token
    )
    payloads = [line[len("data: ") :] for line in stream.splitlines() if line.startswith("data:")]
    last = orjson.loads(payloads[-1])
    assert (last["type"], last["code"], last["field"]) == (
        "onboarding.failed",
        "email_rejected",
        "email",
    )
    for payload in payloads:
        validate(orjson.loads(payload), event_schema["properties"]["data"]["contentSchema"])


async def test_what_background_work_makes_is_answered_as_documented(
    svc: Service, admin_pool: asyncpg.Pool, receiver: Receiver
) -> None:
    api = Contract(f"http://127.0.0.1:{svc.http.port}")
    sign_up = {"email": "grace@example.com", "tenant_name": "Hopper Labs", "plan": "pro"}
    accepted = await api.call("POST", "/v1/onboardings", 202, body=sign_up)
    token = {"Authorization": f"Bearer {accepted['token']}"}
    oid = {"id": accepted["id"]}

    async def completed() -> bool:
        status = await api.call(
            "GET", "/v1/onboardings/{id}", 200, path_parameters=oid, headers=token
        )
        return bool(status["state"] == "completed")

    await eventually(completed, timeout=30, every=0.1)
    stream = await api.call(
        "GET", "/v1/onboardings/{id}/events", 200, path_parameters=oid, headers=token
    )
    last = [line for line in stream.splitlines() if line.startswith("id:")][-1].split(":")[1]
    assert "event: onboarding.completed" in stream
    # Schemathesis checked each event's fields; the payload in `data` is held here to
    # the `contentSchema` the document gives it (an annotation validators skip).
    event = openapi.document()["components"]["schemas"]["OnboardingEvent"]
    payloads = [line[len("data: ") :] for line in stream.splitlines() if line.startswith("data:")]
    assert len(payloads) == 1 + len(STEPS)
    for payload in payloads:
        validate(orjson.loads(payload), event["properties"]["data"]["contentSchema"])
    await api.call(
        "GET",
        "/v1/onboardings/{id}/events",
        204,
        path_parameters=oid,
        headers={**token, "Last-Event-ID": last.strip()},
    )

    await failed_onboarding_is_answered_as_documented(api, event)

    key = (await store.create_key(admin_pool, uuid.UUID(accepted["tenant_id"]))).secret
    auth = {"Authorization": f"Bearer {key}"}
    tenant = await api.call("GET", "/v1/tenant", 200, headers=auth)
    assert tenant["state"] == "active"

    # One endpoint that takes every delivery, one that is gone (410: disabled).
    receiver.on("/ok", answer(200, {"X-Receiver": "yes"}, b"thanks"))
    receiver.on("/gone", answer(410))
    ok = await api.call(
        "POST", "/v1/webhook-endpoints", 201, headers=auth, body={"url": receiver.url("/ok")}
    )
    gone = await api.call(
        "POST", "/v1/webhook-endpoints", 201, headers=auth, body={"url": receiver.url("/gone")}
    )
    sent: dict[str, str] = {}
    for endpoint in (ok, gone):
        test = await api.call(
            "POST",
            "/v1/webhook-endpoints/{id}/test",
            202,
            path_parameters={"id": endpoint["id"]},
            headers=auth,
        )
        sent[endpoint["id"]] = test["delivery_id"]

    async def attempted(delivery_id: str) -> bool:
        delivery = await api.call(
            "GET",
            "/v1/webhook-deliveries/{id}",
            200,
            path_parameters={"id": delivery_id},
            headers=auth,
        )
        return bool(delivery["attempt_log"])

    for delivery_id in sent.values():
        await eventually(partial(attempted, delivery_id), timeout=30, every=0.1)
    page = await api.call("GET", "/v1/webhook-deliveries", 200, headers=auth, query={"limit": "1"})
    assert page["next_cursor"] is not None
    await api.call(
        "GET",
        "/v1/webhook-deliveries",
        200,
        headers=auth,
        query={"cursor": page["next_cursor"], "state": "delivered"},
    )
    detail = await api.call(
        "GET", "/v1/webhook-endpoints/{id}", 200, path_parameters={"id": gone["id"]}, headers=auth
    )
    assert [h["type"] for h in detail["history"]] == ["webhook.endpoint.disabled"]
    assert detail["enabled"] is False
    await api.call(
        "PATCH",
        "/v1/webhook-endpoints/{id}",
        200,
        path_parameters={"id": gone["id"]},
        headers=auth,
        body={"enabled": True},
    )
    await api.call(
        "POST",
        "/v1/webhook-deliveries/{id}/replay",
        202,
        path_parameters={"id": sent[ok["id"]]},
        headers=auth,
    )
    recovered = await api.call(
        "POST",
        "/v1/webhook-endpoints/{id}/recover",
        202,
        path_parameters={"id": gone["id"]},
        headers=auth,
        body={"since": "2000-01-01T00:00:00Z"},
    )
    assert recovered["replaying"] >= 0
    await api.call(
        "DELETE",
        "/v1/webhook-endpoints/{id}",
        200,
        path_parameters={"id": gone["id"]},
        headers=auth,
    )


async def test_readiness_and_metrics_are_answered_as_documented(svc: Service) -> None:
    api = Contract(f"http://127.0.0.1:{svc.http.port}")
    # Just started, the listener may not be connected yet: 503 is an answer too, and
    # documented (a server error only where it is not).
    conformance = [c for c in CHECKS if c is not not_a_server_error]

    async def ready() -> bool:
        body = await api.call("GET", "/readyz", (200, 503), checks=conformance)
        return bool(body["status"] == "ready")

    await eventually(ready)
    assert "tenantry_" in await api.call("GET", "/metrics", 200)
    await api.call("GET", "/healthz", 200)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{svc.http.port}/openapi.json") as resp,
    ):
        assert resp.status == 200
