"""The webhooks' maintenance tasks (run by tenantry.jobs.maintenance on its timer)."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from ..sql import queries_for

Q = queries_for(__file__)


class Rescuer:
    """Deliveries whose sending process stopped mid-attempt go back to pending (or to
    the dead letters when their schedule is used up), with the attempt on record; and
    waiting deliveries of deleted endpoints are cancelled."""

    name = "webhook_rescue"

    def __init__(
        self,
        pool: asyncpg.Pool,
        default_attempts: int,
        on_rescued: Callable[[], None],
        batch: int = 1000,
    ) -> None:
        self._pool = pool
        self._default_attempts = default_attempts
        self._on_rescued = on_rescued
        self._batch = batch

    async def run_once(self) -> int:
        n: int = await self._pool.fetchval(Q["rescue"], self._default_attempts, self._batch)
        if n:
            self._on_rescued()
        return n


async def prune(pool: asyncpg.Pool, retention_days: int, batch: int) -> int:
    pruned: int = await pool.fetchval(Q["prune"], retention_days, batch)
    return pruned
