"""The operations dashboard at /ops: server-rendered pages (Jinja2, escaped by default),
a little JavaScript for live updates over SSE, and forms for the actions.

Never open: every page needs a session, made by signing in with an operator's key or a
one-time link (`tenantry operators ...`).  The cookie is HttpOnly, SameSite=Strict,
and Secure when the page is served over HTTPS; every action is a POST carrying the
session's CSRF token (and, when the browser sends one, an Origin of this host), and
only an `admin` may act.  Every action is recorded (tenantry/ops/audit.py).
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import anyio
import asyncpg
import jinja2
import orjson
from aiohttp import hdrs, web
from markupsafe import Markup

from ..analytics import store as analytics_store
from ..db import UNAVAILABLE, Conn
from ..errors import Conflict, Invalid, NotFound, TenantryError
from ..jobs import queue as jobs
from ..jobs.registry import Registration
from ..metrics import DatabaseGauges
from ..onboarding import machine
from ..onboarding.model import AGGREGATE
from ..outbox import store as outbox
from ..tenancy import parse_tenant_id, tenant_tx
from ..tenants import store as tenants
from ..webhooks import deliveries as delivery_states
from ..webhooks import operators as webhook_ops
from . import audit, forms
from . import operators as ops
from .live import Feed

_HERE = Path(__file__).parent
COOKIE = "tenantry_ops"
PAGE_SIZE = 50
# What a page shows of a payload, a body or a traceback at most.
SHOWN_MAX = 64 * 1024
# Security headers of every page: nothing from elsewhere, never in a frame, no referrer
# to other sites (a sign-in link's token must not travel on; not `no-referrer`, under
# which browsers send `Origin: null` with a form, which the origin check refuses),
# nothing cached.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
JOB_STATES = jobs.JOB_STATES
DEAD_REASONS = jobs.DEAD_REASONS
DELIVERY_STATES = delivery_states.STATES


@dataclass
class Dashboard:
    """What the pages read: the worker's login (the cross-tenant functions, through
    connections of their own) and the service's (a tenant's own rows, under row-level
    security), the metrics' latest database reading, the periodic handlers, and the
    feed of changes."""

    ops_pool: asyncpg.Pool  # the worker's login, a pool of its own (db.create_ops_pool)
    tenant_pool: asyncpg.Pool
    feed: Feed
    periodic: Sequence[Registration] = ()
    # The metrics' database reading (the depth of this process's queues, every few
    # seconds), which also reads the depth of other queues on demand.
    gauges: DatabaseGauges | None = None
    # This process's own queues: shown even before they hold a job.
    settings_queues: Sequence[str] = ()
    # Open live streams (/ops/events) this process serves at most, and how often each
    # checks that its session still holds (a disabled operator's streams end).
    max_streams: int = 100
    session_check_every: float = 15.0
    # The analytics views on the read replica (TENANTRY_ANALYTICS_URL), or None.
    analytics: analytics_store.Reader | None = None
    streams: int = 0
    _other_depths: tuple[float, frozenset[str], list[dict[str, Any]]] | None = None
    # Charts: (since, bucket) seconds -> (when read, per queue buckets).
    _charts: dict[tuple[int, int], tuple[float, dict[str, list[jobs.Bucket]]]] = field(
        default_factory=dict
    )

    async def depths(self, queues: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Each queue's depth: this process's from the metrics' reading, the others'
        read here at most every 5 s (counted up to the same cap)."""
        if self.gauges is None:
            return {}
        found = {d["queue"]: d for d in self.gauges.depth() or []}
        missing = frozenset(q for q in queues if q not in found)
        if missing:
            held = self._other_depths
            if held is None or held[1] != missing or time.monotonic() - held[0] > 5:
                held = (time.monotonic(), missing, await self.gauges.read_depth(sorted(missing)))
                self._other_depths = held
            found.update({d["queue"]: d for d in held[2]})
        return found

    async def charts(self, since_s: int, bucket_s: int) -> dict[str, list[jobs.Bucket]]:
        """Throughput per queue, read at most every 15 s however many pages ask."""
        key = (since_s, bucket_s)
        held = self._charts.get(key)
        if held is not None and time.monotonic() - held[0] < 15:
            return held[1]
        async with self.ops_pool.acquire() as conn:
            found = await jobs.throughput(conn, since_s, bucket_s)
        self._charts[key] = (time.monotonic(), found)
        return found


DASHBOARD = web.AppKey("ops_dashboard", Dashboard)
OPERATOR = web.RequestKey("ops_operator", ops.Operator)

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    return _duration((datetime.now(UTC) - value).total_seconds())


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = abs(seconds)
    text = f"{s:.1f}s" if s < 60 else f"{s / 60:.0f}m" if s < 3600 else f"{s / 3600:.1f}h"
    return text if seconds >= 0 else f"in {text}"


def _shown(value: Any) -> str:
    """A value as an operator reads it: JSON, indented, cut at SHOWN_MAX."""
    if isinstance(value, str):
        text = value
    else:
        text = orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode()
    if len(text) > SHOWN_MAX:
        return text[:SHOWN_MAX] + f"\n... ({len(text) - SHOWN_MAX} more characters not shown)"
    return text


def _chart(buckets: list[jobs.Bucket]) -> Markup:
    """Bars of completed (and, stacked on them, failed attempts and dead jobs) per
    bucket, as inline SVG: no script, no library."""
    if not buckets:
        return Markup("")
    top = max((b.succeeded + b.failed + b.dead for b in buckets), default=0) or 1
    width = 4
    parts = []
    for i, b in enumerate(buckets):
        x = i * width
        y = 40.0
        for value, cls in ((b.succeeded, "ok"), (b.failed, "failed"), (b.dead, "dead")):
            if value:
                h = 40.0 * value / top
                y -= h
                parts.append(
                    f'<rect class="{cls}" x="{x}" y="{y:.2f}" width="{width - 1}"'
                    f' height="{h:.2f}"><title>{_when(b.at)}: {value} {cls}</title></rect>'
                )
    total = sum(b.succeeded for b in buckets)
    failed = sum(b.failed for b in buckets)
    label = f"{total} completed, {failed} failed attempts"
    return Markup(
        f'<svg class="chart" viewBox="0 0 {len(buckets) * width} 40"'
        f' preserveAspectRatio="none" role="img" aria-label="{label}">{"".join(parts)}</svg>'
    )


_env.filters["when"] = _when
_env.filters["ago"] = _ago
_env.filters["duration"] = _duration
_env.filters["shown"] = _shown
_env.filters["chart"] = _chart


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    operator = request.get(OPERATOR)
    body = _env.get_template(template).render(
        operator=operator, path=request.path, query=request.query, **context
    )
    return web.Response(
        text=body, status=status, content_type="text/html", charset="utf-8", headers=HEADERS
    )


def _query(**params: Any) -> str:
    """A query string of the parameters that are set."""
    return urlencode({k: v for k, v in params.items() if v not in (None, "")})


_env.globals["qs"] = _query
_env.globals["DEAD_REASONS"] = DEAD_REASONS
_env.globals["JOB_STATES"] = JOB_STATES
_env.globals["DELIVERY_STATES"] = DELIVERY_STATES


# --- Sign-in ------------------------------------------------------------------------


Page = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _secure(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "") == "https"


def _same_origin(request: web.Request) -> bool:
    """A browser sends Origin with a POST; when it does, it must be this site: its
    scheme and host as this request arrived, or as a proxy in front says it arrived
    (X-Forwarded-Proto, X-Forwarded-Host: a proxy that rewrites Host).  `null` (a
    sandboxed or privacy-stripped origin) is never this site.  The CSRF token is the
    guard; this is a second one."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    schemes = {request.scheme, request.headers.get("X-Forwarded-Proto", "").strip()}
    hosts = {request.host, request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()}
    return parts.scheme in schemes - {""} and parts.netloc in hosts - {""}


async def _signed_in(request: web.Request) -> ops.Operator | None:
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    async with request.app[DASHBOARD].ops_pool.acquire() as conn:
        found = await ops.session(conn, cookie)
    return found[0] if found is not None else None


def page(handler: Page) -> Page:
    """A page for any signed-in operator; others go to the sign-in page."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        operator = await _signed_in(request)
        if operator is None:
            target = request.path_qs if request.method == "GET" else "/ops"
            raise web.HTTPSeeOther(f"/ops/sign-in?{urlencode({'next': target})}")
        request[OPERATOR] = operator
        try:
            return await handler(request)
        except Invalid as exc:
            return _refused(request, 422, f"{exc.field}: {exc.message}")
        except NotFound as exc:
            return _refused(request, 404, str(exc))
        except asyncpg.QueryCanceledError:
            return _refused(request, 503, TOO_SLOW)

    return wrapped


# A statement past the dashboard's statement_timeout (tenantry.db.OPS_TIMEOUTS).
TOO_SLOW = "This took longer than the dashboard allows (10 s): narrow the filter."


def action(handler: Page) -> Page:
    """A POST by an admin, with the session's CSRF token."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        operator = await _signed_in(request)
        if operator is None:
            return _refused(request, 401, "Your session has ended: sign in again.")
        request[OPERATOR] = operator
        form = await request.post()
        token = str(form.get("csrf", ""))
        if not _same_origin(request) or not hmac.compare_digest(
            token.encode(), operator.csrf.encode()
        ):
            return _refused(request, 403, "This form is stale or came from elsewhere: reload")
        if not operator.admin:
            return _refused(request, 403, "Only an admin may do this; your role is read.")
        try:
            return await handler(request)
        except Invalid as exc:
            return _refused(request, 422, f"{exc.field}: {exc.message}")
        except NotFound as exc:
            return _refused(request, 404, str(exc))
        except Conflict as exc:
            return _refused(request, 409, str(exc))
        except asyncpg.SerializationError:
            # A bulk action runs in one snapshot (REPEATABLE READ): a row it would
            # change was changed meanwhile by someone else.
            return _refused(request, 409, "Someone changed these rows meanwhile: look again.")
        except asyncpg.QueryCanceledError:
            return _refused(request, 503, TOO_SLOW)

    return wrapped


def _refused(request: web.Request, status: int, message: str) -> web.Response:
    return render(request, "error.html", status=status, message=message)


def _next_path(raw: str) -> str:
    """Only a path of the dashboard: never a redirect elsewhere."""
    parts = urlsplit(raw)
    if parts.scheme or parts.netloc or not parts.path.startswith("/ops") or "\\" in raw:
        return "/ops"
    return raw


async def sign_in_page(request: web.Request) -> web.StreamResponse:
    return render(
        request,
        "sign_in.html",
        link=request.query.get("link", ""),
        next=_next_path(request.query.get("next", "/ops")),
        failed=False,
    )


async def sign_in(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    key = str(form.get("key", "")).strip()
    link = str(form.get("link", "")).strip()
    target = _next_path(str(form.get("next", "/ops")))
    if not _same_origin(request):
        return _refused(request, 403, "This form came from elsewhere.")
    async with request.app[DASHBOARD].ops_pool.acquire() as conn:
        made = await ops.sign_in(conn, key=key or None, link_token=link or None)
    if made is None:
        return render(request, "sign_in.html", status=401, link="", next=target, failed=True)
    response = web.HTTPSeeOther(target, headers=HEADERS)
    response.set_cookie(
        COOKIE,
        made.cookie,
        max_age=ops.SESSION_TTL_S,
        path="/ops",
        httponly=True,
        secure=_secure(request),
        samesite="Strict",
    )
    raise response


async def sign_out(request: web.Request) -> web.StreamResponse:
    operator = await _signed_in(request)
    form = await request.post()
    if operator is not None:
        # A live session ends only with its own token: a forged sign-out must not look
        # like one (clearing the cookie here while the session lives on).
        if not hmac.compare_digest(str(form.get("csrf", "")).encode(), operator.csrf.encode()):
            request[OPERATOR] = operator
            return _refused(request, 403, "This form is stale or came from elsewhere: reload")
        async with request.app[DASHBOARD].ops_pool.acquire() as conn:
            await ops.sign_out(conn, request.cookies.get(COOKIE, ""))
    response = web.HTTPSeeOther("/ops/sign-in", headers=HEADERS)
    response.del_cookie(COOKIE, path="/ops")
    raise response


# --- Pages --------------------------------------------------------------------------


def _dash(request: web.Request) -> Dashboard:
    return request.app[DASHBOARD]


@page
async def overview(request: web.Request) -> web.StreamResponse:
    dash = _dash(request)
    async with dash.ops_pool.acquire() as conn:
        controls = {c.queue: c for c in await jobs.queue_controls(conn)}
    hour = await dash.charts(3600, 60)
    day = await dash.charts(86400, 1800)
    names = sorted(set(controls) | set(hour) | set(dash.settings_queues))
    depth = await dash.depths(names)
    queues = [
        {
            "name": q,
            "control": controls.get(q),
            "depth": depth.get(q),
            "hour": hour.get(q, []),
            "day": day.get(q, []),
        }
        for q in names
    ]
    async with dash.ops_pool.acquire() as conn:
        hooks = await webhook_ops.stats(conn)
    return render(request, "overview.html", queues=queues, webhooks=hooks)


def _job_search(q: Any) -> jobs.JobSearch:
    payload = forms.text(q, "payload")
    return jobs.JobSearch(
        queue=forms.text(q, "queue"),
        kind=forms.text(q, "kind"),
        state=forms.choice(q, "state", JOB_STATES),
        tenant_id=forms.uuid_of(q, "tenant"),
        job_id=forms.whole_of(q, "id"),
        payload=jobs.parse_payload_filter(payload) if payload else None,
    )


def _key_after(q: Any) -> tuple[uuid.UUID, int] | None:
    raw = forms.text(q, "after")
    if raw is None:
        return None
    tenant, _, ident = raw.partition(":")
    try:
        return uuid.UUID(tenant), forms.whole(ident, "after")
    except ValueError as exc:
        raise Invalid("after", "a page cursor is TENANT:ID") from exc


@page
async def jobs_page(request: web.Request) -> web.StreamResponse:
    q = request.query
    try:
        search = _job_search(q)
        after = _key_after(q)
    except Invalid as exc:
        return render(
            request, "jobs.html", status=422, error=f"{exc.field}: {exc.message}", found=None
        )
    async with _dash(request).ops_pool.acquire() as conn:
        found = await jobs.jobs_search(conn, search, after, PAGE_SIZE)
    next_after = f"{found.next_key[0]}:{found.next_key[1]}" if found.next_key else None
    return render(request, "jobs.html", error=None, found=found, next_after=next_after)


def _job_path_args(request: web.Request) -> tuple[uuid.UUID, int]:
    try:
        return uuid.UUID(request.match_info["tenant"]), forms.whole(request.match_info["id"], "id")
    except (ValueError, Invalid) as exc:
        raise web.HTTPNotFound() from exc


@page
async def job_page(request: web.Request) -> web.StreamResponse:
    tenant_id, job_id = _job_path_args(request)
    async with _dash(request).ops_pool.acquire() as conn:
        try:
            job = await jobs.job_show(conn, job_id, tenant_id)
            dead = False
        except NotFound:
            try:
                job = await jobs.dead_show(conn, job_id, tenant_id)
                dead = True
            except NotFound:
                return _refused(
                    request, 404, f"No job {job_id} of tenant {tenant_id}: it may have finished."
                )
    return render(request, "job.html", job=job, dead=dead)


def _dead_filter(q: Any) -> jobs.DeadFilter:
    return jobs.DeadFilter(
        kind=forms.text(q, "kind"),
        tenant_id=forms.uuid_of(q, "tenant"),
        reason=forms.choice(q, "reason", DEAD_REASONS),
    )


def _dead_before(q: Any) -> tuple[datetime, int] | None:
    raw = forms.text(q, "before")
    if raw is None:
        return None
    at, _, ident = raw.rpartition("~")
    return forms.moment(at, "before"), forms.whole(ident, "before")


@page
async def dead_page(request: web.Request) -> web.StreamResponse:
    q = request.query
    try:
        matching = _dead_filter(q)
        before = _dead_before(q)
    except Invalid as exc:
        return render(
            request,
            "dead.html",
            status=422,
            error=f"{exc.field}: {exc.message}",
            rows=[],
            next_before=None,
        )
    async with _dash(request).ops_pool.acquire() as conn:
        rows = await jobs.dead_page(conn, matching, before, PAGE_SIZE)
    next_before = (
        f"{rows[-1]['died_at'].isoformat()}~{rows[-1]['id']}" if len(rows) == PAGE_SIZE else None
    )
    return render(request, "dead.html", error=None, rows=rows, next_before=next_before)


@page
async def dead_preview(request: web.Request) -> web.StreamResponse:
    """The count of what a bulk retry or discard would change, and a form to go on."""
    q = request.query
    what = forms.required_choice(q, "action", ("retry", "discard"))
    matching = _dead_filter(q)
    async with _dash(request).ops_pool.acquire() as conn:
        count = await jobs.dead_count(conn, matching)
    return render(
        request,
        "dead_preview.html",
        what=what,
        matching=matching,
        count=count,
        expected=_expected(what, count),
    )


def _expected(what: str, count: int) -> str:
    """What a preview's form carries back: the action with the count shown for it, so
    a count shown for one action cannot confirm another."""
    return f"{what}:{count}"


def _filter_detail(matching: jobs.DeadFilter) -> dict[str, Any]:
    return {
        "kind": matching.kind,
        "tenant": str(matching.tenant_id) if matching.tenant_id else None,
        "reason": matching.reason,
    }


@action
async def dead_bulk(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    what = forms.required_choice(form, "action", ("retry", "discard"))
    matching = _dead_filter(form)
    expected = str(form.get("expected", ""))
    operator = request[OPERATOR]

    async def change(conn: Conn) -> int:
        # The count shown is what the operator agreed to: if the matching set grew or
        # shrank since, say so rather than act on rows nobody saw counted.  Counted and
        # changed in one snapshot (REPEATABLE READ): a job dying between the two
        # statements is neither counted nor acted on.
        now = await jobs.dead_count(conn, matching)
        if _expected(what, now) != expected:
            raise Conflict(
                f"{now} dead jobs match now, not the count shown ({expected or 'none'}):"
                " look again first"
            )
        if what == "retry":
            return await jobs.dead_retry_matching(conn, matching)
        return await jobs.dead_discard_matching(conn, matching)

    n = await audit.act(
        _dash(request).ops_pool,
        operator.name,
        f"dead_jobs_{what}",
        _filter_detail(matching),
        change,
        isolation="repeatable_read",
    )
    return _done(
        request, f"{n} dead job(s) {'retried' if what == 'retry' else 'discarded'}.", "/ops/dead"
    )


@action
async def dead_one(request: web.Request) -> web.StreamResponse:
    tenant_id, job_id = _job_path_args(request)
    form = await request.post()
    what = forms.required_choice(form, "action", ("retry", "discard"))

    async def change(conn: Conn) -> int:
        if what == "retry":
            await jobs.dead_retry(conn, job_id, tenant_id)
        else:
            await jobs.dead_discard(conn, job_id, tenant_id)
        return 1

    await audit.act(
        _dash(request).ops_pool,
        request[OPERATOR].name,
        f"dead_job_{what}",
        {"tenant": str(tenant_id), "job": job_id},
        change,
    )
    done = "retried" if what == "retry" else "discarded"
    return _done(request, f"Dead job {job_id} {done}.", "/ops/dead")


def _done(request: web.Request, message: str, back: str) -> web.Response:
    return render(request, "done.html", message=message, back=back)


@action
async def queue_control(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    name = jobs.queue_name(forms.text(form, "queue") or "")
    what = str(form.get("action", ""))
    operator = request[OPERATOR]
    settings: dict[str, Any]
    if what in ("pause", "resume"):
        settings = {"paused": what == "pause"}
        detail: dict[str, Any] = {"queue": name}
        action_name = f"queue_{what}d"
    elif what == "concurrency":
        raw = forms.text(form, "concurrency")
        value = None if raw in (None, "default") else forms.whole(raw, "concurrency", 1, 10_000)
        settings = {"concurrency": value, "clear_concurrency": value is None}
        detail = {"queue": name, "concurrency": value}
        action_name = "queue_concurrency"
    else:
        raise Invalid("action", "pause, resume or concurrency")

    async def change(conn: Conn) -> int:
        await jobs.set_queue_control(conn, name, operator.name, **settings)
        return 1

    await audit.act(_dash(request).ops_pool, operator.name, action_name, detail, change)
    raise web.HTTPSeeOther("/ops", headers=HEADERS)


@page
async def webhooks_page(request: web.Request) -> web.StreamResponse:
    match = _delivery_match(request.query)
    async with _dash(request).ops_pool.acquire() as conn:
        endpoints = await webhook_ops.endpoints(conn, match.tenant_id, PAGE_SIZE)
        deliveries = await webhook_ops.deliveries(conn, match, PAGE_SIZE)
        stats = await webhook_ops.stats(conn)
    return render(
        request,
        "webhooks.html",
        endpoints=endpoints,
        deliveries=deliveries,
        stats=stats,
        match=match,
    )


@page
async def delivery_page(request: web.Request) -> web.StreamResponse:
    try:
        ident = uuid.UUID(request.match_info["id"])
    except ValueError as exc:
        raise web.HTTPNotFound() from exc
    async with _dash(request).ops_pool.acquire() as conn:
        try:
            found = await webhook_ops.delivery(conn, ident)
        except NotFound as exc:
            return _refused(request, 404, str(exc))
    return render(request, "delivery.html", d=found)


def _delivery_match(src: Any, *, replay: bool = False) -> webhook_ops.DeliveryMatch:
    """A filter over deliveries.  For a replay without a state, the dead ones: sending
    every delivered webhook again is never what "replay all" meant (as `tenantry
    webhooks replay`)."""
    state = forms.choice(src, "state", DELIVERY_STATES)
    return webhook_ops.DeliveryMatch(
        state=state or ("dead" if replay else None),
        tenant_id=forms.uuid_of(src, "tenant"),
        endpoint_id=forms.uuid_of(src, "endpoint"),
        event_type=forms.text(src, "event_type"),
    )


@page
async def deliveries_preview(request: web.Request) -> web.StreamResponse:
    q = request.query
    what = forms.required_choice(q, "action", ("replay", "discard"))
    match = _delivery_match(q, replay=what == "replay")
    async with _dash(request).ops_pool.acquire() as conn:
        count = await webhook_ops.act(conn, what, match=match, only_count=True)
    return render(
        request,
        "deliveries_preview.html",
        what=what,
        match=match,
        count=count,
        expected=_expected(what, count),
    )


@action
async def deliveries_act(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    what = forms.required_choice(form, "action", ("replay", "discard"))
    one = forms.uuid_of(form, "delivery")
    match = _delivery_match(form, replay=what == "replay")
    expected = str(form.get("expected", ""))

    async def change(conn: Conn) -> int:
        if one is not None:
            n = await webhook_ops.act(conn, what, delivery_id=one)
            if n == 0:
                raise Conflict(f"delivery {one} is not in a state to {what}")
            return n
        now = await webhook_ops.act(conn, what, match=match, only_count=True)
        if _expected(what, now) != expected:
            raise Conflict(
                f"{now} deliveries match now, not the count shown ({expected or 'none'}):"
                " look again"
            )
        return await webhook_ops.act(conn, what, match=match)

    detail: dict[str, Any] = (
        {"delivery": str(one)}
        if one is not None
        else {
            "state": match.state,
            "tenant": str(match.tenant_id) if match.tenant_id else None,
            "endpoint": str(match.endpoint_id) if match.endpoint_id else None,
            "event_type": match.event_type,
        }
    )
    n = await audit.act(
        _dash(request).ops_pool,
        request[OPERATOR].name,
        f"deliveries_{what}",
        detail,
        change,
        isolation="repeatable_read",
    )
    done = "replayed" if what == "replay" else "discarded"
    return _done(request, f"{n} deliver{'y' if n == 1 else 'ies'} {done}.", "/ops/webhooks")


@page
async def tenants_page(request: web.Request) -> web.StreamResponse:
    async with _dash(request).ops_pool.acquire() as conn:
        rows = await tenants.list_tenants(conn, 200)
    return render(request, "tenants.html", tenants=rows)


@page
async def tenant_page(request: web.Request) -> web.StreamResponse:
    try:
        tenant_id = parse_tenant_id(request.match_info["id"])
    except Exception as exc:
        raise web.HTTPNotFound() from exc
    dash = _dash(request)
    # The tenant's own rows, read in its context (row-level security), with the
    # tenant code's login: the dashboard sees what the tenant's API would.
    try:
        tenant = await tenants.get_tenant(dash.tenant_pool, tenant_id)
    except NotFound as exc:
        return _refused(request, 404, str(exc))
    onboardings = await machine.of_tenant(dash.tenant_pool, tenant_id)
    events: dict[uuid.UUID, list[outbox.Event]] = {}
    async with tenant_tx(dash.tenant_pool, tenant_id, index_plans=True) as tx:
        for o in onboardings:
            events[o.id] = await outbox.events_after(tx, tenant_id, AGGREGATE, str(o.id), 0)
    return render(request, "tenant.html", tenant=tenant, onboardings=onboardings, events=events)


@page
async def periodic_page(request: web.Request) -> web.StreamResponse:
    dash = _dash(request)
    async with dash.ops_pool.acquire() as conn:
        runs = await jobs.periodic_runs(conn)
    now = datetime.now(UTC)
    rows = []
    for reg in dash.periodic:
        p = reg.periodic
        assert p is not None
        last = runs.get(reg.kind)
        rows.append(
            {
                "kind": reg.kind,
                "schedule": p.cron or f"every {p.every}",
                "queue": p.queue,
                "last_period": last[0] if last else None,
                "enqueued_at": last[1] if last else None,
                "next": p.next_after(p.period_start(now)),
            }
        )
    return render(request, "periodic.html", rows=rows)


@page
async def analytics_page(request: web.Request) -> web.StreamResponse:
    """The analytics views, read through the replica's own pool (never the primary's
    unless TENANTRY_ANALYTICS_ALLOW_PRIMARY): what cannot be read is said on the page."""
    days = analytics_store.check_days(forms.whole_of(request.query, "days") or 7)
    tenant = forms.uuid_of(request.query, "tenant")
    reader = _dash(request).analytics
    report, notice = None, analytics_store.NOT_CONFIGURED
    if reader is not None:
        try:
            report = await reader.report(days, tenant)
        except TenantryError as exc:  # a primary refused, the views or the grant missing
            notice = str(exc)
        except UNAVAILABLE as exc:
            notice = f"The read replica cannot be reached: {type(exc).__name__}"
        except asyncpg.TransactionRollbackError as exc:
            # A hot standby cancels a read that holds up its replay (40001, "conflict
            # with recovery"; 40P01): the next try usually goes through.
            notice = f"The read replica cancelled the read ({exc}): reload to try again."
    return render(request, "analytics.html", report=report, notice=notice, days=days)


@page
async def audit_page(request: web.Request) -> web.StreamResponse:
    before = forms.whole_of(request.query, "before")
    async with _dash(request).ops_pool.acquire() as conn:
        rows = await audit.page(conn, before, PAGE_SIZE)
    next_before = rows[-1]["id"] if len(rows) == PAGE_SIZE else None
    return render(request, "audit.html", rows=rows, next_before=next_before)


@page
async def events(request: web.Request) -> web.StreamResponse:
    """`changed` events while the page is open, at most one a second: the page then
    fetches itself again (ops.js).  The stream ends when its session does (checked
    every `session_check_every` seconds), and at once when the process stops (the
    page reconnects); a process serves `max_streams` at most."""
    dash = _dash(request)
    if dash.streams >= dash.max_streams:
        return _refused(request, 503, "Too many live pages are open: close some.")
    feed = dash.feed
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    if request.method == hdrs.METH_HEAD:
        # The headers alone: aiohttp answers HEAD on a GET route, and the stream below
        # would write its retry line and keepalives after them on a held connection.
        await response.prepare(request)
        return response
    dash.streams += 1
    try:
        await response.prepare(request)
        seen = feed.generation
        checked = time.monotonic()
        await response.write(b"retry: 3000\n\n")
        with feed.listening():
            while not feed.closed:  # closed: the process is stopping
                changed = await feed.wait_past(seen, within=dash.session_check_every)
                if feed.closed:
                    break
                if time.monotonic() - checked >= dash.session_check_every:
                    checked = time.monotonic()
                    try:
                        gone = await _signed_in(request) is None
                    except UNAVAILABLE:
                        gone = False  # the database is away: ask again next time
                    if gone:
                        break  # signed out, expired, or the operator disabled
                if changed:
                    seen = feed.generation
                    await response.write(b"event: changed\ndata: {}\n\n")
                    await anyio.sleep(1.0)  # the debounce: at most one a second
                else:
                    await response.write(b": keepalive\n\n")
    except ConnectionError:
        pass  # the page was closed or left (ConnectionResetError and kin)
    finally:
        dash.streams -= 1
    return response


_STATIC = _HERE / "static"


def _static_file(name: str, content_type: str) -> Page:
    body = (_STATIC / name).read_bytes()

    async def serve(_request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=body,
            content_type=content_type,
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    return serve


def add_routes(app: web.Application, dashboard: Dashboard) -> None:
    app[DASHBOARD] = dashboard
    r = app.router
    r.add_get("/ops", overview)
    r.add_get("/ops/sign-in", sign_in_page)
    r.add_post("/ops/sign-in", sign_in)
    r.add_post("/ops/sign-out", sign_out)
    r.add_get("/ops/events", events)
    r.add_get("/ops/jobs", jobs_page)
    r.add_get("/ops/jobs/{tenant}/{id}", job_page)
    r.add_get("/ops/dead", dead_page)
    r.add_get("/ops/dead/preview", dead_preview)
    r.add_post("/ops/dead/bulk", dead_bulk)
    r.add_post("/ops/dead/{tenant}/{id}", dead_one)
    r.add_post("/ops/queues", queue_control)
    r.add_get("/ops/webhooks", webhooks_page)
    r.add_get("/ops/webhooks/deliveries/preview", deliveries_preview)
    r.add_post("/ops/webhooks/deliveries", deliveries_act)
    r.add_get("/ops/webhooks/deliveries/{id}", delivery_page)
    r.add_get("/ops/tenants", tenants_page)
    r.add_get("/ops/tenants/{id}", tenant_page)
    r.add_get("/ops/periodic", periodic_page)
    r.add_get("/ops/audit", audit_page)
    r.add_get("/ops/analytics", analytics_page)
    r.add_get("/ops/static/ops.js", _static_file("ops.js", "text/javascript"))
    r.add_get("/ops/static/ops.css", _static_file("ops.css", "text/css"))
