"""The tenant's webhook routes (Bearer API key): endpoints, their secrets and tests, and
the deliveries with their attempts, replay and recover."""

from __future__ import annotations

import uuid
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


def _uuid_in_path(request: web.Request, name: str, what: str) -> uuid.UUID | web.Response:
    try:
        return uuid.UUID(request.match_info[name])
    except ValueError:
        return problem(404, f"no {what} {request.match_info[name][:60]}")


def _errors(exc: Exception) -> web.Response:
    if isinstance(exc, InvalidRequest):
        return invalid_problem(exc)
    if isinstance(exc, Invalid):
        return invalid_problem(InvalidRequest([exc]))
    if isinstance(exc, NotFound):
        return problem(404, str(exc))
    if isinstance(exc, Conflict):
        return problem(409, str(exc))
    raise exc


def _with_secret(view: dict[str, Any], secret: str) -> dict[str, Any]:
    return {**view, "secret": secret}


@authenticated
async def create_endpoint(request: web.Request) -> web.StreamResponse:
    api = request.app[WEBHOOKS]
    body = await read_json(request, MAX_BODY)
    if isinstance(body, web.Response):
        return body
    try:
        spec = parse_endpoint(body)
        view, secret = await api.endpoints.create(tenant_of(request), spec)
    except (InvalidRequest, Conflict) as exc:
        return _errors(exc)
    return json_response(
        _with_secret(view, secret),
        201,
        {"Location": f"/v1/webhook-endpoints/{view['id']}"},
    )


@authenticated
async def list_endpoints(request: web.Request) -> web.StreamResponse:
    api = request.app[WEBHOOKS]
    return json_response({"data": await api.endpoints.list_endpoints(tenant_of(request))})


@authenticated
async def get_endpoint(request: web.Request) -> web.StreamResponse:
    api = request.app[WEBHOOKS]
    eid = _uuid_in_path(request, "id", "webhook endpoint")
    if isinstance(eid, web.Response):
        return eid
    try:
        return json_response(await api.endpoints.get(tenant_of(request), eid))
    except NotFound as exc:
        return _errors(exc)


@authenticated
async def patch_endpoint(request: web.Request) -> web.StreamResponse:
    api = request.app[WEBHOOKS]
    eid = _uuid_in_path(request, "id", "webhook endpoint")
    if isinstance(eid, web.Response):
        return eid
    body = await read_json(request, MAX_BODY)
    if isinstance(body, web.Response):
        return body
    try:
        patch = parse_endpoint(body, patch=True)
        view = await api.endpoints.update(tenant_of(request), eid, patch)
    except (InvalidRequest, NotFound) as exc:
        return _errors(exc)
    return json_response(view)


@authenticated
async def delete_endpoint(request: web.Request) -> web.StreamResponse:
    api = request.app[WEBHOOKS]
    eid = _uuid_in_path(request, "id", "webhook endpoint")
    if isinstance(eid, web.Response):
        return eid
    try:
        cancelled = await api.endpoints.delete(tenant_of(request), eid)
    except NotFound as exc:
        return _errors(exc)
    return json_response({"id": str(eid), "deleted": True, "cancelled_deliveries": cancelled})


@authenticated
async def rotate_secret(request: web.Request) -> web.StreamResponse:
    api = request.app[WEBHOOKS]
    eid = _uuid_in_path(request, "id", "webhook endpoint")
    if isinstance(eid, web.Response):
        return eid
    given: str | None = None
    if request.can_read_body:
        body = await read_json(request, MAX_BODY)
        if isinstance(body, web.Response):
            return body
        try:
            given = _rotation_secret(body)
        except InvalidRequest as exc:
            return _errors(exc)
    try:
        view, secret = await api.endpoints.rotate_secret(tenant_of(request), eid, given)
    except NotFound as exc:
        return _errors(exc)
    return json_response(_with_secret(view, secret))


def _rotation_secret(body: Any) -> str | None:
    """The new secret a rotation request gives (`{"secret": "whsec_..."}`), if any."""
    if not isinstance(body, dict):
        raise InvalidRequest([Invalid("", "the body must be a JSON object")])
    errors = [Invalid(str(k)[:50], "unknown field") for k in body if k != "secret"]
    value = body.get("secret")
    if value is not None:
        try:
            secrets.key_bytes(value)
        except Invalid as exc:
            errors.append(exc)
    if errors:
        raise InvalidRequest(errors)
    return value if isinstance(value, str) else None


@authenticated
async def test_endpoint(request: web.Request) -> web.StreamResponse:
    api = request.app[WEBHOOKS]
    eid = _uuid_in_path(request, "id", "webhook endpoint")
    if isinstance(eid, web.Response):
        return eid
    try:
        delivery_id, event_id = await api.endpoints.send_test(tenant_of(request), eid)
    except (NotFound, Conflict) as exc:
        return _errors(exc)
    return json_response(
        {
            "delivery_id": str(delivery_id),
            "event_id": event_id,
            "delivery_url": f"/v1/webhook-deliveries/{delivery_id}",
        },
        202,
    )


@authenticated
async def recover(request: web.Request) -> web.StreamResponse:
    api = request.app[WEBHOOKS]
    eid = _uuid_in_path(request, "id", "webhook endpoint")
    if isinstance(eid, web.Response):
        return eid
    body = await read_json(request, MAX_BODY)
    if isinstance(body, web.Response):
        return body
    errors: list[Invalid] = []
    if not isinstance(body, dict):
        return _errors(InvalidRequest([Invalid("", "the body must be a JSON object")]))
    errors += [Invalid(str(k)[:50], "unknown field") for k in body if k not in ("since", "until")]
    since = _time_field(body, "since", errors, required=True)
    until = _time_field(body, "until", errors, required=False)
    if since is not None and until is not None and until <= since:
        errors.append(Invalid("until", "must be after since"))
    if errors:
        return _errors(InvalidRequest(errors))
    assert since is not None
    try:
        count = await deliveries.recover(api.pool, tenant_of(request), eid, since, until)
    except NotFound as exc:
        return _errors(exc)
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


@authenticated
async def list_deliveries(request: web.Request) -> web.StreamResponse:
    api = request.app[WEBHOOKS]
    q = request.query
    errors: list[Invalid] = []
    known = {"endpoint_id", "event_type", "state", "since", "until", "limit", "cursor"}
    errors += [Invalid(k[:50], "unknown query parameter") for k in q if k not in known]
    endpoint_id = None
    if "endpoint_id" in q:
        try:
            endpoint_id = uuid.UUID(q["endpoint_id"])
        except ValueError:
            errors.append(Invalid("endpoint_id", "is not a UUID"))
    event_type = q.get("event_type")
    if event_type is not None:
        try:
            event_type_filter(event_type)
        except Invalid as exc:
            errors.append(exc)
    state = q.get("state")
    if state is not None and state not in deliveries.STATES:
        errors.append(Invalid("state", f"must be one of {', '.join(deliveries.STATES)}"))
    times: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        times[name] = None
        if name in q:
            try:
                times[name] = parse_time(q[name], name)
            except Invalid as exc:
                errors.append(exc)
    limit = 50
    if "limit" in q:
        try:
            limit = int(q["limit"])
            if not 1 <= limit <= deliveries.PAGE_MAX:
                raise ValueError
        except ValueError:
            errors.append(
                Invalid("limit", f"must be a whole number from 1 to {deliveries.PAGE_MAX}")
            )
    if errors:
        return _errors(InvalidRequest(errors))
    try:
        page, following = await deliveries.list_deliveries(
            api.pool,
            tenant_of(request),
            deliveries.DeliveryFilter(
                endpoint_id, event_type, state, times["since"], times["until"]
            ),
            limit=limit,
            cursor=q.get("cursor"),
        )
    except Invalid as exc:
        return _errors(exc)
    body: dict[str, Any] = {"data": page, "next_cursor": following}
    return json_response(body)


@authenticated
async def get_delivery(request: web.Request) -> web.StreamResponse:
    api = request.app[WEBHOOKS]
    did = _uuid_in_path(request, "id", "webhook delivery")
    if isinstance(did, web.Response):
        return did
    try:
        return json_response(await deliveries.get_delivery(api.pool, tenant_of(request), did))
    except NotFound as exc:
        return _errors(exc)


@authenticated
async def replay_delivery(request: web.Request) -> web.StreamResponse:
    api = request.app[WEBHOOKS]
    did = _uuid_in_path(request, "id", "webhook delivery")
    if isinstance(did, web.Response):
        return did
    try:
        await deliveries.replay(api.pool, tenant_of(request), did)
    except (NotFound, Conflict) as exc:
        return _errors(exc)
    return json_response(
        {"id": str(did), "state": "pending", "replayed_at": utc_text(datetime.now(UTC))}, 202
    )


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
