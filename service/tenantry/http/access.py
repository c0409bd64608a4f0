"""Who asked what: the access log and the request id."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from .. import logging as log

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID = "X-Request-ID"
REQUEST_ID_KEY = web.RequestKey("request_id", str)
# Told of every request answered: method, route pattern, status, seconds (metrics).
Observer = Callable[[str, str, int, float], None]
OBSERVER: web.AppKey[Observer] = web.AppKey("request_observer")
# A request id given by the client (or a proxy) is kept when it is plain enough to log
# and to pass on; any other is replaced by one of ours.
_GIVEN_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


@web.middleware
async def request_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One access line per request, when its answer is done (a stream: when it ends):
    method, route (the pattern, never the query, which may hold a token), status,
    duration, client, request id.  The request id (X-Request-ID, or made up) is bound
    to every line logged while the request is handled, returned in the answer, and
    carried into the jobs the request enqueues (see onboarding_api)."""
    given = request.headers.get(REQUEST_ID, "")
    rid = given if _GIVEN_REQUEST_ID.match(given) else uuid.uuid4().hex
    request[REQUEST_ID_KEY] = rid
    started = time.perf_counter()
    status = 500
    # Bound and unbound by hand rather than with structlog's bound_contextvars: that
    # context manager is a suspended generator for as long as the request lasts, and a
    # stream lasts for hours (one such object per open stream).  (Nothing to restore
    # after: aiohttp runs each request in a task of its own, with a copy of the
    # server's context, where no request id is bound.)
    structlog.contextvars.bind_contextvars(request_id=rid)
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "(no route)"
        seconds = time.perf_counter() - started
        log.get("http").info(
            "http_request",
            method=request.method,
            route=route,
            status=status,
            duration_ms=round(seconds * 1000, 3),
            client=request.remote,
            request_id=rid,
        )
        observe = request.app.get(OBSERVER)
        if observe is not None:
            observe(request.method, route, status, seconds)
        structlog.contextvars.unbind_contextvars("request_id")


def request_id(request: web.Request) -> str:
    """The request's id (set by `request_log`)."""
    rid: str = request.get(REQUEST_ID_KEY, "")
    return rid


async def return_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: every answer carries the request id, streams included
    (their headers go out before the handler returns)."""
    rid = request.get(REQUEST_ID_KEY)
    if rid is not None:
        response.headers[REQUEST_ID] = rid
