"""Maintenance: small tasks on a timer, each with `run_once()` returning counts
(Oban's plugins, River's maintenance services)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Protocol

import anyio
import asyncpg
from anyio.abc import TaskStatus

from .. import logging as log
from ..clock import Clock, Random, SystemClock, system_random
from ..safetext import safe_text
from ..sql import queries_for
from ..tenancy import tenant_tx_on
from .queue import enqueue
from .registry import Registration

Q = queries_for(__file__)


class Task(Protocol):
    name: str

    async def run_once(self) -> int: ...


class LeaseRescuer:
    """Requeue running jobs whose worker stopped heartbeating (it crashed or hung)."""

    name = "lease_rescue"

    def __init__(
        self, pool: asyncpg.Pool, on_rescued: Callable[[str], None], batch: int = 1000
    ) -> None:
        self._pool = pool
        self._on_rescued = on_rescued
        self._batch = batch
        self._log = log.get("maintenance", task=self.name)

    async def run_once(self) -> int:
        total = 0
        while True:
            rows = await self._pool.fetch(Q["rescue_expired"], self._batch)
            for r in rows:
                self._log.warning(
                    "job_rescued",
                    job_id=r["id"],
                    tenant_id=str(r["tenant_id"]),
                    kind=r["kind"],
                    attempt=r["attempts"],
                )
            for queue in {r["queue"] for r in rows}:
                self._on_rescued(queue)
            total += len(rows)
            if len(rows) < self._batch:
                return total


class CounterPruner:
    name = "prune_counters"

    def __init__(self, pool: asyncpg.Pool, retention_days: int) -> None:
        self._pool = pool
        self._days = retention_days

    async def run_once(self) -> int:
        pruned: int = await self._pool.fetchval(Q["prune_counters"], self._days)
        return pruned


class Pruner:
    """Deletes rows past their retention, a bounded batch per statement, until a batch
    comes back short (short transactions: no long lock on a hot table)."""

    def __init__(
        self,
        name: str,
        pool: asyncpg.Pool,
        prune: Callable[[asyncpg.Pool, int, int], Awaitable[int]],
        retention: int,
        batch: int = 5000,
    ) -> None:
        self.name = name
        self._pool = pool
        self._prune = prune
        self._retention = retention
        self._batch = batch

    async def run_once(self) -> int:
        total = 0
        while True:
            n = await self._prune(self._pool, self._retention, self._batch)
            total += n
            if n < self._batch:
                return total


class PeriodicEnqueuer:
    """Enqueue each periodic handler once per period, however many processes run:
    advancing `periodic_runs.last_period` is a compare-and-set, and the job is enqueued
    in the same transaction with a per-period dedup key.

    A handler first seen records its current period without running: its first run is
    at the next period boundary after it was deployed (no surprise run at startup)."""

    name = "periodic"

    def __init__(
        self, pool: asyncpg.Pool, registrations: Sequence[Registration], clock: Clock | None = None
    ) -> None:
        self._pool = pool
        self._regs = list(registrations)
        self._clock = clock or SystemClock()
        self._log = log.get("maintenance", task=self.name)

    async def run_once(self) -> int:
        now = self._clock.now()
        enqueued = 0
        for reg in self._regs:
            assert reg.periodic is not None
            period = reg.periodic.period_start(now)
            if await self.enqueue_period(reg, period):
                enqueued += 1
        return enqueued

    async def enqueue_period(self, reg: Registration, period: datetime) -> bool:
        assert reg.periodic is not None
        # The job belongs to the handler's tenant (the system tenant by default):
        # enqueuing it needs that tenant's context.
        async with (
            self._pool.acquire() as conn,
            tenant_tx_on(conn, reg.periodic.tenant_id, index_plans=True),
        ):
            first = not await conn.fetchval(Q["periodic_known"], reg.kind)
            won = await conn.fetchval(Q["advance_periodic"], reg.kind, period)
            if won is None or first:
                return False
            job_id = await enqueue(
                conn,
                tenant_id=reg.periodic.tenant_id,
                kind=reg.kind,
                queue=reg.periodic.queue,
                payload={**reg.periodic.payload, "period": period.isoformat()},
                dedup_key=f"periodic:{reg.kind}:{period.isoformat()}",
            )
        self._log.info("periodic_enqueued", kind=reg.kind, period=period.isoformat(), job_id=job_id)
        return True

    def next_wake(self) -> float:
        """Seconds until the earliest next period boundary."""
        now = self._clock.now()
        waits = []
        for reg in self._regs:
            assert reg.periodic is not None
            nxt = reg.periodic.next_after(reg.periodic.period_start(now))
            waits.append((nxt - now).total_seconds())
        return max(min(waits, default=60.0), 0.0)


class Maintenance:
    """Runs the tasks on a jittered timer; the periodic enqueuer on its own boundaries."""

    def __init__(
        self,
        tasks: Sequence[Task],
        interval: float,
        periodic: PeriodicEnqueuer | None = None,
        rnd: Random | None = None,
    ) -> None:
        self._tasks = list(tasks)
        self._interval = interval
        self._periodic = periodic
        self._rnd = rnd or system_random()
        self._log = log.get("maintenance")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._loop)
            if self._periodic is not None:
                tg.start_soon(self._periodic_loop, self._periodic)
            task_status.started()

    async def _loop(self) -> None:
        while True:
            for task in self._tasks:
                await self._run_task(task)
            await anyio.sleep(self._interval * (0.75 + 0.5 * self._rnd.random()))

    async def _periodic_loop(self, periodic: PeriodicEnqueuer) -> None:
        while True:
            await self._run_task(periodic)
            # Wake just after the boundary so period_start() lands in the new period.
            await anyio.sleep(periodic.next_wake() + 0.005)

    async def _run_task(self, task: Task) -> None:
        try:
            count = await task.run_once()
        except Exception as exc:
            # The database away, a connection broken (whatever asyncpg raises for it):
            # the next round tries again.
            self._log.warning("maintenance_failed", task=task.name, error=safe_text(str(exc)))
            return
        if count:
            self._log.debug("maintenance_ran", task=task.name, count=count)
