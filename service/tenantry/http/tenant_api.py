"""Tenant-authenticated routes: `Authorization: Bearer <API key>` resolves to the
tenant, and every handler works inside that tenant's context only."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from ..errors import NotFound, Unauthorized
from ..tenants import store
from ..timefmt import utc_text
from .problems import json_response, problem

POOL = web.AppKey("pool", asyncpg.Pool)
TENANT_ID = web.RequestKey("tenant_id", uuid.UUID)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="tenantry"'}


def authenticated(handler: Handler) -> Handler:
    """Resolve the bearer key to a tenant before `handler` runs; 401 otherwise."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return problem(401, "send Authorization: Bearer <API key>", headers=_CHALLENGE)
        try:
            tenant_id = await store.authenticate(request.app[POOL], key.strip())
        except Unauthorized as exc:
            return problem(401, str(exc), headers=_CHALLENGE)
        request[TENANT_ID] = tenant_id
        return await handler(request)

    return wrapper


def tenant_of(request: web.Request) -> uuid.UUID:
    return request[TENANT_ID]


@authenticated
async def get_tenant(request: web.Request) -> web.StreamResponse:
    try:
        t = await store.get_tenant(request.app[POOL], tenant_of(request))
    except NotFound as exc:
        return problem(404, str(exc))
    body = {
        "id": str(t.id),
        "slug": t.slug,
        "name": t.name,
        "plan": t.plan,
        "state": t.state,
        "created_at": utc_text(t.created_at),
    }
    return json_response(body)


def add_routes(app: web.Application, pool: asyncpg.Pool) -> None:
    app[POOL] = pool
    app.router.add_get("/v1/tenant", get_tenant)
