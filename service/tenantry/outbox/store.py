"""Emit events, replay an aggregate's events, follow the log across tenants."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg

from ..db import Executor
from ..errors import Conflict
from ..sql import queries_for

Q = queries_for(__file__)


@dataclass(frozen=True, slots=True)
class Event:
    """An event as followers pass it on: `data` is its JSON text, the payload's keys
    with `type`, `version` and `at` (never decoded here: whatever a writer stored, a
    follower forwards it unharmed)."""

    tenant_id: uuid.UUID
    aggregate_id: str
    version: int
    type: str
    data: str


async def emit(
    conn: Executor,
    *,
    tenant_id: uuid.UUID,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Any,
    version: int | None = None,
) -> int:
    """Append one event to the outbox, in the caller's transaction: it is published if
    and only if that transaction commits.  Returns the event's id.

    `conn` is a connection inside a tenant transaction for `tenant_id` (see
    `tenantry.tenant_tx`).  Events of one aggregate (`aggregate_type`,
    `aggregate_id`) are numbered 1, 2, 3...: `version=None` takes the next number,
    an explicit `version` asserts it, and one that another writer already took raises
    `Conflict` (two writers raced on one aggregate).  `payload` is any JSON value;
    followers (the event streams) receive its keys with `type`, `version` and `at`.
    The SQL equivalent is `tenantry.emit(...)`."""
    try:
        event_id: int = await conn.fetchval(
            Q["append"], tenant_id, aggregate_type, aggregate_id, event_type, payload, version
        )
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(
            f"{aggregate_type} {aggregate_id}: version {version} was written by another writer"
        ) from exc
    return event_id


async def events_after(
    conn: Executor,
    tenant_id: uuid.UUID,
    aggregate_type: str,
    aggregate_id: str,
    after_version: int,
    *,
    limit: int = 1000,
) -> list[Event]:
    """The aggregate's events after `after_version` (the caller's tenant context)."""
    rows = await conn.fetch(
        Q["events_after"], tenant_id, aggregate_type, aggregate_id, after_version, limit
    )
    return [Event(tenant_id, aggregate_id, r["version"], r["event_type"], r["data"]) for r in rows]


async def replay(
    conn: Executor,
    tenant_id: uuid.UUID,
    aggregate_type: str,
    aggregate_id: str,
    after_version: int,
    *,
    page: int = 500,
) -> list[Event]:
    """Every event of the aggregate after `after_version`, however many, a page of
    rows per statement."""
    events: list[Event] = []
    while True:
        batch = await events_after(
            conn, tenant_id, aggregate_type, aggregate_id, after_version, limit=page
        )
        events += batch
        if len(batch) < page:
            return events
        after_version = batch[-1].version


class Position(NamedTuple):
    """Where a follower is: the snapshot of its last read, and the server's epoch then
    (when the server last lost its shared state: pg_stat_archiver's stats_reset).

    A snapshot is only good on the server that took it, as long as that server keeps
    its transaction ids.  A crash's recovery (which resets the statistics) may have lost
    the latest transactions (the provisioning steps commit without waiting for the
    disk), and hands their ids out again; a failover's standby may be behind in them.
    Rows written under such ids are behind the snapshot, where `follow` never looks: a
    follower whose epoch changed starts again from a fresh snapshot, and what it serves
    resumes from what it last delivered by other means (the SSE hub: by version).  A
    clean restart keeps the statistics, and loses nothing; an operator's reset of the
    archiver's statistics is taken for a crash (a needless restart, nothing lost)."""

    snapshot: str
    server_epoch: str


async def snapshot(conn: Executor) -> Position:
    """Where a follower starting now begins (see `follow`)."""
    row = await conn.fetchrow(Q["snapshot"])
    assert row is not None
    return Position(row["snapshot"], row["server_epoch"])


async def follow(conn: Executor, after: str, aggregate_type: str) -> tuple[Position, list[Event]]:
    """Events of `aggregate_type` in every tenant that the snapshot `after` could not
    see, and where to follow on from.  Each event is returned once (a follower that
    passes each call's snapshot to the next, on a server of the same epoch); a read
    costs what was committed since the last one.  Needs the worker's login (a
    cross-tenant path)."""
    rows = await conn.fetch(Q["follow"], after, aggregate_type)
    events = [
        Event(r["tenant_id"], r["aggregate_id"], r["version"], r["event_type"], r["data"])
        for r in rows
        if r["version"] is not None
    ]
    return Position(rows[0]["snapshot"], rows[0]["server_epoch"]), events


async def prune(conn: Executor, retention_days: int, batch: int) -> int:
    pruned: int = await conn.fetchval(Q["prune"], retention_days, batch)
    return pruned
