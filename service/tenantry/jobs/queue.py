"""Enqueue from Python (on the caller's connection, so it joins the caller's
transaction), queue statistics, and the dead-letter operations."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from ..db import Executor
from ..errors import Conflict, Invalid, NotFound
from ..sql import queries_for
from ..tenancy import parse_tenant_id, tenant_scope

Q = queries_for(__file__)


PRIORITY_MIN, PRIORITY_MAX = -32768, 32767  # the column is a smallint


def job_kind(raw: str) -> str:
    if not raw:
        raise Invalid("kind", "must not be empty")
    return raw


def queue_name(raw: str) -> str:
    if not raw:
        raise Invalid("queue", "must not be empty")
    return raw


def job_priority(value: int) -> int:
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise Invalid("priority", f"must be {PRIORITY_MIN} to {PRIORITY_MAX}")
    return value


async def enqueue(
    conn: Executor,
    *,
    tenant_id: object,
    kind: str,
    payload: Any = None,
    queue: str = "default",
    run_at: datetime | None = None,
    priority: int = 0,
    dedup_key: str | None = None,
    max_attempts: int | None = None,
) -> int:
    """Enqueue a job; with `dedup_key`, a live job with that key is returned instead.

    On a connection inside a transaction, the job joins that transaction, which must
    be in the job's tenant context (`tenant_tx`): row-level security rejects it
    otherwise.  Given a pool, or a connection outside a transaction, enqueue opens a
    tenant transaction of its own."""
    tid = parse_tenant_id(tenant_id)
    job_kind(kind)
    queue_name(queue)
    if max_attempts is not None and max_attempts < 1:
        raise Invalid("max_attempts", "must be >= 1")
    job_priority(priority)
    if run_at is not None and run_at.tzinfo is None:
        raise Invalid("run_at", "must be timezone-aware")
    async with tenant_scope(conn, tid) as tx:
        job_id: int = await tx.fetchval(
            Q["enqueue"],
            tid,
            kind,
            {} if payload is None else payload,
            queue,
            run_at,
            priority,
            dedup_key,
            max_attempts,
        )
    return job_id


@dataclass(frozen=True)
class QueueStats:
    """A queue's state now, and what happened in it in the last hour."""

    queue: str
    available: int  # runnable now
    scheduled: int  # due later (delayed, or waiting out a retry's backoff)
    running: int
    retrying: int  # waiting to run again after a failed attempt
    oldest_age_s: float  # how long the oldest runnable job has waited
    succeeded_1h: int  # jobs completed
    attempts_failed_1h: int  # attempts that failed, whether retried or not
    died_1h: int  # jobs dead-lettered
    dead: int  # jobs in the dead-letter table now


async def stats(conn: Executor) -> list[QueueStats]:
    rows = await conn.fetch(Q["stats"])
    return [QueueStats(**dict(r)) for r in rows]


@dataclass(frozen=True)
class JobFilter:
    """Which live jobs: by queue, kind, tenant and state (None: any)."""

    queue: str | None = None
    kind: str | None = None
    tenant_id: uuid.UUID | None = None
    state: str | None = None  # queued, scheduled or running


async def jobs_list(
    conn: Executor, limit: int = 50, matching: JobFilter = JobFilter()
) -> list[dict[str, Any]]:
    """The live jobs `matching` selects, oldest due first (operators: across tenants)."""
    m = matching
    return [
        dict(r)
        for r in await conn.fetch(Q["jobs_list"], limit, m.queue, m.kind, m.tenant_id, m.state)
    ]


async def job_show(
    conn: Executor, job_id: int, tenant_id: uuid.UUID | None = None
) -> dict[str, Any]:
    """A live job in full; its tenant is needed only where two tenants hold the id."""
    rows = await conn.fetch(Q["job_show"], job_id, tenant_id)
    if not rows:
        raise NotFound(f"no job with id {job_id}")
    if len(rows) > 1:
        tenants = ", ".join(str(r["tenant_id"]) for r in rows)
        raise Conflict(
            f"job id {job_id} is held by tenants {tenants} (pass the tenant: --tenant UUID)"
        )
    return _with_payload_decoded(rows[0])


@dataclass(frozen=True)
class DeadFilter:
    """Which dead jobs: by kind, tenant and reason (None: any)."""

    kind: str | None = None
    tenant_id: uuid.UUID | None = None
    reason: str | None = None

    @property
    def empty(self) -> bool:
        return self.kind is None and self.tenant_id is None and self.reason is None

    def args(self) -> tuple[str | None, uuid.UUID | None, str | None]:
        return self.kind, self.tenant_id, self.reason


async def dead_list(
    conn: Executor, limit: int = 50, matching: DeadFilter = DeadFilter()
) -> list[dict[str, Any]]:
    """The dead jobs `matching` selects, newest first."""
    return [dict(r) for r in await conn.fetch(Q["dead_list"], limit, *matching.args())]


async def dead_count(conn: Executor, matching: DeadFilter) -> int:
    return int(await conn.fetchval(Q["dead_count"], *matching.args()))


async def dead_retry_matching(conn: Executor, matching: DeadFilter) -> int:
    """Every dead job `matching` selects back to its queue, at once; returns how many."""
    try:
        return int(await conn.fetchval(Q["dead_retry_matching"], *matching.args()))
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(
            "a live job already holds the id or dedup key of one of these dead jobs:"
            " nothing was retried; narrow the filter, or retry them one by one"
        ) from exc


async def dead_discard_matching(conn: Executor, matching: DeadFilter) -> int:
    """Every dead job `matching` selects, deleted for good; returns how many."""
    return int(await conn.fetchval(Q["dead_discard_matching"], *matching.args()))


def _ambiguous(exc: asyncpg.CardinalityViolationError) -> Conflict:
    return Conflict(f"{exc.args[0] if exc.args else exc} (pass the tenant: --tenant UUID)")


async def dead_show(
    conn: Executor, job_id: int, tenant_id: uuid.UUID | None = None
) -> dict[str, Any]:
    """A dead job by id (and tenant: needed only if two tenants hold the id, which a
    database from before job ids were reserved to the sequence may have)."""
    try:
        row = await conn.fetchrow(Q["dead_show"], job_id, tenant_id)
    except asyncpg.CardinalityViolationError as exc:
        raise _ambiguous(exc) from exc
    if row is None:
        raise NotFound(f"no dead job with id {job_id}")
    return _with_payload_decoded(row)


def _with_payload_decoded(row: asyncpg.Record) -> dict[str, Any]:
    """A job's row with its payload decoded, or left as the text it is when no decoder
    takes it (a number no double holds, say)."""
    shown = dict(row)
    with contextlib.suppress(orjson.JSONDecodeError):
        shown["payload"] = orjson.loads(shown["payload"])
    return shown


async def dead_retry(conn: Executor, job_id: int, tenant_id: uuid.UUID | None = None) -> int:
    try:
        new_id = await conn.fetchval(Q["dead_retry"], job_id, tenant_id)
    except asyncpg.CardinalityViolationError as exc:
        raise _ambiguous(exc) from exc
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"dead job {job_id}: a live job already holds its id or dedup key") from exc
    if new_id is None:
        raise NotFound(f"no dead job with id {job_id}")
    return int(new_id)


async def dead_discard(conn: Executor, job_id: int, tenant_id: uuid.UUID | None = None) -> None:
    try:
        gone = await conn.fetchval(Q["dead_discard"], job_id, tenant_id)
    except asyncpg.CardinalityViolationError as exc:
        raise _ambiguous(exc) from exc
    if gone is None:
        raise NotFound(f"no dead job with id {job_id}")
