"""The onboarding routes: sign up (public, rate-limited, idempotent), read the status
and follow its events (a status token each).

POST /v1/onboardings                 -> 202 {id, tenant_id, state, urls, token}
                                        (a replay: the state now, a token from now)
GET  /v1/onboardings/{id}            -> the state, the steps done, the failure reason
GET  /v1/onboardings/{id}/events     -> text/event-stream, replayable (Last-Event-ID)
"""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp_cors
import anyio
import asyncpg
from aiohttp import HttpVersion11, hdrs, web

from .. import logging as log
from ..db import UNAVAILABLE
from ..errors import Conflict, InvalidRequest, NotFound
from ..hub import Hub
from ..onboarding import machine
from ..onboarding.model import AGGREGATE, TERMINAL_EVENTS, parse_sign_up
from ..onboarding.provision import STEP_GROUPS
from ..onboarding.tokens import Grant, Signer, TokenError
from ..outbox import store as outbox
from ..outbox.store import Event
from ..subscriber import CLIENT_GONE, Subscriber, encode
from ..tenancy import tenant_tx
from ..timefmt import utc_text
from .access import request_id
from .problems import invalid_problem, json_response, problem, read_json
from .protocol import end_with_connection
from .ratelimit import Networks, RateLimiter, client_address, limit_key

MAX_BODY = 16 * 1024
IDEMPOTENCY_KEY_MAX = 255
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # nginx and similar proxies buffer responses unless told not to.
    "X-Accel-Buffering": "no",
}


@dataclass
class OnboardingApi:
    pool: asyncpg.Pool
    hub: Hub
    signer: Signer
    limiter: RateLimiter
    queue: str = "default"
    retry_ms: int = 2000  # the EventSource reconnect delay, before jitter
    trusted_proxies: Networks = ()
    ipv6_prefix: int = 64  # IPv6 clients are limited per network of this size


ONBOARDING = web.AppKey("onboarding", OnboardingApi)
_log = log.get("http")


def _client(request: web.Request) -> str:
    """The key the sign-up rate limit counts this request under."""
    api = request.app[ONBOARDING]
    address = client_address(
        request.remote, request.headers.get("X-Forwarded-For"), api.trusted_proxies
    )
    return limit_key(address, api.ipv6_prefix)


async def create(request: web.Request) -> web.StreamResponse:
    api = request.app[ONBOARDING]
    wait = api.limiter.check(_client(request))
    if wait > 0:
        return problem(
            429,
            "Too many sign-up requests from this address. Try again after the time"
            " the Retry-After header gives, in seconds.",
            headers={"Retry-After": RateLimiter.retry_after(wait)},
        )
    body = await read_json(request, MAX_BODY)
    if isinstance(body, web.Response):
        return body
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (
        0 < len(key) <= IDEMPOTENCY_KEY_MAX and key.isascii() and key.isprintable()
    ):
        return problem(
            400,
            f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters",
            errors=[{"field": "Idempotency-Key", "detail": "invalid header value"}],
        )
    try:
        sign_up = parse_sign_up(body)
        accepted = await machine.accept(
            api.pool, sign_up, idempotency_key=key, queue=api.queue, request_id=request_id(request)
        )
    except InvalidRequest as exc:
        return invalid_problem(exc)
    except Conflict as exc:
        return problem(409, str(exc))
    oid, tid = accepted.onboarding_id, accepted.tenant_id
    status_url = f"/v1/onboardings/{oid}"
    headers = {"Location": status_url}
    if accepted.replayed:
        # A client retrying after a lost answer (or a page reloaded hours later) wants
        # to follow the onboarding now: its state now, and a token good from now.  The
        # stored answer's token counted from the first request, and an onboarding's
        # key outlives its token (TENANTRY_IDEMPOTENCY_RETENTION_HOURS, 24, against
        # TENANTRY_TOKEN_TTL, 24 h): a late retry got a token dead already, or about to
        # be.  Only who holds the key and the very body gets one.
        try:
            state = (await machine.get(api.pool, tid, oid)).state
        except NotFound as exc:  # (onboardings are kept: a row removed by hand)
            return problem(404, str(exc))
        issued_at = datetime.now(UTC)
        headers["Idempotent-Replayed"] = "true"
    else:
        state, issued_at = "accepted", accepted.created_at
        _log.info("onboarding_accepted", onboarding_id=str(oid), tenant_id=str(tid))
    token = api.signer.issue(oid, tid, issued_at)
    expires = datetime.fromtimestamp(api.signer.expiry(issued_at), UTC)
    return json_response(
        {
            "id": str(oid),
            "tenant_id": str(tid),
            "state": state,
            "status_url": status_url,
            "events_url": f"{status_url}/events?token={token}",
            "token": token,
            "token_expires_at": utc_text(expires),
        },
        202,
        headers,
    )


def _authorize(request: web.Request) -> Grant | web.Response:
    """The status token (query `token`, for EventSource, or a bearer header) must be
    valid and name this very onboarding."""
    raw_id = request.match_info["id"]
    try:
        wanted = uuid.UUID(raw_id)
    except ValueError:
        wanted = None
    # Only the form the API gives out (status_url): UUID() also reads braces, a urn:
    # prefix, no hyphens, capitals, and one onboarding would have many addresses.
    if wanted is None or str(wanted) != raw_id:
        return problem(404, "there is no onboarding with this id")
    token = request.query.get("token")
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    bearer = value.strip() if scheme.lower() == "bearer" else None
    if token is not None and bearer is not None and token != bearer:
        # Preferring one silently would hide a client's bug.
        return problem(400, "the Authorization header and ?token= name different tokens")
    token = token if token is not None else bearer
    challenge = {"WWW-Authenticate": 'Bearer realm="onboarding"'}
    if not token:
        return problem(401, "a status token is required (?token= or Bearer)", headers=challenge)
    try:
        grant = request.app[ONBOARDING].signer.verify(token)
    except TokenError as exc:
        return problem(401, str(exc), headers=challenge)
    if wanted != grant.onboarding_id:
        return problem(403, "the token is for another onboarding")
    return grant


async def status(request: web.Request) -> web.StreamResponse:
    grant = _authorize(request)
    if isinstance(grant, web.Response):
        return grant
    try:
        o = await machine.get(request.app[ONBOARDING].pool, grant.tenant_id, grant.onboarding_id)
    except NotFound as exc:
        return problem(404, str(exc))
    return json_response(
        {
            "id": str(o.id),
            "tenant_id": str(o.tenant_id),
            "state": o.state,
            "version": o.version,
            "tenant_name": o.tenant_name,
            "plan": o.plan,
            "steps": [{"step": s.step, "done_at": utc_text(s.done_at)} for s in o.steps],
            "failure_reason": o.failure_reason,
            "created_at": utc_text(o.created_at),
            "updated_at": utc_text(o.updated_at),
        }
    )


_EVENT_ID = re.compile(r"[0-9]{1,9}")


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID", request.query.get("last_event_id", "0")).strip()
    # ASCII digits only: str.isdigit() also admits "²", which int() refuses.
    return int(raw) if _EVENT_ID.fullmatch(raw) else None


async def events(request: web.Request) -> web.StreamResponse:
    grant = _authorize(request)
    if isinstance(grant, web.Response):
        return grant
    last = _last_event_id(request)
    if last is None:
        return problem(400, "Last-Event-ID must be a non-negative integer (an event's id)")
    api = request.app[ONBOARDING]
    tid, oid = grant.tenant_id, grant.onboarding_id
    del grant  # (a stream lasts for hours: its frame holds what it needs, no more)

    # (The transport's own method: a closure over the request would be one more object
    # per open stream.)
    transport = request.transport
    abort = transport.abort if transport is not None else None
    with api.hub.subscribe(tid, str(oid), abort) as sub:
        # A client that leaves ends its stream then, even an idle one's (no write to
        # find the connection closed before the next keepalive).
        end_with_connection(request, sub)
        # Subscribed first, so nothing committed after this replay is missed.
        try:
            replay: _Replay | None = await _replay(api, tid, oid, last)
        except UNAVAILABLE:
            # The database is away (a restart): answer anyway, and wait for it with
            # keepalives; an error here would make a browser's EventSource give up.
            replay = None
        if replay is not None and replay.ahead:
            replay = None  # served, and waited for as for a database away (below)
        if replay is not None:
            if not replay.found:
                return problem(404, f"no onboarding {oid}")
            if replay.foreign:
                # Not even the client's own last event is here: an id from elsewhere.
                return problem(400, f"Last-Event-ID {last} is not an event of this stream")
            if replay.ended:
                # HTTP 204 tells an EventSource to stop reconnecting: it saw the end.
                _log.debug("stream_refused_after_end", onboarding_id=str(oid), last=last)
                return web.Response(status=204)
        if sub.reason == CLIENT_GONE:
            return _gone_before_the_stream(oid, last)
        resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        head = request.method == hdrs.METH_HEAD
        if not head and request.version >= HttpVersion11:
            # Chunked for certain (aiohttp's choice anyway): the hub writes frames to
            # the transport itself, each as one chunk (Subscriber.attach).
            resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
        except ConnectionError:
            # (The connection closing, its loss not yet told: the same.)
            return _gone_before_the_stream(oid, last)
        if head:
            # The headers a stream starts with, and no body: aiohttp would write the
            # retry line and the replay to a HEAD response, and the hub its chunks.
            return resp
        # aiohttp's timer for closing a connection idle between requests runs from the
        # connection's start (and does nothing while a request is in progress): a
        # stream's request lasts, and the timer is 500 bytes per stream.  Turning
        # keep-alive off cancels it; aiohttp sets keep-alive again from the response
        # once the stream ends.
        request.protocol.keep_alive(False)
        sent, why = last, CLIENT_GONE
        try:
            await resp.write(b"retry: %d\n\n" % (api.retry_ms + random.randrange(api.retry_ms)))
            if replay is None:
                replay = await _wait_for_replay(resp, api, sub, tid=tid, oid=oid, last=last)
            if replay.usable:
                sent, why = await _stream(resp, sub, replay.events, last, transport)
            elif sub.closed:
                why = sub.reason  # gone while it waited for the database, or shutdown
            else:
                why = "nothing to stream (the client reconnects and is told why)"
        except ConnectionError:
            pass  # the client went away (ConnectionResetError and kin)
        finally:
            _log.debug("stream_closed", onboarding_id=str(oid), last=sent, reason=why)
    return resp


# What the access log and the metrics count for a client that left before its answer
# began (nginx's "client closed request"); never sent.  Not a 5xx: the ConnectionError
# of writing the headers to a closed connection reached errors_as_problems as an
# OSError, and was logged and counted as the database being unavailable (503).
CLIENT_CLOSED_REQUEST = 499


def _gone_before_the_stream(oid: uuid.UUID, last: int) -> web.Response:
    _log.debug("stream_closed", onboarding_id=str(oid), last=last, reason=CLIENT_GONE)
    return web.Response(status=CLIENT_CLOSED_REQUEST)


# The highest version a crash of the database can take back: the first group of steps
# commits without waiting for the disk (tenantry.onboarding_run_steps); the group that
# ends the onboarding waits, and the accept (version 1) too.
_LOSABLE_VERSION = 1 + len(STEP_GROUPS[0])


@dataclass
class _Replay:
    """What the event log holds for a stream that resumes after `last`."""

    events: list[Event]
    found: bool = True  # the onboarding exists
    foreign: bool = False  # `last` is not an event of this stream
    ended: bool = False  # `last` was the terminal event: nothing more will come
    # `last` is above the unfinished onboarding's version: the client was shown steps
    # that a crash of the database then lost (their commits did not wait for the disk,
    # tenantry.onboarding_run_steps), and provisioning will do them again.
    ahead: bool = False

    @property
    def usable(self) -> bool:
        return self.found and not self.foreign and not self.ended and not self.ahead


async def _replay(api: OnboardingApi, tid: uuid.UUID, oid: uuid.UUID, last: int) -> _Replay:
    async with tenant_tx(api.pool, tid, index_plans=True) as tx:
        # From the client's last event on: whether that one was the end matters.
        events = await outbox.replay(tx, tid, AGGREGATE, str(oid), max(last - 1, 0))
        if not events:
            found = await machine.find(tx, tid, oid)
            if found is None:
                return _Replay([], found=False)
            if 0 < last <= _LOSABLE_VERSION and found.version < last:
                if not found.terminal:
                    return _Replay([], ahead=True)
                # Done again after a crash, the onboarding ended below what the client
                # was shown: its end, whatever the client saw before.
                return _Replay(await outbox.replay(tx, tid, AGGREGATE, str(oid), found.version - 1))
    if last > 0:
        if not events:
            return _Replay([], foreign=True)
        if events[0].version == last:
            seen = events.pop(0)
            if seen.type in TERMINAL_EVENTS:
                return _Replay([], ended=True)
    return _Replay(events)


async def _wait_for_replay(
    resp: web.StreamResponse,
    api: OnboardingApi,
    sub: Subscriber,
    *,
    tid: uuid.UUID,
    oid: uuid.UUID,
    last: int,
) -> _Replay:
    """Until the database answers, and holds the client's last event again (after a
    crash lost it, provisioning does it again): a keepalive comment between tries, so
    that the browser and any proxy keep the stream open.  (A stream that cannot go on
    once it answers, one already ended say, is closed; the browser reconnects and is
    told.)"""
    delay = 0.2
    retry_at = anyio.current_time() + delay
    while not sub.closed:
        with anyio.move_on_after(max(retry_at - anyio.current_time(), 0)):
            await sub.wait()  # a keepalive is due, or shutdown closed the stream
        # The hub's keepalives go out; its events can go: the replay, once the
        # database answers, reads them from the log.
        for version, _terminal, frame in sub.drain():
            if version == 0:
                await resp.write(frame)
        if sub.closed or anyio.current_time() < retry_at:
            continue
        try:
            replay = await _replay(api, tid, oid, last)
            if not replay.ahead:
                return replay
        except UNAVAILABLE:
            pass
        delay = min(delay * 2, 5.0)
        retry_at = anyio.current_time() + delay
    return _Replay([], ended=True)


async def _stream(
    resp: web.StreamResponse,
    sub: Subscriber,
    replay: list[Event],
    last: int,
    transport: asyncio.WriteTransport | None,
) -> tuple[int, str]:
    """Write the replay, then what the hub hands over; the last version sent and why
    the stream ends.  Once nothing is queued, a chunked response's transport is
    attached to the stream: the hub writes to it directly from then on, and this
    task wakes only to write what the hub had to queue (the client read too slowly)
    and at the end."""
    sent, ended = await _write_replay(resp, replay, last)
    if ended:
        return sent, "terminal event"
    sub.sent = sent
    if not resp.chunked:
        transport = None  # (an HTTP/1.0 client): this task writes every frame
    while not sub.closed:
        while (queued := sub.next_frame()) is not None:
            version, terminal, frame = queued
            if version == 0:
                await resp.write(frame)  # keepalive
                continue
            if version <= sub.sent:
                continue  # the replay sent it already
            await resp.write(frame)
            sub.sent = version
            if terminal:
                return version, "terminal event"
        if transport is not None and not sub.closed and sub.transport is None:
            sub.attach(transport)
        await sub.wait()
    return sub.sent, sub.reason


async def _write_replay(
    resp: web.StreamResponse, replay: list[Event], last: int
) -> tuple[int, bool]:
    """Write the replayed events; the last version written, and whether it ended the
    stream.  The list is emptied as it is written: the stream may last for hours, and
    need not hold on to events it has sent."""
    sent = last
    while replay:
        ev = replay.pop(0)
        await resp.write(encode(ev))
        sent = ev.version
        if ev.type in TERMINAL_EVENTS:
            return sent, True
    return sent, False


def add_routes(
    app: web.Application, api: OnboardingApi, cors_origins: tuple[str, ...] = ()
) -> None:
    app[ONBOARDING] = api
    routes = [
        app.router.add_post("/v1/onboardings", create),
        app.router.add_get("/v1/onboardings/{id}", status),
        app.router.add_get("/v1/onboardings/{id}/events", events),
    ]
    if cors_origins:
        # A frontend on another origin signs up and follows its onboarding: these
        # routes answer its preflight and name it in Access-Control-Allow-Origin.  No
        # credentials (cookies): the status token travels in a header or the query.
        options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
            allow_credentials=False,
            allow_headers=("Content-Type", "Idempotency-Key", "Authorization",
                           "Last-Event-ID", "X-Request-ID"),
            expose_headers=("Location", "Retry-After", "Idempotent-Replayed", "X-Request-ID"),
            max_age=600,
        )  # fmt: skip
        cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(cors_origins, options))
        for route in routes:
            cors.add(route)
