"""The outbox follower: every committed event becomes one delivery per enabled endpoint
of its tenant that subscribed to it, exactly once across processes (the work is in
tenantry.webhook_fan_out).  Wakes on the outbox's NOTIFY, polls as a fallback, and
reads once more after each wake-up (the notification is throttled)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import asyncpg
from anyio.abc import TaskStatus

from .. import logging as log
from ..clock import Random, system_random
from ..db import leaves_no_session_state
from ..safetext import safe_text
from ..sql import queries_for

Q = queries_for(__file__)


@dataclass(frozen=True)
class Lag:
    events: int  # committed events not fanned out yet (counted up to a cap)
    oldest_seconds: float | None  # the oldest one's age


async def lag(conn: asyncpg.Connection | asyncpg.Pool, cap: int = 100_000) -> Lag:
    row = await conn.fetchrow(Q["fanout_lag"], cap)
    assert row is not None
    oldest = row["oldest"]
    age = None if oldest is None else max((datetime.now(UTC) - oldest).total_seconds(), 0.0)
    return Lag(row["events"], age)


class FanOut:
    def __init__(
        self,
        pool: asyncpg.Pool,
        on_deliveries: Callable[[], None],
        *,
        poll_interval: float = 1.0,
        trail: float = 0.01,
        rnd: Random | None = None,
    ) -> None:
        self._pool = pool  # the worker's login: the fan-out is cross-tenant
        self._on_deliveries = on_deliveries
        self._poll = poll_interval
        self._trail = trail
        self._rnd = rnd or system_random()
        self._wake = anyio.Event()
        self._log = log.get("webhook_fanout")

    def notify(self, _payload: str) -> None:
        self._wake.set()

    def resync(self) -> None:
        self._wake.set()

    async def run_once(self) -> int:
        """One pass; the number of deliveries it made (-1: another process holds the
        position right now)."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(Q["fan_out"])
            # One statement in its own transaction, settings local to the function:
            # the release needs no reset (a round trip saved on every pass).
            leaves_no_session_state(conn)
        assert row is not None
        if row["events"] < 0:
            return -1
        if row["deliveries"]:
            self._on_deliveries()
            self._log.debug("fanned_out", events=row["events"], deliveries=row["deliveries"])
        return int(row["deliveries"])

    async def _pass_safely(self) -> int:
        try:
            return await self.run_once()
        except Exception as exc:
            # The database away or a connection broken: the position did not move, the
            # next pass starts from it.
            self._log.warning("fanout_failed", error=safe_text(str(exc)) or repr(exc))
            return 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """A pass at each wake-up (or poll), and after a notification one more pass
        `trail` later: a throttled notification covers the inserts that commit after it
        within its window, and another process's pass may have begun before the newest
        events committed.

        A notification that arrives while the loop waits for its trailing pass is
        covered by that pass (which starts after it) and gets its own trailing pass
        in turn; it needs no pass of its own in between.  Under a steady flow of
        events that is one pass per `trail`, not two (the second finding next to
        nothing)."""
        task_status.started()
        while True:
            with anyio.move_on_after(self._poll * (0.75 + 0.5 * self._rnd.random())):
                await self._wake.wait()
            notified = self._wake.is_set()
            self._wake = anyio.Event()
            busy = await self._pass_safely() < 0
            trailing = notified or busy
            while trailing:
                await anyio.sleep(self._trail if not busy else self._trail * 5)
                notified = self._wake.is_set()
                self._wake = anyio.Event()
                busy = await self._pass_safely() < 0
                # A trailing pass that finds the position busy leaves the next try to
                # the next wake-up or poll, as the first pass's does.
                trailing = notified
