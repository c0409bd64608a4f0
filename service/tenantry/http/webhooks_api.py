"""The tenant's webhook routes (Bearer API key): endpoints, their secrets and tests, and
the deliveries with their attempts, replay and recover."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web

from ..errors import Conflict, Invalid, InvalidRequest, NotFound
from ..timefmt import utc_text
from ..webhooks import deliveries, secrets
from ..webhooks.endpoints import Endpoints
from ..webhooks.model import event_type_filter, parse_endpoint, parse_time
from .problems import invalid_problem, json_response, problem, read_json
from .tenant_api import authenticated, tenant_of

MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class WebhooksApi:
    pool: asyncpg.Pool  # the tenant login's
    endpoints: Endpoints


WEBHOOKS = web.AppKey("webhooks", WebhooksApi)
# A route's work: the API, the tenant, the id in the path (None on the collections).
Work = Callable[
    [web.Request, WebhooksApi, uuid.UUID, uuid.UUID | None], Awaitable[web.StreamResponse]
]


def route(what: str | None = None) -> Callable[[Work], Callable[..., Any]]:
    """A tenant route: the Bearer key resolved to the tenant, the path's `{id}` parsed
    (not a UUID: the same 404 as an unknown one, `what` naming the thing), and the typed
    errors mapped once: invalid fields 422 naming each, not found 404, conflict 409."""

    def wrap(work: Work) -> Callable[..., Any]:
        @authenticated
        async def handler(request: web.Request) -> web.StreamResponse:
            ident: uuid.UUID | None = None
            if what is not None:
                raw = request.match_info["id"]
                try:
                    ident = uuid.UUID(raw)
                except ValueError:
                    return problem(404, f"no {what} {raw[:60]}")
            try:
                return await work(request, request.app[WEBHOOKS], tenant_of(request), ident)
            except _BodyProblem as exc:  # not JSON, too large, another media type
                return exc.response
            except InvalidRequest as exc:
                return invalid_problem(exc)
            except Invalid as exc:
                return invalid_problem(InvalidRequest([exc]))
            except NotFound as exc:
                return problem(404, str(exc))
            except Conflict as exc:
                return problem(409, str(exc))

        return handler

    return wrap


class _BodyProblem(Exception):
    """The request's body could not be read as JSON: answer `response`."""

    def __init__(self, response: web.Response) -> None:
        self.response = response


async def _json_body(request: web.Request) -> Any:
    body = await read_json(request, MAX_BODY)
    if isinstance(body, web.Response):
        raise _BodyProblem(body)
    return body


def _object(body: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest([Invalid("", "the body must be a JSON object")])
    unknown = [Invalid(str(k)[:50], "unknown field") for k in body if k not in known]
    if unknown:
        raise InvalidRequest(unknown)
    return body


def _with_secret(view: dict[str, Any], secret: str) -> dict[str, Any]:
    return {**view, "secret": secret}


@route()
async def create_endpoint(
    request: web.Request, api: WebhooksApi, tenant: uuid.UUID, _: uuid.UUID | None
) -> web.StreamResponse:
    spec = parse_endpoint(await _json_body(request))
    view, secret = await api.endpoints.create(tenant, spec)
    location = {"Location": f"/v1/webhook-endpoints/{view['id']}"}
    return json_response(_with_secret(view, secret), 201, location)


@route()
async def list_endpoints(
    request: web.Request, api: WebhooksApi, tenant: uuid.UUID, _: uuid.UUID | None
) -> web.StreamResponse:
    return json_response({"data": await api.endpoints.list_endpoints(tenant)})


@route("webhook endpoint")
async def get_endpoint(
    request: web.Request, api: WebhooksApi, tenant: uuid.UUID, eid: uuid.UUID | None
) -> web.StreamResponse:
    assert eid is not None
    return json_response(await api.endpoints.get(tenant, eid))


@route("webhook endpoint")
async def patch_endpoint(
    request: web.Request, api: WebhooksApi, tenant: uuid.UUID, eid: uuid.UUID | None
) -> web.StreamResponse:
    assert eid is not None
    patch = parse_endpoint(await _json_body(request), patch=True)
    return json_response(await api.endpoints.update(tenant, eid, patch))


@route("webhook endpoint")
async def delete_endpoint(
    request: web.Request, api: WebhooksApi, tenant: uuid.UUID, eid: uuid.UUID | None
) -> web.StreamResponse:
    assert eid is not None
    cancelled = await api.endpoints.delete(tenant, eid)
    return json_response({"id": str(eid), "deleted": True, "cancelled_deliveries": cancelled})


@route("webhook endpoint")
async def rotate_secret(
    request: web.Request, api: WebhooksApi, tenant: uuid.UUID, eid: uuid.UUID | None
) -> web.StreamResponse:
    """A new secret: generated, or the body's `{"secret": "whsec_..."}`."""
    assert eid is not None
    given: str | None = None
    if request.can_read_body:
        value = _object(await _json_body(request), {"secret"}).get("secret")
        if value is not None:
            secrets.key_bytes(value)  # Invalid("secret", ...) unless in the standard form
            given = value
    view, secret = await api.endpoints.rotate_secret(tenant, eid, given)
    return json_response(_with_secret(view, secret))


@route("webhook endpoint")
async def test_endpoint(
    request: web.Request, api: WebhooksApi, tenant: uuid.UUID, eid: uuid.UUID | None
) -> web.StreamResponse:
    assert eid is not None
    delivery_id, event_id = await api.endpoints.send_test(tenant, eid)
    body = {
        "delivery_id": str(delivery_id),
        "event_id": event_id,
        "delivery_url": f"/v1/webhook-deliveries/{delivery_id}",
    }
    return json_response(body, 202)


@route("webhook endpoint")
async def recover(
    request: web.Request, api: WebhooksApi, tenant: uuid.UUID, eid: uuid.UUID | None
) -> web.StreamResponse:
    assert eid is not None
    body = _object(await _json_body(request), {"since", "until"})
    errors: list[Invalid] = []
    since = _time_field(body, "since", errors, required=True)
    until = _time_field(body, "until", errors, required=False)
    if since is not None and until is not None and until <= since:
        errors.append(Invalid("until", "must be after since"))
    if errors:
        raise InvalidRequest(errors)
    assert since is not None
    count = await deliveries.recover(api.pool, tenant, eid, since, until)
    return json_response({"endpoint_id": str(eid), "replaying": count}, 202)


def _time_field(
    body: dict[str, Any], name: str, errors: list[Invalid], *, required: bool
) -> datetime | None:
    value = body.get(name)
    if value is None:
        if required:
            errors.append(Invalid(name, "is required"))
        return None
    try:
        return parse_time(value, name)
    except Invalid as exc:
        errors.append(exc)
        return None


_QUERY = frozenset({"endpoint_id", "event_type", "state", "since", "until", "limit", "cursor"})


def _delivery_query(q: Any) -> tuple[deliveries.DeliveryFilter, int]:
    """The listing's filter and page size from the query string; `InvalidRequest`
    naming every parameter at fault."""
    errors = [Invalid(k[:50], "unknown query parameter") for k in q if k not in _QUERY]
    values: dict[str, Any] = {}

    def take(name: str, parse: Callable[[str], Any]) -> None:
        if name in q:
            try:
                values[name] = parse(q[name])
            except Invalid as exc:
                errors.append(exc)

    def endpoint(raw: str) -> uuid.UUID:
        try:
            return uuid.UUID(raw)
        except ValueError:
            raise Invalid("endpoint_id", "is not a UUID") from None

    def state(raw: str) -> str:
        if raw not in deliveries.STATES:
            raise Invalid("state", f"must be one of {', '.join(deliveries.STATES)}")
        return raw

    def limit(raw: str) -> int:
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= deliveries.PAGE_MAX:
            raise Invalid("limit", f"must be a whole number from 1 to {deliveries.PAGE_MAX}")
        return int(raw)

    take("endpoint_id", endpoint)
    take("event_type", event_type_filter)
    take("state", state)
    take("since", lambda raw: parse_time(raw, "since"))
    take("until", lambda raw: parse_time(raw, "until"))
    take("limit", limit)
    if errors:
        raise InvalidRequest(errors)
    filt = deliveries.DeliveryFilter(
        values.get("endpoint_id"),
        values.get("event_type"),
        values.get("state"),
        values.get("since"),
        values.get("until"),
    )
    return filt, values.get("limit", 50)


@route()
async def list_deliveries(
    request: web.Request, api: WebhooksApi, tenant: uuid.UUID, _: uuid.UUID | None
) -> web.StreamResponse:
    filt, limit = _delivery_query(request.query)
    page, following = await deliveries.list_deliveries(
        api.pool, tenant, filt, limit=limit, cursor=request.query.get("cursor")
    )
    return json_response({"data": page, "next_cursor": following})


@route("webhook delivery")
async def get_delivery(
    request: web.Request, api: WebhooksApi, tenant: uuid.UUID, did: uuid.UUID | None
) -> web.StreamResponse:
    assert did is not None
    return json_response(await deliveries.get_delivery(api.pool, tenant, did))


@route("webhook delivery")
async def replay_delivery(
    request: web.Request, api: WebhooksApi, tenant: uuid.UUID, did: uuid.UUID | None
) -> web.StreamResponse:
    assert did is not None
    await deliveries.replay(api.pool, tenant, did)
    body = {"id": str(did), "state": "pending", "replayed_at": utc_text(datetime.now(UTC))}
    return json_response(body, 202)


def add_routes(app: web.Application, api: WebhooksApi) -> None:
    app[WEBHOOKS] = api
    r = app.router
    r.add_post("/v1/webhook-endpoints", create_endpoint)
    r.add_get("/v1/webhook-endpoints", list_endpoints)
    r.add_get("/v1/webhook-endpoints/{id}", get_endpoint)
    r.add_patch("/v1/webhook-endpoints/{id}", patch_endpoint)
    r.add_delete("/v1/webhook-endpoints/{id}", delete_endpoint)
    r.add_post("/v1/webhook-endpoints/{id}/rotate-secret", rotate_secret)
    r.add_post("/v1/webhook-endpoints/{id}/test", test_endpoint)
    r.add_post("/v1/webhook-endpoints/{id}/recover", recover)
    r.add_get("/v1/webhook-deliveries", list_deliveries)
    r.add_get("/v1/webhook-deliveries/{id}", get_delivery)
    r.add_post("/v1/webhook-deliveries/{id}/replay", replay_delivery)
