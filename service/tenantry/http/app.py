"""The HTTP edge: thin aiohttp handlers.  Liveness and readiness here; tenant routes
in tenant_api."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncpg
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from anyio.abc import TaskStatus

from .. import logging as log
from ..db import UNAVAILABLE
from ..errors import StartupError
from ..metrics import CONTENT_TYPE, Metrics
from ..ops import web as ops_web
from ..ops.web import Dashboard
from ..safetext import safe_text
from . import onboarding_api, openapi, tenant_api, webhooks_api
from .access import OBSERVER, request_log, return_request_id
from .onboarding_api import OnboardingApi
from .problems import json_response, problem
from .protocol import ProblemAppRunner, refusal
from .webhooks_api import WebhooksApi

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _no_problems() -> dict[str, str]:
    return {}


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Readiness:
    """`check()`: named checks, each true when fine.  `problems()`: what components
    report they cannot do right now (a failing claim, a crashed loop), by name.
    `draining()`: true from the moment a stop begins (SIGTERM)."""

    check: ReadinessCheck
    problems: Callable[[], dict[str, str]] = _no_problems
    draining: Callable[[], bool] = _never


READINESS = web.AppKey("readiness", Readiness)


class InFlight:
    """The requests being handled (those a draining process refuses aside): a stopping
    process answers them before it closes its connections, since from then on the
    server reads nothing more (a body still arriving would never arrive)."""

    def __init__(self) -> None:
        self.count = 0
        self._changed: anyio.Event | None = None  # made by a waiter (in the loop)

    def handling(self) -> InFlight:
        """`with in_flight.handling():` counts a request while it is handled.  (Not a
        generator-based context manager: that would be one suspended frame more per
        open stream.)"""
        return self

    def __enter__(self) -> None:
        self.count += 1

    def __exit__(self, *_exc: object) -> None:
        self.count -= 1
        if self._changed is not None:
            self._changed.set()

    async def wait_idle(self) -> None:
        while self.count:
            self._changed = anyio.Event()
            await self._changed.wait()


IN_FLIGHT = web.AppKey("in_flight", InFlight)


async def healthz(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    readiness = request.app[READINESS]
    checks = await readiness.check()
    problems = readiness.problems()
    ready = all(checks.values()) and not problems
    return json_response(
        {"status": "ready" if ready else "not ready", "checks": checks, "problems": problems},
        200 if ready else 503,
    )


_STATIC = Path(__file__).with_name("static")
_PAGE = _STATIC / "index.html"
_ICON = _STATIC / "favicon.svg"
_DOCS = _STATIC / "docs"
# The contract's viewer (/docs) loads its script, styles and the document from this
# origin only: no CDN, no inline script or style, nothing framed, no form posted away.
# The one source besides 'self': `data:` images, the icons Swagger UI's own stylesheet
# embeds (they load nothing from anywhere).
DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none';"
    " form-action 'none'; frame-ancestors 'none'"
)
# The viewer's files, with their media types (vendored: see static/docs/VENDORED.md).
_DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "docs.js": "text/javascript",
}
# Seconds a client is told to wait when the database is unavailable: about a restart.
RETRY_AFTER_S = 2
# Seconds a client is told to wait when this process is stopping: by then the load
# balancer sends the retry to another process.
DRAINING_RETRY_AFTER_S = 1
# What a stopping process still answers: the probes (a load balancer must read the 503
# of /readyz) and the scrape.
_ANSWERED_WHILE_DRAINING = frozenset({"/healthz", "/readyz", "/metrics"})


_ROUTING_DETAIL = {
    404: "there is nothing at this address",
    405: "this address does not answer that method (see the Allow header)",
}


def _detail_of(exc: web.HTTPException) -> str:
    """Ours for routing errors; else the text the raiser gave (aiohttp-cors says why a
    preflight is refused), unless it is only the default "403: Forbidden"."""
    if exc.status in _ROUTING_DETAIL:
        return _ROUTING_DETAIL[exc.status]
    text = (exc.text or "").strip()
    if not text or text == f"{exc.status}: {exc.reason}":
        return exc.reason
    return safe_text(text)[:300]


@web.middleware
async def errors_as_problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An error no handler expected is answered as problem JSON, never with a stack
    trace: the database being away as 503 with Retry-After, anything else (a bug) as
    500, logged with its traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # not an error: 204, a redirect
        # The router's 404 and 405, and any other the framework raises: problem JSON,
        # with the exception's headers (Allow for a 405).
        headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
        return problem(exc.status, _detail_of(exc), headers=headers)
    except (HttpProcessingError, web.RequestPayloadError) as exc:
        # A body the framework cannot read (bad compression, a broken chunk): the
        # client's fault, said as such.
        cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
        return problem(400, f"the request body could not be read: {refusal(cause)}")
    except UNAVAILABLE as exc:
        # The database is away (restarting, unreachable, a connection broken): the
        # request can succeed a moment later, which is what 503 and Retry-After say.
        log.get("http").warning(
            "http_database_unavailable",
            method=request.method,
            path=request.path,
            error=safe_text(str(exc)) or type(exc).__name__,
        )
        return problem(
            503,
            "the database is unavailable at the moment; retry shortly",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    except Exception:
        log.get("http").exception("http_unhandled", method=request.method, path=request.path)
        return problem(500, "the request could not be completed; try again later")


@web.middleware
async def refuse_while_draining(request: web.Request, handler: Handler) -> web.StreamResponse:
    """From SIGTERM on, a new request is refused with 503 and Retry-After (a sign-up
    retried with its Idempotency-Key is safe), and its connection closed, so that the
    client or the load balancer goes to another process; a stream opened now would be
    cut at the exit anyway.  Requests already in flight go on to their end (the stop
    waits for them: InFlight).  A CORS preflight is still answered (it touches nothing):
    refused, it is only a network error to the page, which then never sees the 503 and
    Retry-After of its request."""
    draining = request.app[READINESS].draining()
    if draining and request.path not in _ANSWERED_WHILE_DRAINING and not _preflight(request):
        response = problem(
            503,
            "this server is restarting: please retry in a moment (another one will answer)",
            headers={"Retry-After": str(DRAINING_RETRY_AFTER_S)},
        )
        response.force_close()
        return response
    with request.app[IN_FLIGHT].handling():
        answer = await handler(request)
    if draining:
        answer.force_close()  # the next request goes to another process
    return answer


def _preflight(request: web.Request) -> bool:
    return (
        request.method == "OPTIONS"
        and "Origin" in request.headers
        and "Access-Control-Request-Method" in request.headers
    )


def _static(
    path: Path,
    content_type: str,
    cache_control: str,
    charset: str | None = None,
    headers: dict[str, str] | None = None,
) -> Handler:
    """A file of the package, read once, answered whole: a Range header is ignored
    (HTTP allows it), so no request for these can get the framework's own 416."""
    body = path.read_bytes()
    fixed = {"Cache-Control": cache_control, "X-Content-Type-Options": "nosniff", **(headers or {})}

    async def serve(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type=content_type, charset=charset, headers=fixed)

    return serve


async def openapi_document(_request: web.Request) -> web.Response:
    return web.Response(
        body=openapi.document_json(),
        content_type="application/json",
        headers={"Cache-Control": "no-cache"},
    )


def _add_contract_routes(app: web.Application) -> None:
    """The OpenAPI document, and the page that renders it."""
    app.router.add_get("/openapi.json", openapi_document)
    page = _static(
        _DOCS / "index.html",
        "text/html",
        "no-cache",
        "utf-8",
        {"Content-Security-Policy": DOCS_CSP},
    )
    app.router.add_get("/docs", page)
    for name, content_type in _DOCS_ASSETS.items():
        asset = _static(_DOCS / name, content_type, "max-age=3600", "utf-8")
        app.router.add_get(f"/docs/{name}", asset)


def build_app(
    readiness: Readiness,
    pool: asyncpg.Pool | None = None,
    onboarding: OnboardingApi | None = None,
    *,
    cors_origins: tuple[str, ...] = (),
    webhooks: WebhooksApi | None = None,
    metrics: Metrics | None = None,
    dashboard: Dashboard | None = None,
    serve_metrics: bool = True,
    public: bool = True,
) -> web.Application:
    """The service's routes.  `public` False: the probes and /metrics only (a
    worker-only process, TENANTRY_HTTP=false)."""
    app = web.Application(
        client_max_size=onboarding_api.MAX_BODY * 4,
        middlewares=[request_log, errors_as_problems, refuse_while_draining],
    )
    app[READINESS] = readiness
    app[IN_FLIGHT] = InFlight()
    app.on_response_prepare.append(return_request_id)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if metrics is not None:
        app[OBSERVER] = metrics.http_request
        if serve_metrics:
            app.router.add_get("/metrics", _metrics_route(metrics))
    if not public:
        return app
    # The contract documents the public interface: served where that interface is.
    _add_contract_routes(app)
    if dashboard is not None:
        ops_web.add_routes(app, dashboard)
    if pool is not None:
        tenant_api.add_routes(app, pool)
    if webhooks is not None:
        webhooks_api.add_routes(app, webhooks)
    if onboarding is not None:
        onboarding_api.add_routes(app, onboarding, cors_origins)
        app.router.add_get("/", _static(_PAGE, "text/html", "no-cache", "utf-8"))
        # One SVG for both names: the page links /favicon.svg, and what asks for
        # /favicon.ico on its own (bookmarks, some browsers) gets it too, not a 404.
        icon = _static(_ICON, "image/svg+xml", "max-age=86400")
        app.router.add_get("/favicon.svg", icon)
        app.router.add_get("/favicon.ico", icon)
    return app


def build_metrics_app(metrics: Metrics) -> web.Application:
    """/metrics alone, for a port of its own (TENANTRY_METRICS_PORT): scrapers reach
    it, the public does not."""
    app = web.Application(middlewares=[errors_as_problems])
    app.router.add_get("/metrics", _metrics_route(metrics))
    return app


def _metrics_route(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def scrape(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    return scrape


class HttpServer:
    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._app = app
        self._host = host
        self._port = port
        self.port: int | None = None  # the bound port (useful with port 0)

    @property
    def app(self) -> web.Application:
        """The application served (its routes are the contract's: test_openapi.py)."""
        return self._app

    @property
    def in_flight(self) -> int:
        """Requests being handled now (build_app's applications; 0 for others)."""
        tracked = self._app.get(IN_FLIGHT)
        return tracked.count if tracked is not None else 0

    async def wait_idle(self) -> None:
        """Until no request is being handled: a stop waits for this before the server
        closes its connections."""
        tracked = self._app.get(IN_FLIGHT)
        if tracked is not None:
            await tracked.wait_idle()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        runner = ProblemAppRunner(
            self._app, access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            try:
                await site.start()
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {self._host}:{self._port}: {exc.strerror or exc}"
                    " (set TENANTRY_PORT or --port)"
                ) from exc
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1] if sockets else self._port
            log.get("http").info("http_listening", host=self._host, port=self.port)
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
