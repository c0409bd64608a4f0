"""The composition root: the one module that knows every component.

Start order: listener, worker, maintenance, http.  Stop: SIGTERM/SIGINT -> not ready,
worker soft stop (no new claims), running jobs get the grace period, then the rest is
cancelled and handed back to the queue; a second signal cancels at once.
"""

from __future__ import annotations

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
from .jobs.maintenance import CounterPruner, LeaseRescuer, Maintenance, PeriodicEnqueuer
from .jobs.registry import Registry
from .jobs.worker import Worker, WorkerConfig
from .listener import Listener

JOBS_CHANNEL = "tenantry_jobs"


@dataclass
class Service:
    settings: Settings
    dsn: str
    pool: asyncpg.Pool
    claim_pool: asyncpg.Pool
    worker: Worker
    listener: Listener
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
    claim_pool: asyncpg.Pool,
    registry: Registry,
) -> Service:
    owner = f"{uuid.uuid4().hex[:12]}"
    worker = Worker(
        pool,
        registry,
        WorkerConfig(
            queues=settings.queues,
            tenant_concurrency=settings.tenant_concurrency,
            prefetch=settings.prefetch,
            poll_interval=settings.poll_interval,
            lease_seconds=settings.lease_seconds,
            job_timeout=settings.job_timeout,
        ),
        owner=owner,
        claim_pool=claim_pool,
    )
    # LISTEN is session state: behind a transaction-mode pooler it would silently stop
    # hearing anything, hence a URL of its own (a direct or session-mode connection).
    listener = Listener(
        settings.listen_url or dsn, {JOBS_CHANNEL: worker.notify}, on_connect=[worker.resync]
    )
    periodic = registry.periodic()
    maintenance = Maintenance(
        [LeaseRescuer(pool, worker.notify), CounterPruner(pool, settings.counter_retention_days)],
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

    http = HttpServer(build_app(Readiness(readiness), pool), settings.host, settings.port)
    return Service(settings, dsn, pool, claim_pool, worker, listener, http, maintenance)


async def serve(settings: Settings, dsn: str, registry: Registry) -> int:
    logger = log.get("app")
    pool = await db.create_pool(dsn, min_size=1, max_size=settings.pool_size)
    claim_pool: asyncpg.Pool | None = None
    try:
        async with pool.acquire() as conn:
            await roles.check_login(conn)
            await check_schema(conn)
        claim_pool = await db.create_claim_pool(dsn)
        svc = build(settings, dsn, pool, claim_pool, registry)
        return await run_service(svc)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            if claim_pool is not None:
                await claim_pool.close()
            await pool.close()
        logger.info("stopped")


async def run_service(svc: Service) -> int:
    logger = log.get("app")
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await tg.start(svc.listener.run)
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
                )
                break

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
