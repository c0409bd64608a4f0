"""Job outcomes, buffered and written in batches: one statement per outcome type per
flush, however many jobs finished meanwhile."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import asyncpg

from .. import logging as log
from ..db import Conn
from ..sql import queries_for

Q = queries_for(__file__)

Key = tuple[uuid.UUID, int]


@dataclass(frozen=True)
class Complete:
    key: Key


@dataclass(frozen=True)
class Requeue:
    key: Key
    run_at: datetime
    error: str | None  # None: a snooze, the attempt is refunded
    error_obj: dict[str, Any] | None


@dataclass(frozen=True)
class Bury:
    key: Key
    error: str
    error_obj: dict[str, Any]
    reason: str


@dataclass(frozen=True)
class Release:
    key: Key


Outcome = Complete | Requeue | Bury | Release


@dataclass
class _Batch:
    complete: list[Complete] = field(default_factory=list)
    requeue: list[Requeue] = field(default_factory=list)
    bury: list[Bury] = field(default_factory=list)
    release: list[Release] = field(default_factory=list)

    def add(self, o: Outcome) -> None:
        match o:
            case Complete():
                self.complete.append(o)
            case Requeue():
                self.requeue.append(o)
            case Bury():
                self.bury.append(o)
            case Release():
                self.release.append(o)

    def groups(self) -> int:
        return sum(1 for g in (self.complete, self.requeue, self.bury, self.release) if g)


class OutcomeWriter:
    """Collects outcomes and writes them in batches.  While one batch is being written
    the next accumulates, so the batch size follows the load by itself."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        owner: str,
        on_flushed: Callable[[list[Outcome]], None] | None = None,
    ) -> None:
        self._pool = pool
        self._owner = owner
        self._pending: list[Outcome] = []
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._on_flushed = on_flushed
        self._log = log.get("outcomes", worker=owner)

    def put(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Flush forever; cancel it only after `drain()`."""
        delay = 0.05
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._pending:
                taken, self._pending = self._pending, []
                try:
                    await self._write(taken)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    # Keep them: a lost write would leave jobs running until their
                    # leases expire.  Retry after a pause.
                    self._pending = taken + self._pending
                    self._log.warning("outcome_write_failed", error=str(exc), jobs=len(taken))
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                delay = 0.05
                if self._on_flushed is not None:
                    self._on_flushed(taken)
            self._idle.set()

    async def drain(self) -> None:
        """Wait until everything put so far is written."""
        while self._pending or not self._idle.is_set():
            await self._idle.wait()

    async def _write(self, outcomes: list[Outcome]) -> None:
        batch = _Batch()
        for o in outcomes:
            batch.add(o)
        async with self._pool.acquire() as conn:
            if batch.groups() > 1:
                async with conn.transaction():
                    await self._write_batch(conn, batch)
            else:
                await self._write_batch(conn, batch)

    async def _write_batch(self, conn: Conn, b: _Batch) -> None:
        owner = self._owner
        if b.complete:
            await conn.execute(
                Q["complete_many"],
                [o.key[0] for o in b.complete],
                [o.key[1] for o in b.complete],
                owner,
            )
        if b.requeue:
            r = b.requeue
            await conn.execute(
                Q["requeue_many"],
                [o.key[0] for o in r],
                [o.key[1] for o in r],
                [o.run_at for o in r],
                [o.error for o in r],
                [o.error_obj for o in r],
                [o.error is None for o in r],
                owner,
            )
        if b.bury:
            d = b.bury
            await conn.execute(
                Q["bury_many"],
                [o.key[0] for o in d],
                [o.key[1] for o in d],
                [o.error for o in d],
                [o.error_obj for o in d],
                [o.reason for o in d],
                owner,
            )
        if b.release:
            await conn.execute(
                Q["release_many"],
                [o.key[0] for o in b.release],
                [o.key[1] for o in b.release],
                owner,
            )
