"""Enqueue from Python (on the caller's connection, so it joins the caller's
transaction), queue statistics, and the dead-letter operations."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
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
    if len(raw) > 100:
        raise Invalid("queue", "must be at most 100 characters")
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


# Why a job died (tenantry.dead_jobs.reason).
DEAD_REASONS = ("exhausted", "permanent", "cancelled", "unknown_kind")
# A live job's states (tenantry.jobs.state).
JOB_STATES = ("queued", "scheduled", "running")


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
    return await dead_page(conn, matching, None, limit)


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


# --- The dashboard's reads, and the queue controls ------------------------------------


@dataclass(frozen=True)
class JobSearch:
    """A search over the live jobs (None: any).  `payload` is a JSON object the job's
    payload must contain (`payload @> ...`)."""

    queue: str | None = None
    kind: str | None = None
    state: str | None = None
    tenant_id: uuid.UUID | None = None
    job_id: int | None = None
    payload: dict[str, Any] | None = None


@dataclass(frozen=True)
class JobPage:
    rows: list[dict[str, Any]]
    # Where the next page starts (tenant, id); None: the search reached the end.
    next_key: tuple[uuid.UUID, int] | None


# Rows a page of a search reads at most: a filter that matches nothing costs this much
# per page, not the whole table.
SEARCH_SCAN_CAP = 20_000


async def jobs_search(
    conn: Executor,
    search: JobSearch,
    after: tuple[uuid.UUID, int] | None = None,
    limit: int = 50,
    scan_cap: int = SEARCH_SCAN_CAP,
) -> JobPage:
    """A page of the live jobs `search` selects, in key order (tenant, id), after the
    key `after`, reading at most `scan_cap` rows: a page may hold fewer rows than
    `limit` and still have a next one."""
    s = search
    rows = await conn.fetch(
        Q["jobs_search"],
        s.queue,
        s.kind,
        s.state,
        s.tenant_id,
        s.job_id,
        s.payload,
        after[0] if after else None,
        after[1] if after else None,
        limit,
        scan_cap,
    )
    last = rows.pop()
    found = [
        {k: v for k, v in dict(r).items() if k not in ("next_tenant", "next_id")} for r in rows
    ]
    next_key = (last["next_tenant"], last["next_id"]) if last["next_tenant"] is not None else None
    return JobPage(found, next_key)


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    return False


# How deep a payload filter's key path may go (`a.b.c:1` is three).
PAYLOAD_FILTER_DEPTH = 32


def parse_payload_filter(text: str) -> dict[str, Any]:
    """`invoice:42`, `customer.id:"c-1"`, `paid:true`: a containment object
    (`{"invoice": 42}`, `{"customer": {"id": "c-1"}}`).  The value is JSON when it
    reads as JSON, else the text itself (`status:open` is `{"status": "open"}`)."""
    path, sep, raw = text.partition(":")
    keys = path.split(".")
    if not sep or not all(keys):
        raise Invalid("payload", "write it as key:value or key.subkey:value")
    if len(keys) > PAYLOAD_FILTER_DEPTH:
        raise Invalid("payload", f"at most {PAYLOAD_FILTER_DEPTH} keys deep")
    try:
        value: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = raw
    if "\x00" in text or _holds_nul(value):
        # jsonb holds no NUL character: no payload can contain one.
        raise Invalid("payload", "must not contain a NUL character")
    for key in reversed(keys):
        value = {key: value}
    result: dict[str, Any] = value
    return result


async def dead_page(
    conn: Executor,
    matching: DeadFilter,
    before: tuple[datetime, int] | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """A page of the dead jobs `matching` selects, newest first, before `before`
    (died_at, id)."""
    return [
        dict(r)
        for r in await conn.fetch(
            Q["dead_page"],
            *matching.args(),
            before[0] if before else None,
            before[1] if before else None,
            limit,
        )
    ]


@dataclass(frozen=True)
class QueueControl:
    queue: str
    paused: bool
    concurrency: int | None  # None: each process's own (TENANTRY_QUEUES)
    updated_at: datetime | None
    updated_by: str | None


async def queue_controls(conn: Executor) -> list[QueueControl]:
    """Every queue with jobs or controls, with its controls."""
    return [QueueControl(**dict(r)) for r in await conn.fetch(Q["queue_controls_list"])]


async def set_queue_control(
    conn: Executor,
    queue: str,
    actor: str,
    *,
    paused: bool | None = None,
    concurrency: int | None = None,
    clear_concurrency: bool = False,
) -> QueueControl:
    """Pause or resume `queue` in every process, or set its concurrency in every
    process (`clear_concurrency`: back to each process's own)."""
    if concurrency is not None and not 1 <= concurrency <= 10_000:
        raise Invalid("concurrency", "a whole number from 1 to 10000")
    row = await conn.fetchrow(
        Q["set_queue_control"],
        queue_name(queue),
        paused,
        concurrency,
        clear_concurrency,
        actor,
    )
    assert row is not None
    return QueueControl(**dict(row))


@dataclass(frozen=True)
class Bucket:
    at: datetime
    succeeded: int
    failed: int  # attempts that failed
    dead: int


async def throughput(conn: Executor, since_s: int, bucket_s: int) -> dict[str, list[Bucket]]:
    """Per queue, one bucket per `bucket_s` over the last `since_s` seconds, oldest
    first, the empty ones included (a chart's gaps are zeros, not missing bars)."""
    rows = await conn.fetch(Q["throughput"], since_s, bucket_s)
    now = datetime.now(UTC).timestamp()
    first = (now - since_s) // bucket_s * bucket_s
    starts = [first + i * bucket_s for i in range(int(since_s // bucket_s) + 1)]
    by_queue: dict[str, dict[float, asyncpg.Record]] = {}
    for r in rows:
        by_queue.setdefault(r["queue"], {})[r["bucket"].timestamp()] = r
    result: dict[str, list[Bucket]] = {}
    for queue, found in by_queue.items():
        series = []
        for start in starts:
            at = datetime.fromtimestamp(start, UTC)
            hit = found.get(start)
            if hit is None:
                series.append(Bucket(at, 0, 0, 0))
            else:
                series.append(Bucket(at, hit["succeeded"], hit["failed"], hit["dead"]))
        result[queue] = series
    return result


async def periodic_runs(conn: Executor) -> dict[str, tuple[datetime, datetime]]:
    """Per periodic handler: the period it last enqueued, and when that was."""
    rows = await conn.fetch(Q["periodic_runs"])
    return {r["name"]: (r["last_period"], r["updated_at"]) for r in rows}
