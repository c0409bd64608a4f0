"""The composition root: the one module that knows every component.

Start order: listener, worker, maintenance, http.  Stop: SIGTERM/SIGINT -> not ready,
worker soft stop (no new claims), running jobs get the grace period, then the rest is
cancelled and handed back to the queue; a second signal cancels at once.
"""

from __future__ import annotations

import gc
import signal
import uuid
from dataclasses import dataclass

import anyio
import asyncpg

from . import db, migrate, roles
from . import logging as log
from .config import Settings
from .errors import SchemaMismatch
from .http.app import HttpServer, Readiness, build_app
from .http.onboarding_api import OnboardingApi
from .http.ratelimit import RateLimiter, parse_networks
from .hub import Hub
from .jobs.maintenance import CounterPruner, LeaseRescuer, Maintenance, PeriodicEnqueuer, Pruner
from .jobs.registry import Registry
from .jobs.worker import Worker, WorkerConfig
from .listener import Listener
from .onboarding import machine
from .onboarding.mail import mailer_for
from .onboarding.model import AGGREGATE, TERMINAL_EVENTS
from .onboarding.provision import Provisioner
from .onboarding.storage import LocalStorage
from .onboarding.tokens import Signer, load_secret
from .outbox import store as outbox

JOBS_CHANNEL = "tenantry_jobs"
OUTBOX_CHANNEL = "tenantry_outbox"


@dataclass
class Service:
    settings: Settings
    dsn: str
    pool: asyncpg.Pool  # tenant code
    system_pool: asyncpg.Pool  # the worker's cross-tenant functions
    claim_pool: asyncpg.Pool
    worker: Worker
    listener: Listener
    hub: Hub
    http: HttpServer
    maintenance: Maintenance


async def check_schema(conn: db.Conn) -> None:
    st = await migrate.status(conn)
    if not st.current:
        raise SchemaMismatch(st.describe())


def build(
    settings: Settings,
    dsn: str,
    pool: asyncpg.Pool,
    *,
    system_pool: asyncpg.Pool,
    claim_pool: asyncpg.Pool,
    registry: Registry,
) -> Service:
    owner = f"{uuid.uuid4().hex[:12]}"
    data_dir = settings.data_dir.resolve()
    mailer = mailer_for(settings.smtp_url, data_dir / "mail", settings.mail_from)
    provisioner = Provisioner(
        LocalStorage(data_dir / "tenants"), mailer, queue=settings.onboarding_queue
    )
    handlers = Registry()
    handlers.merge(registry)
    handlers.merge(provisioner.registry())
    worker = Worker(
        pool,
        handlers,
        WorkerConfig(
            queues=settings.queues,
            tenant_concurrency=settings.tenant_concurrency,
            prefetch=settings.prefetch,
            poll_interval=settings.poll_interval,
            lease_seconds=settings.lease_seconds,
            job_timeout=settings.job_timeout,
        ),
        owner=owner,
        system_pool=system_pool,
        claim_pool=claim_pool,
    )
    # LISTEN is session state: behind a transaction-mode pooler it would silently stop
    # hearing anything, hence a URL of its own (a direct or session-mode connection).
    hub = Hub(
        system_pool,
        aggregate_type=AGGREGATE,
        terminal_events=TERMINAL_EVENTS,
        queue_size=settings.sse_queue_size,
        keepalive=settings.sse_keepalive,
    )
    listener = Listener(
        settings.listen_url or dsn,
        {JOBS_CHANNEL: worker.notify, OUTBOX_CHANNEL: hub.notify},
        on_connect=[worker.resync, hub.resync],
    )
    periodic = registry.periodic()
    maintenance = Maintenance(
        [
            LeaseRescuer(system_pool, worker.notify),
            CounterPruner(system_pool, settings.counter_retention_days),
            Pruner("prune_outbox", system_pool, outbox.prune, settings.outbox_retention_days),
            Pruner(
                "prune_idempotency_keys",
                system_pool,
                machine.prune_keys,
                settings.idempotency_retention_hours,
            ),
        ],
        settings.maintenance_interval,
        PeriodicEnqueuer(pool, periodic) if periodic else None,
    )

    async def readiness() -> dict[str, bool]:
        checks = {"database": False, "listener": listener.connected, "migrations": False}
        try:
            with anyio.fail_after(2):
                async with pool.acquire() as conn:
                    checks["database"] = True
                    checks["migrations"] = (await migrate.status(conn)).current
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass
        return checks

    if settings.token_secret is None:
        log.get("app").warning(
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
    )
    http = HttpServer(
        build_app(Readiness(readiness), pool, onboarding), settings.host, settings.port
    )
    log.get("app").info("mail", transport=mailer.describe())
    return Service(
        settings, dsn, pool, system_pool, claim_pool, worker, listener, hub, http, maintenance
    )


async def serve(settings: Settings, dsn: str, worker_dsn: str, registry: Registry) -> int:
    """Run the service: `dsn` is the login of tenant code, `worker_dsn` the worker's
    (the cross-tenant functions); both are checked before anything starts."""
    logger = log.get("app")
    pool = await db.create_pool(dsn, min_size=1, max_size=settings.pool_size)
    system_pool: asyncpg.Pool | None = None
    claim_pool: asyncpg.Pool | None = None
    try:
        async with pool.acquire() as conn:
            await roles.check_login(conn, "DATABASE_URL", roles.SERVICE_ROLES)
            await check_schema(conn)
        system_pool = await db.create_pool(
            worker_dsn, min_size=1, max_size=3, name="tenantry-worker"
        )
        async with system_pool.acquire() as conn:
            await roles.check_login(conn, "TENANTRY_WORKER_URL", roles.WORKER_ROLES)
        claim_pool = await db.create_claim_pool(worker_dsn)
        svc = build(
            settings, dsn, pool, system_pool=system_pool, claim_pool=claim_pool, registry=registry
        )
        # Everything alive now (modules, the components) lives as long as the process:
        # out of the collector's sight, a full collection walks only what came after.
        # With 20,000 open streams a full collection took 2.3 s, and came every 20-30 s
        # under 1,000 events/s: objects in flight for a moment (queued frames, futures)
        # outlived the young collections that ran every 700 allocations, and piled up
        # in the old generation.  Young collections every 50,000 allocations give those
        # the time to die young, which should make full collections rare (bench.sse's
        # p99 went from 331 to 118 ms with this and the keepalive heap together; the
        # collector's share alone was not measured).
        gc.freeze()
        gc.set_threshold(50_000, 20, 10)
        return await run_service(svc)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            for p in (claim_pool, system_pool, pool):
                if p is not None:
                    await p.close()
        logger.info("stopped")


async def run_service(svc: Service) -> int:
    logger = log.get("app")
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await tg.start(svc.listener.run)
            await tg.start(svc.hub.run)
            await tg.start(svc.worker.run)
            await tg.start(svc.maintenance.run)
            await tg.start(svc.http.run)
            logger.info(
                "started",
                queues=dict(svc.settings.queues),
                kinds=svc.worker.registry.kinds(),
                port=svc.http.port,
            )
            async for signum in signals:
                logger.info(
                    "signal_received",
                    signal=signal.Signals(signum).name,
                    running=svc.worker.running_count,
                    streams=svc.hub.clients,
                )
                break
            # Streams end first: a browser reconnects (to another process) and resumes
            # from its last event id, and the HTTP server need not wait for them.
            svc.hub.close_all()

            async def second_signal() -> None:
                async for signum in signals:
                    logger.warning("hard_stop", signal=signal.Signals(signum).name)
                    svc.worker.cancel_running("hard_stop")
                    return

            async with anyio.create_task_group() as stopper:
                stopper.start_soon(second_signal)
                await svc.worker.shutdown(svc.settings.shutdown_grace)
                stopper.cancel_scope.cancel()
            tg.cancel_scope.cancel()
    return 0
