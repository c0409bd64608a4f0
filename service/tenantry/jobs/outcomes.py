"""Job outcomes, buffered and written in batches: one statement per flush, however many
jobs finished meanwhile and of whatever kind (`tenantry.record_job_outcomes`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import asyncpg

from .. import logging as log
from ..safetext import safe_text
from ..sql import queries_for

Q = queries_for(__file__)

# A job's primary key: (tenant id, job id).
JobKey = tuple[uuid.UUID, int]


@dataclass(frozen=True)
class Complete:
    key: JobKey


@dataclass(frozen=True)
class Retry:
    """Back to the queue at `run_at`: a failed attempt (error recorded, attempt used), a
    snooze (no error, attempt refunded), or a kind this process has no handler for
    (error recorded, attempt refunded: the handler gets all of its attempts)."""

    key: JobKey
    run_at: datetime
    error: str | None
    error_obj: dict[str, Any] | None
    refund: bool = False
    unknown_kind: bool = False


@dataclass(frozen=True)
class Bury:
    key: JobKey
    error: str
    error_obj: dict[str, Any]
    reason: str
    # The kind of the dead-letter hook job to enqueue with the death, if the job's kind
    # has a hook.
    hook: str | None = None
    # Buried without running (found past its last attempt): the claim that found it
    # is not counted as an attempt.
    unrun: bool = False


@dataclass(frozen=True)
class Release:
    key: JobKey


Outcome = Complete | Retry | Bury | Release

# The database refused a value of the batch (a character it does not take, a value too
# large for an index, a constraint): retrying the batch whole would fail forever.
_REFUSED = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)
_REASON_MAX = 2000


def _arguments(owner: str, outcomes: Sequence[Outcome]) -> tuple[Any, ...]:
    done = [o for o in outcomes if isinstance(o, Complete)]
    retry = [o for o in outcomes if isinstance(o, Retry)]
    dead = [o for o in outcomes if isinstance(o, Bury)]
    back = [o for o in outcomes if isinstance(o, Release)]
    return (
        owner,
        [o.key[0] for o in done],
        [o.key[1] for o in done],
        [o.key[0] for o in retry],
        [o.key[1] for o in retry],
        [o.run_at for o in retry],
        [o.error for o in retry],
        [o.error_obj for o in retry],
        [o.refund for o in retry],
        [o.unknown_kind for o in retry],
        [o.key[0] for o in dead],
        [o.key[1] for o in dead],
        [o.error for o in dead],
        [o.error_obj for o in dead],
        [o.reason for o in dead],
        [o.hook for o in dead],
        [o.unrun for o in dead],
        [o.key[0] for o in back],
        [o.key[1] for o in back],
    )


class OutcomeWriter:
    """Collects outcomes and writes them in batches.  While one batch is being written
    the next accumulates, so the batch size follows the load by itself.

    A batch that fails for want of the database is kept and written again (a lost
    write would leave jobs running until their leases expire).  A batch the database
    refuses is written one outcome at a time, and an outcome that is refused alone is
    replaced by the job's death with the database's reason: one poison value must not
    hold up every other job's outcome forever."""

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
                except _REFUSED as exc:
                    self._log.warning(
                        "outcome_batch_refused", error=safe_text(str(exc)), jobs=len(taken)
                    )
                    try:
                        await self._write_each(taken)
                    except Exception as each_exc:  # the database went away meanwhile
                        self._pending = taken + self._pending
                        await self._pause(each_exc, len(taken), delay)
                        delay = min(delay * 2, 2.0)
                        continue
                except Exception as exc:
                    # The database is unreachable or the connection broke (whatever
                    # asyncpg raises for it, InternalClientError included): keep them.
                    self._pending = taken + self._pending
                    await self._pause(exc, len(taken), delay)
                    delay = min(delay * 2, 2.0)
                    continue
                delay = 0.05
                if self._on_flushed is not None:
                    self._on_flushed(taken)
            self._idle.set()

    async def _pause(self, exc: BaseException, jobs: int, delay: float) -> None:
        self._log.warning(
            "outcome_write_failed",
            error=safe_text(str(exc)) or type(exc).__name__,
            jobs=jobs,
            retry_in_s=delay,
        )
        await anyio.sleep(delay)

    async def drain(self) -> None:
        """Wait until everything put so far is written."""
        while self._pending or not self._idle.is_set():
            await self._idle.wait()

    async def _write(self, outcomes: Sequence[Outcome]) -> None:
        await self._pool.execute(Q["record_outcomes"], *_arguments(self._owner, outcomes))

    async def _write_each(self, outcomes: list[Outcome]) -> None:
        """One outcome per statement; one the database refuses becomes the job's death,
        with the database's reason."""
        for i, o in enumerate(outcomes):
            try:
                await self._write([o])
            except _REFUSED as exc:
                reason = safe_text(f"outcome refused by the database: {exc}")[:_REASON_MAX]
                self._log.error("outcome_refused", job_id=o.key[1], error=reason)
                outcomes[i] = Bury(o.key, reason, {"error": reason}, "permanent")
                try:
                    await self._write([outcomes[i]])
                except _REFUSED as again:
                    # Not even its death can be written: leave the row to its lease's
                    # expiry and rescue rather than hold up everyone else.
                    self._log.error("outcome_dropped", job_id=o.key[1], error=safe_text(str(again)))
