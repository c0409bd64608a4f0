"""Test harness: run a real Worker against a real database and wait on its hooks."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg
import orjson

from tenantry import db, migrate, roles
from tenantry.app import Service, build
from tenantry.clock import Clock, Random
from tenantry.config import Settings
from tenantry.jobs.registry import Registry
from tenantry.jobs.worker import Worker, WorkerConfig


class Recorder:
    """Collects worker hook events; tests await conditions on them, never sleep."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._changed = anyio.Event()

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        self.events.append((name, data))
        # Wake every waiter (each waits on the event current when it last looked).
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in self.events if n == name]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while True:
                changed = self._changed
                if predicate():
                    return
                await changed.wait()

    async def wait_flushed(self, n: int, timeout: float = 10.0) -> None:
        """Wait until `n` outcomes in all have been written to the database."""
        await self.wait_for(
            lambda: sum(len(d["outcomes"]) for d in self.named("flushed")) >= n, timeout
        )


@dataclass
class FakeClock:
    """Wall time that tests control; monotonic time stays real so timers still fire."""

    at: datetime = field(default_factory=lambda: datetime(2030, 1, 1, tzinfo=UTC))

    def now(self) -> datetime:
        return self.at

    def monotonic(self) -> float:
        return time.monotonic()

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


class FixedRandom:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@asynccontextmanager
async def running_worker(
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    registry: Registry,
    *,
    queues: dict[str, int] | None = None,
    recorder: Recorder | None = None,
    clock: Clock | None = None,
    rnd: Random | None = None,
    owner: str | None = None,
    **config: Any,
) -> AsyncIterator[tuple[Worker, Recorder]]:
    rec = recorder or Recorder()
    cfg = WorkerConfig(queues=queues or {"default": 10}, **{"poll_interval": 0.2, **config})
    worker = Worker(
        pool,
        registry,
        cfg,
        owner=owner or f"test-{uuid.uuid4().hex[:8]}",
        hook=rec,
        worker_pool=worker_pool,
        clock=clock,
        rnd=rnd,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        try:
            yield worker, rec
        finally:
            with anyio.CancelScope(shield=True):
                await worker.shutdown(grace=5)
            tg.cancel_scope.cancel()


TENANT_A = uuid.UUID("aaaaaaaa-0000-0000-0000-000000000001")
TENANT_B = uuid.UUID("bbbbbbbb-0000-0000-0000-000000000002")


async def one(pool: asyncpg.Pool, sql: str, *args: object) -> asyncpg.Record:
    """fetchrow that insists on a row."""
    row = await pool.fetchrow(sql, *args)
    assert row is not None, sql
    return row


def function_statement(function: str) -> str:
    """The statement that function `tenantry.<function>` runs, read from the functions
    file that defines it (service/tenantry/*/functions.sql), with its $n parameters, so that a
    test can EXPLAIN it: the first statement of its body (after BEGIN, and RETURN
    QUERY), up to the semicolon that ends it."""
    pattern = re.compile(rf"FUNCTION tenantry\.{re.escape(function)}\(.*?\bAS \$\$(.*?)\$\$;", re.S)
    for path in migrate.REPEATABLE_FILES:
        found = pattern.search(path.read_text(encoding="utf-8"))
        if found is None:
            continue
        statement = re.search(r"\bBEGIN\s+(?:RETURN QUERY\s+)?(.*?);\s*\n", found[1], re.S)
        assert statement is not None, f"{function}: no statement after BEGIN"
        return statement[1]
    raise AssertionError(f"no function tenantry.{function} in {migrate.REPEATABLE_FILES}")


def memory_backed_dir() -> str | None:
    """A folder in memory (Linux's /dev/shm) for throwaway test clusters, or None for the
    default temporary folder.  Every test clones a database: ~460 files created and
    removed each time, which on a disk file system cost ~0.4 s per test (measured on
    ext4: openat with O_CREAT at ~0.4 ms a call) against ~0.02 s in memory.  The server
    is the same PostgreSQL either way; only where its files live changes."""
    shm = Path("/dev/shm")
    # A container's /dev/shm is often 64 MiB: too small for a cluster and its clones.
    if (
        shm.is_dir()
        and os.access(shm, os.W_OK | os.X_OK)
        and shutil.disk_usage(shm).free >= 2 * 1024**3
    ):
        return str(shm)
    return None


TEST_TOKEN_SECRET = "test-secret-" + "x" * 40
# The suite runs in the tenant-context mode the environment names (CI runs the
# PostgreSQL 15 leg with TENANTRY_TENANT_CONTEXT=set_local).
TEST_TENANT_CONTEXT = os.environ.get("TENANTRY_TENANT_CONTEXT") or "set_config"
TEST_SECRET_KEY = "test-key-" + "k" * 40


def service_settings(data_dir: Any, **overrides: Any) -> Settings:
    """Settings for an in-process service: an ephemeral port, fast timers, a fixed
    token secret, generous rate limits unless a test wants them tight."""
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "port": 0,
        "poll_interval": 0.2,
        "maintenance_interval": 0.2,
        "token_secret": TEST_TOKEN_SECRET,
        "signup_rate": 10_000.0,
        "signup_burst": 10_000,
        "secret_key": TEST_SECRET_KEY,
        # Webhooks reach receivers on loopback, over plain http.
        "webhook_allow_networks": "127.0.0.0/8,::1/128",
        "webhook_allow_http": True,
        "tenant_context": TEST_TENANT_CONTEXT,
    }
    base.update(overrides)
    return Settings(**base)


@asynccontextmanager
async def running_service(
    settings: Settings, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[Service]:
    """The whole service in this process (listener, hub, worker, maintenance, HTTP),
    built by the composition root as `tenantry run` builds it, minus the signals."""
    claim_pool = await db.create_claim_pool(roles.worker_url_for(app_url))
    ops_pool = await db.create_ops_pool(roles.worker_url_for(app_url))
    try:
        svc = build(
            settings,
            app_url,
            pool,
            worker_pool=worker_pool,
            claim_pool=claim_pool,
            registry=Registry(),
            ops_pool=ops_pool,
        )
        async with anyio.create_task_group() as tg:
            for component in svc.components():
                await tg.start(component.run)
            try:
                yield svc
            finally:
                svc.hub.close_all()
                with anyio.CancelScope(shield=True):
                    await svc.worker.shutdown(grace=5)
                    await svc.deliverer.shutdown(grace=5)
                tg.cancel_scope.cancel()
    finally:
        await claim_pool.close()
        await ops_pool.close()


@dataclass
class Frame:
    """One server-sent event as a client parses it (comments and retry included)."""

    id: str | None = None
    event: str | None = None
    data: Any = None
    retry: int | None = None
    comment: str | None = None


async def sse_frames(resp: aiohttp.ClientResponse) -> AsyncIterator[Frame]:
    """Parse a text/event-stream response frame by frame, as EventSource does."""
    frame = Frame()
    lines: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line == "":
            if lines or frame.retry is not None or frame.comment is not None:
                if lines:
                    frame.data = orjson.loads("\n".join(lines))
                yield frame
            frame, lines = Frame(), []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            frame.comment = value
        elif name == "id":
            frame.id = value
        elif name == "event":
            frame.event = value
        elif name == "data":
            lines.append(value)
        elif name == "retry":
            frame.retry = int(value)


@asynccontextmanager
async def background_service(
    settings: Settings, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[Service]:
    """`running_service` in a task of its own: usable from a fixture, whose set-up and
    tear-down pytest-asyncio runs in different tasks (a task group cannot span them)."""
    started: asyncio.Future[Service] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def run() -> None:
        async with running_service(settings, app_url, pool, worker_pool) as svc:
            started.set_result(svc)
            await stop.wait()

    task = asyncio.create_task(run())
    waiter: asyncio.Future[Any] = started  # wait() wants one future type
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # it failed to start: raise why
    try:
        yield started.result()
    finally:
        stop.set()
        await task


async def wait_lock_waiter(
    admin: asyncpg.Pool | asyncpg.Connection, user: str | None = None, timeout: float = 30
) -> None:
    """Until a backend of this database (of login `user`, if given) waits on a lock: it
    is blocked on a row the test holds.  The server sends no event for that, so this
    polls its own view (pg_stat_activity) every 20 ms."""
    with anyio.fail_after(timeout):
        while True:
            if await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND ($1::text IS NULL OR usename = $1)",
                user,
            ):
                return
            await anyio.sleep(0.02)


async def wait_no_lock_waiter(
    admin: asyncpg.Pool | asyncpg.Connection, user: str | None = None, timeout: float = 30
) -> None:
    """Until no backend of this database (of login `user`, if given) waits on a lock
    (polled, as wait_lock_waiter)."""
    with anyio.fail_after(timeout):
        while True:
            if not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND ($1::text IS NULL OR usename = $1)",
                user,
            ):
                return
            await anyio.sleep(0.02)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 20, every: float = 0.02
) -> None:
    """Until `check()` holds: for state that changes in another process or in the
    database, where no event reaches the test (a job finishing elsewhere)."""
    with anyio.fail_after(timeout):
        while True:
            if await check():
                return
            await anyio.sleep(every)
