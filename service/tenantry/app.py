"""The composition root: the one module that knows every component.

Start order: listener, hub, worker, maintenance, http.  Stop: SIGTERM/SIGINT -> not
ready (/readyz 503), streams closed, worker soft stop (no new claims), running jobs get
the grace period, then the rest is cancelled and handed back to the queue; a second
signal stops at once.  Signals are heard from the first moment: one that arrives while
the service is still starting stops it.  However the database behaves (blocking,
restarting, unreachable), the process ends within the grace period of the first signal
and at once after a second.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from prometheus_client.core import GaugeMetricFamily, Metric

from . import db, migrate, roles, tenancy
from . import logging as log
from .analytics import store as analytics
from .config import Settings, local_base_url
from .errors import Conflict, NotFound, SchemaMismatch
from .http.app import HttpServer, Readiness, build_app, build_metrics_app
from .http.onboarding_api import OnboardingApi
from .http.ratelimit import RateLimiter, parse_networks
from .http.webhooks_api import WebhooksApi
from .hub import Hub
from .jobs.maintenance import CounterPruner, LeaseRescuer, Maintenance, PeriodicEnqueuer, Pruner
from .jobs.registry import Registry
from .jobs.worker import Worker, WorkerConfig
from .listener import Listener
from .metrics import DatabaseGauges, Metrics, counter, gauge
from .onboarding import machine
from .onboarding.mail import mailer_for
from .onboarding.model import AGGREGATE, TERMINAL_EVENTS
from .onboarding.provision import Provisioner
from .onboarding.storage import LocalStorage
from .onboarding.tokens import Signer, load_secret
from .ops import operators
from .ops.live import Feed
from .ops.web import Dashboard
from .outbox import store as outbox
from .secretfile import load_or_create
from .supervise import Health
from .webhooks import upkeep as webhook_upkeep
from .webhooks.deliverer import Breaker, Deliverer, DeliveryConfig
from .webhooks.endpoints import EndpointRules, Endpoints
from .webhooks.fanout import FanOut
from .webhooks.guard import Guard
from .webhooks.guard import parse_networks as parse_cidrs
from .webhooks.secrets import SecretBox

JOBS_CHANNEL = "tenantry_jobs"
OUTBOX_CHANNEL = "tenantry_outbox"
WEBHOOKS_CHANNEL = "tenantry_webhooks"
CONTROLS_CHANNEL = "tenantry_controls"
# After the grace, this long for the last hand-backs before the pools are cut.
_STOP_MARGIN = 3.0
# Past this, a stop that is still not done ends the process regardless (a handler that
# ignores cancellation, a connection the operating system keeps open).
_FORCED_EXIT_AFTER = 10.0


@dataclass
class Service:
    settings: Settings
    dsn: str
    pool: asyncpg.Pool  # tenant code's login
    worker_pool: asyncpg.Pool  # the worker's login: the cross-tenant functions
    claim_pool: asyncpg.Pool  # the worker's login, for claims and heartbeats
    worker: Worker
    listener: Listener
    hub: Hub
    http: HttpServer
    maintenance: Maintenance
    health: Health
    fanout: FanOut
    deliverer: Deliverer
    metrics: Metrics
    gauges: DatabaseGauges
    # /metrics on a port of its own (TENANTRY_METRICS_PORT), or None.
    metrics_http: HttpServer | None = None
    # The analytics views' refresh (TENANTRY_ANALYTICS_REFRESH), or None.
    analytics_refresher: analytics.Refresher | None = None
    # What open dashboards wait on: closed at a stop, which ends their streams.
    feed: Feed | None = None
    # Set when a stop begins: /readyz answers 503 from then on.
    stopping: bool = field(default=False)

    def components(self) -> list[Any]:
        """In start order (the reverse is the stop order).  A process that claims no
        jobs neither fans out nor delivers webhooks: other processes do."""
        # The hub feeds the event streams of the public HTTP interface only.
        ordered: list[Any] = [self.listener]
        if self.settings.run_http:
            ordered.append(self.hub)
        ordered.append(self.worker)
        if self.settings.run_worker:
            ordered += [self.fanout, self.deliverer]
        ordered += [self.maintenance, self.gauges]
        if self.analytics_refresher is not None:
            ordered.append(self.analytics_refresher)
        if self.metrics_http is not None:
            ordered.append(self.metrics_http)
        return [*ordered, self.http]


async def check_schema(conn: db.Conn) -> None:
    st = await migrate.status(conn)
    if not st.current:
        raise SchemaMismatch(st.describe())


def build(
    settings: Settings,
    dsn: str,
    pool: asyncpg.Pool,
    *,
    worker_pool: asyncpg.Pool,
    claim_pool: asyncpg.Pool,
    registry: Registry,
    ops_pool: asyncpg.Pool | None = None,
    analytics_pool: asyncpg.Pool | None = None,
    refresh_pool: asyncpg.Pool | None = None,
) -> Service:
    logger = log.get("app")
    owner = f"{uuid.uuid4().hex[:12]}"
    data_dir = settings.data_dir.resolve()
    health = Health()
    mailer = mailer_for(settings.smtp_url, data_dir / "mail", settings.mail_from)
    provisioner = Provisioner(
        LocalStorage(data_dir / "tenants"), mailer, queue=settings.onboarding_queue
    )
    handlers = Registry()
    handlers.merge(registry)
    handlers.merge(provisioner.registry())
    metrics = Metrics(tenant_labels=settings.metrics_tenant_labels)
    worker = Worker(
        pool,
        handlers,
        WorkerConfig(
            queues=settings.queues if settings.run_worker else {},
            tenant_concurrency=settings.tenant_concurrency,
            prefetch=settings.prefetch,
            poll_interval=settings.poll_interval,
            lease_seconds=settings.lease_seconds,
            job_timeout=settings.job_timeout,
            unknown_kind_retry=settings.unknown_kind_retry,
        ),
        owner=owner,
        worker_pool=worker_pool,
        claim_pool=claim_pool,
        health=health,
        observer=metrics,
    )
    hub = Hub(
        worker_pool,
        aggregate_type=AGGREGATE,
        terminal_events=TERMINAL_EVENTS,
        queue_size=settings.sse_queue_size,
        keepalive=settings.sse_keepalive,
        tune_collector=settings.sse_gc_tuning,
    )
    box, guard = webhook_security(settings, data_dir)
    deliverer = Deliverer(
        worker_pool,
        box,
        guard,
        DeliveryConfig(
            concurrency=settings.webhook_concurrency,
            max_in_flight=settings.webhook_endpoint_concurrency,
            tenant_in_flight=settings.webhook_tenant_concurrency,
            timeout=settings.webhook_timeout,
            schedule=settings.webhook_retry_schedule,
            body_cap=settings.webhook_log_body_bytes,
            poll_interval=settings.poll_interval,
            # An attempt ends within its timeout; a lease that outlives it by the jobs'
            # lease means its process died mid-attempt.
            lease_margin=math.ceil(settings.lease_seconds),
            breaker=Breaker(
                failures=settings.webhook_breaker_failures,
                ratio=settings.webhook_breaker_ratio,
                volume=settings.webhook_breaker_volume,
                window_seconds=settings.webhook_breaker_window,
                cooldown_seconds=settings.webhook_breaker_cooldown,
                disable_after_seconds=settings.webhook_disable_after,
            ),
        ),
        owner=owner,
        health=health,
        on_attempt=metrics.webhook_attempt,
    )
    fanout = FanOut(worker_pool, deliverer.notify, poll_interval=settings.poll_interval)
    # Open dashboards hear of every wake-up, at no cost while none is open.
    feed = Feed()

    def outbox_committed(payload: str) -> None:
        hub.notify(payload)
        fanout.notify(payload)
        feed.poke()

    def jobs_committed(queue: str) -> None:
        worker.notify(queue)
        feed.poke()

    def controls_changed(queue: str) -> None:
        worker.controls_changed(queue)
        feed.poke()

    # LISTEN is session state: behind a transaction-mode pooler it would silently stop
    # hearing anything, hence a URL of its own (a direct or session-mode connection).
    listener = Listener(
        settings.listen_url or dsn,
        {
            JOBS_CHANNEL: jobs_committed,
            OUTBOX_CHANNEL: outbox_committed,
            WEBHOOKS_CHANNEL: deliverer.notify,
            CONTROLS_CHANNEL: controls_changed,
        },
        on_connect=[worker.resync, hub.resync, fanout.resync, deliverer.resync],
    )
    periodic = registry.periodic()
    for reg in periodic:
        assert reg.periodic is not None
        if reg.periodic.queue not in settings.queues:
            logger.warning(
                "periodic_queue_not_worked",
                kind=reg.kind,
                queue=reg.periodic.queue,
                detail="this process enqueues the periodic job into a queue it does not work:"
                " another process must work that queue, or the jobs wait forever",
            )
    maintenance = Maintenance(
        [
            LeaseRescuer(worker_pool, worker.notify),
            CounterPruner(worker_pool, settings.counter_retention_days),
            Pruner("prune_outbox", worker_pool, outbox.prune, settings.outbox_retention_days),
            Pruner(
                "prune_idempotency_keys",
                worker_pool,
                machine.prune_keys,
                settings.idempotency_retention_hours,
            ),
            webhook_upkeep.Rescuer(
                worker_pool, len(settings.webhook_retry_schedule), deliverer.notify
            ),
            Pruner(
                "prune_webhooks",
                worker_pool,
                webhook_upkeep.prune,
                settings.webhook_retention_days,
            ),
        ],
        settings.maintenance_interval,
        PeriodicEnqueuer(pool, periodic) if periodic else None,
    )

    svc: Service

    async def readiness() -> dict[str, bool]:
        checks = {
            "running": not svc.stopping,
            "database": False,
            "listener": listener.connected,
            "migrations": False,
        }
        try:
            with anyio.fail_after(2):
                async with pool.acquire() as conn:
                    # Behind (this code's migrations not all applied) is not ready; ahead
                    # (newer code has migrated, in a rolling deploy) still is: this
                    # process was serving a moment ago, and a start refuses it anyway.
                    checks["migrations"] = not (await migrate.status(conn)).behind
                    checks["database"] = True
        except Exception:  # whatever the database or the connection raised: not ready
            pass
        return checks

    if settings.token_secret is None:
        logger.warning(
            "token_secret_generated",
            detail="TENANTRY_TOKEN_SECRET is unset: status tokens are signed with a key kept"
            " in the data folder; processes that do not share it reject each other's tokens",
        )
    onboarding = OnboardingApi(
        pool,
        hub,
        Signer(load_secret(settings.token_secret, data_dir), settings.token_ttl),
        RateLimiter(settings.signup_rate, settings.signup_burst),
        queue=settings.onboarding_queue,
        trusted_proxies=parse_networks(settings.trusted_proxies),
        ipv6_prefix=settings.signup_ipv6_prefix,
    )
    gauges = DatabaseGauges(
        worker_pool,
        sorted({*settings.queues, settings.onboarding_queue}),
        interval=settings.metrics_interval,
        on_reading=feed.poke,
    )
    dashboard = Dashboard(
        ops_pool or worker_pool,
        pool,
        feed,
        periodic=periodic,
        gauges=gauges,
        settings_queues=sorted({*settings.queues, settings.onboarding_queue}),
        analytics=(
            analytics.Reader(analytics_pool, settings.analytics_allow_primary)
            if analytics_pool is not None
            else None
        ),
    )
    http = HttpServer(
        build_app(
            Readiness(readiness, lambda: health.problems, lambda: svc.stopping),
            pool,
            onboarding,
            cors_origins=settings.cors_origins,
            metrics=metrics,
            dashboard=dashboard,
            serve_metrics=settings.metrics_port is None,
            public=settings.run_http,
            webhooks=WebhooksApi(
                pool,
                Endpoints(
                    pool,
                    box,
                    guard,
                    EndpointRules(
                        allow_http=bool(settings.webhook_allow_http),
                        max_per_tenant=settings.webhook_max_endpoints,
                        rotation_grace_seconds=settings.webhook_rotation_grace,
                    ),
                ),
            ),
        ),
        settings.host,
        settings.port,
    )
    logger.info("mail", transport=mailer.describe())
    svc = Service(
        settings,
        dsn,
        pool,
        worker_pool,
        claim_pool,
        worker,
        listener,
        hub,
        http,
        maintenance,
        health,
        fanout,
        deliverer,
        metrics,
        gauges,
        metrics_http=(
            HttpServer(build_metrics_app(metrics), settings.host, settings.metrics_port)
            if settings.metrics_port is not None
            else None
        ),
        analytics_refresher=(
            analytics.Refresher(refresh_pool or worker_pool, settings.analytics_refresh)
            if settings.analytics_refresh > 0
            else None
        ),
        feed=feed,
    )
    metrics.watch(lambda: _component_metrics(svc))
    metrics.watch(svc.gauges.collect)
    return svc


def _component_metrics(svc: Service) -> Iterator[Metric]:
    """What the components hold, read at each scrape."""
    yield gauge("tenantry_sse_streams", "Open event streams", svc.hub.clients)
    yield counter(
        "tenantry_sse_events_delivered", "Events handed to open streams", svc.hub.events_pushed
    )
    yield counter(
        "tenantry_sse_slow_clients_cut",
        "Streams closed because their client did not read",
        svc.hub.slow_cut,
    )
    yield gauge(
        "tenantry_listener_connected",
        "1 while the LISTEN connection is up",
        1.0 if svc.listener.connected else 0.0,
    )
    yield counter(
        "tenantry_listener_reconnects",
        "Connections of the listener after its first",
        max(svc.listener.connections - 1, 0),
    )
    yield gauge("tenantry_jobs_running", "Jobs running in this process", svc.worker.running_count)
    paused = GaugeMetricFamily(
        "tenantry_queue_paused",
        "1 while an operator has the queue paused, as this process last read it",
        labels=["queue"],
    )
    concurrency = GaugeMetricFamily(
        "tenantry_queue_concurrency",
        "Jobs of the queue this process runs at once (an operator's setting or its own)",
        labels=["queue"],
    )
    for name, loop in svc.worker.loops.items():
        paused.add_metric([name], 1.0 if loop.paused else 0.0)
        concurrency.add_metric([name], loop.concurrency)
    yield paused
    yield concurrency
    yield gauge(
        "tenantry_webhook_attempts_in_flight",
        "Webhook attempts in flight in this process",
        svc.deliverer.in_flight,
    )
    pools = GaugeMetricFamily(
        "tenantry_pool_connections",
        "Database connections by pool (service, worker, claims) and state (in_use, idle),"
        " and acquires waiting for one (waiting)",
        labels=["pool", "state"],
    )
    for name, pool in (
        ("service", svc.pool),
        ("worker", svc.worker_pool),
        ("claims", svc.claim_pool),
    ):
        idle = pool.get_idle_size()
        pools.add_metric([name, "in_use"], pool.get_size() - idle)
        pools.add_metric([name, "idle"], idle)
        pools.add_metric([name, "waiting"], pool_waiters(pool))
    yield pools


def pool_waiters(pool: asyncpg.Pool) -> int:
    """Acquires waiting for a connection of `pool`.  asyncpg has no public count: its
    pool hands connections out through an asyncio queue, whose waiting getters are
    these (0 where a version keeps them elsewhere: the gauge then reads 0, never wrong
    by more than that)."""
    getters = getattr(getattr(pool, "_queue", None), "_getters", None)
    return sum(1 for g in getters if not g.done()) if getters is not None else 0


def webhook_security(
    settings: Settings, data_dir: Path, *, warn: bool = True
) -> tuple[SecretBox, Guard]:
    """The box that keeps the signing secrets encrypted, and the address guard."""
    logger = log.get("app")
    if settings.secret_key is None and warn:
        logger.warning(
            "secret_key_generated",
            detail="TENANTRY_SECRET_KEY is unset: webhook signing secrets are encrypted with"
            " a key kept in the data folder; processes that do not share it cannot sign"
            " each other's endpoints' deliveries",
        )
    box = SecretBox(load_or_create(settings.secret_key, data_dir / "secret.key"))
    guard = Guard(parse_cidrs(settings.webhook_allow_networks or ""))
    if guard.allow and warn:
        logger.warning(
            "webhook_networks_allowed",
            networks=[str(n) for n in guard.allow],
            http=bool(settings.webhook_allow_http),
            detail="webhooks may reach these non-public networks"
            " (TENANTRY_WEBHOOK_ALLOW_NETWORKS; the embedded default allows loopback)",
        )
    return box, guard


async def serve(settings: Settings, dsn: str, worker_dsn: str, registry: Registry) -> int:
    """Run the service: `dsn` is the login of tenant code, `worker_dsn` the worker's
    (the cross-tenant functions); both are checked before anything starts."""
    logger = log.get("app")
    pools: list[asyncpg.Pool] = []
    stop = _Stop()
    async with anyio.create_task_group() as signals_tg:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            signals_tg.start_soon(stop.watch, signals)
            try:
                svc: Service | None = None
                with stop.cancellable():  # a signal while starting ends the start
                    svc = await _start(settings, dsn, worker_dsn, registry, pools)
                if svc is not None and not stop.requested:
                    await run_service(svc, stop)
            finally:
                with anyio.CancelScope(shield=True):
                    await _close(pools, graceful=not stop.hard)
                logger.info("stopped")
                signals_tg.cancel_scope.cancel()
    return 0


async def _start(
    settings: Settings, dsn: str, worker_dsn: str, registry: Registry, pools: list[asyncpg.Pool]
) -> Service:
    """The pools, the checks of both logins and of the schema, the components."""
    tenancy.use_tenant_context(settings.tenant_context)
    pooled = settings.db_pooler_transaction
    pool = await db.create_pool(dsn, min_size=1, max_size=settings.pool_size, pooled=pooled)
    pools.append(pool)
    async with pool.acquire() as conn:
        await roles.check_login(conn, "DATABASE_URL", roles.SERVICE_ROLES)
        await check_schema(conn)
    worker_pool = await db.create_pool(
        worker_dsn,
        min_size=1,
        max_size=3,
        name="tenantry-worker",
        settings=db.WORKER_TIMEOUTS,
        pooled=pooled,
    )
    pools.append(worker_pool)
    async with worker_pool.acquire() as conn:
        await roles.check_login(conn, "TENANTRY_WORKER_URL", roles.WORKER_ROLES)
    claim_pool = await db.create_claim_pool(worker_dsn, pooled=pooled)
    pools.append(claim_pool)
    ops_pool = await db.create_ops_pool(worker_dsn, pooled=pooled)
    pools.append(ops_pool)
    # Connects on a page's first read only: a replica that is away delays nothing.
    analytics_pool = (
        await analytics.create_pool(settings.analytics_url) if settings.analytics_url else None
    )
    if analytics_pool is not None:
        pools.append(analytics_pool)
    # A refresh may hold its connection for minutes: not one of the worker's few.
    refresh_pool = await analytics.create_refresh_pool(worker_dsn, pooled=pooled)
    pools.append(refresh_pool)
    svc = build(
        settings,
        dsn,
        pool,
        worker_pool=worker_pool,
        claim_pool=claim_pool,
        registry=registry,
        ops_pool=ops_pool,
        analytics_pool=analytics_pool,
        refresh_pool=refresh_pool,
    )
    return svc


async def _close(pools: list[asyncpg.Pool], *, graceful: bool) -> None:
    """Close the pools, gracefully for a moment if allowed, then by cutting their
    connections: a connection stuck in a query must not keep the process alive."""
    if graceful:
        with anyio.move_on_after(_STOP_MARGIN):
            for p in reversed(pools):
                await p.close()
    for p in pools:
        p.terminate()


class _Stop:
    """The signals: the first asks for a stop (and ends a start in progress), the
    second for a hard stop (and ends a soft one in progress).  A stop that overruns is
    ended by a timer thread that does not depend on the event loop."""

    def __init__(self) -> None:
        self.requested = False
        self.hard = False
        self.first = anyio.Event()
        self.grace = 0.0  # the shutdown grace, once the service knows it
        self._scope = anyio.CancelScope()
        self._log = log.get("app")

    def cancellable(self) -> anyio.CancelScope:
        """A scope that the next signal cancels: the start, then the soft stop."""
        self._scope = anyio.CancelScope()
        return self._scope

    async def watch(self, signals: AsyncIterator[signal.Signals]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self.requested:
                self.requested = True
                self._log.info("signal_received", signal=name)
                self.first.set()
                self._exit_after(self.grace + _STOP_MARGIN + _FORCED_EXIT_AFTER)
            else:
                self.hard = True
                self._log.warning("hard_stop", signal=name)
                self._exit_after(_FORCED_EXIT_AFTER)
            self._scope.cancel()

    def _exit_after(self, seconds: float) -> None:
        def force() -> None:
            self._log.error("forced_exit", after_s=seconds)
            os._exit(1)

        timer = threading.Timer(seconds, force)
        timer.daemon = True
        timer.start()


# The operator the embedded default signs in as.
EMBEDDED_OPERATOR = "admin"


async def _announce_dashboard(svc: Service) -> None:
    """The embedded default: an `admin` operator if there is none yet (its key is never
    shown: `tenantry operators rotate-key admin` makes one to show), and a one-time
    sign-in link on stderr, never in the logs (it is a credential for 15 minutes)."""
    try:
        async with svc.worker_pool.acquire() as conn:
            if not await operators.listing(conn):
                await operators.add(conn, EMBEDDED_OPERATOR, "admin")
            token = await operators.link(conn, EMBEDDED_OPERATOR)
    except (NotFound, Conflict) as exc:  # disabled or removed by hand, or a race
        log.get("app").info("ops_link_skipped", reason=str(exc))
        return
    base = local_base_url(svc.settings.host, svc.http.port or svc.settings.port)
    url = operators.sign_in_url(base, token)
    sys.stderr.write(
        f"\nOperations dashboard: {url}\n(a one-time link for operator"
        f" '{EMBEDDED_OPERATOR}', good for 15 minutes; `tenantry operators link"
        f" {EMBEDDED_OPERATOR}` makes another)\n\n"
    )
    sys.stderr.flush()


async def _finish_requests(svc: Service, grace: float) -> None:
    """The requests in flight at the stop are answered (within the grace) before the
    HTTP server closes its connections: it reads nothing more from then on, so a body
    still arriving would be lost and its request cut without an answer."""
    if svc.http.in_flight:
        log.get("http").info("http_draining", requests=svc.http.in_flight)
        with anyio.move_on_after(grace):
            await svc.http.wait_idle()


async def run_service(svc: Service, stop: _Stop | None = None) -> int:
    """Run the components until a stop is asked for, then stop them in order."""
    logger = log.get("app")
    stop = stop or _Stop()
    stop.grace = svc.settings.shutdown_grace
    async with anyio.create_task_group() as tg:
        started = False
        with stop.cancellable():  # a signal during the start ends it
            for component in svc.components():
                await tg.start(component.run)
            started = True
            logger.info(
                "started",
                queues=dict(svc.settings.queues),
                kinds=svc.worker.registry.kinds(),
                port=svc.http.port,
            )
            if svc.settings.ops_sign_in_link:
                await _announce_dashboard(svc)
        await stop.first.wait()
        svc.stopping = True
        logger.info("stopping", running=svc.worker.running_count, streams=svc.hub.clients)
        # Streams end first: a browser reconnects (to another process) and resumes from
        # its last event id, and the HTTP server need not wait for them.
        svc.hub.close_all()
        if svc.feed is not None:
            svc.feed.close()
        if started and not stop.hard:
            grace = svc.settings.shutdown_grace
            with stop.cancellable(), anyio.move_on_after(grace + _STOP_MARGIN):
                async with anyio.create_task_group() as stopping:
                    stopping.start_soon(svc.worker.shutdown, grace)
                    stopping.start_soon(svc.deliverer.shutdown, grace)
                    stopping.start_soon(_finish_requests, svc, grace)
        if started and not svc.worker.stopped:
            svc.worker.hard_stop()
            with anyio.move_on_after(_STOP_MARGIN):
                await svc.worker.wait_stopped()
        tg.cancel_scope.cancel()
    return 0
