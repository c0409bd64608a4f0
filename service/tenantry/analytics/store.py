"""Analytics on a read replica: the refresh of the views on the primary (the worker's
login), and their reading on a standby (the analyst's login, TENANTRY_ANALYTICS_URL).

The views (schema/0009_analytics.sql) sum up the last WINDOW_DAYS days per UTC day;
only the role tenantry_analyst may read them.  A reader refuses a connection that
landed on a primary unless told otherwise (TENANTRY_ANALYTICS_ALLOW_PRIMARY): the
point of the views is to keep analytical reads off the primary.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus

from .. import db, roles
from .. import logging as log
from ..clock import Random, system_random
from ..errors import ConfigError, Invalid, SchemaMismatch
from ..safetext import safe_text
from ..sql import queries_for

Q = queries_for(__file__)

ANALYST_ROLES = ("tenantry_analyst",)
URL_VARIABLE = "TENANTRY_ANALYTICS_URL"
WINDOW_DAYS = 90
# The analyst's statements: reads of small views; a read-only session, so that even a
# grant given by mistake would not make this login write.
READER_SETTINGS = {
    "default_transaction_read_only": "on",
    "lock_timeout": "2s",
    "statement_timeout": "10s",
}
REFRESH_TIMEOUT = "10min"
# Seconds a connection to the replica may take: a replica host that is down and drops
# packets would otherwise hold the page for asyncpg's 60 s (the proxy in front gives up
# at 60 s too, and the operator got a 504 instead of the page's notice).
CONNECT_TIMEOUT = 5.0
# How often a process asks whether a refresh is due (the database decides, across all
# processes): at most this, and at most the refresh interval.
REFRESH_POLL_S = 30.0

NOT_CONFIGURED = (
    f"{URL_VARIABLE} is unset: point it at a read replica (a streaming standby of the"
    " primary) with the analyst's login, e.g. postgresql://analyst:PASSWORD@replica/DB."
    f" `tenantry migrate` run with {URL_VARIABLE} set creates that login on the primary"
    " (a member of tenantry_analyst only) and the standby replays it"
)


class PrimaryRefused(ConfigError):
    """The analyst's connection landed on a primary, and that is not allowed."""


def primary_refused_message() -> str:
    return (
        f"{URL_VARIABLE} points at a primary (pg_is_in_recovery() is false): analytical"
        " reads belong on a standby, off the primary. Point it at a read replica, or set"
        " TENANTRY_ANALYTICS_ALLOW_PRIMARY=true to read the primary anyway"
    )


def check_days(days: int) -> int:
    if not 1 <= days <= WINDOW_DAYS:
        raise Invalid("days", f"must be 1 to {WINDOW_DAYS} (the views hold {WINDOW_DAYS} days)")
    return days


@dataclass(frozen=True)
class Replica:
    """Where the analyst's connection landed, and how far behind its primary."""

    in_recovery: bool
    # Seconds since the last transaction replayed was committed on the primary (grows
    # while the primary commits nothing, too); None on a primary.
    lag_s: float | None
    # WAL received from the primary and not replayed yet; None on a primary.
    behind_bytes: int | None


@dataclass(frozen=True)
class Report:
    replica: Replica
    # When the views were last refreshed (None: never since the migration made them).
    refreshed_at: datetime | None
    last_day: date
    days: int
    tenant_id: uuid.UUID | None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    onboarding: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "replica": {
                "in_recovery": self.replica.in_recovery,
                "lag_s": self.replica.lag_s,
                "behind_bytes": self.replica.behind_bytes,
            },
            "refreshed_at": self.refreshed_at,
            "last_day": self.last_day.isoformat(),
            "days": self.days,
            "tenant_id": self.tenant_id,
            "jobs": [_dated(r) for r in self.jobs],
            "webhooks": [_dated(r) for r in self.webhooks],
            "onboarding": [_dated(r) for r in self.onboarding],
        }


def _dated(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "day": row["day"].isoformat()}


async def replica_status(conn: db.Conn) -> Replica:
    row = await conn.fetchrow(Q["replica"])
    assert row is not None
    return Replica(row["in_recovery"], row["lag_s"], row["behind_bytes"])


async def read(
    conn: db.Conn, *, days: int, tenant_id: uuid.UUID | None, allow_primary: bool
) -> Report:
    """The report of the last `days` days, from the analyst's connection: refused
    (PrimaryRefused) on a primary unless `allow_primary`, and (InsecureRole) for a
    login that could do more than read the views."""
    check_days(days)
    replica = await replica_status(conn)
    if not replica.in_recovery and not allow_primary:
        raise PrimaryRefused(primary_refused_message())
    await roles.check_login(conn, URL_VARIABLE, ANALYST_ROLES)
    try:
        # One snapshot: the sections agree with each other (a refresh replayed in
        # between would otherwise show two different days' views).
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            refreshed = await conn.fetchrow(Q["refreshed"])
            assert refreshed is not None
            jobs = await conn.fetch(Q["jobs"], days, tenant_id)
            webhooks = await conn.fetch(Q["webhooks"], days, tenant_id)
            onboarding = await conn.fetch(Q["onboarding"], days)
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        raise SchemaMismatch(
            "the analytics views are not there: run `tenantry migrate` (migration 0009)"
            " on the primary, and let the standby replay it"
        ) from None
    except asyncpg.InsufficientPrivilegeError:
        raise ConfigError(
            f"{URL_VARIABLE}'s login may not read the analytics views: it must be a"
            f" member of tenantry_analyst (`tenantry migrate` run with {URL_VARIABLE} set"
            " grants it)"
        ) from None
    return Report(
        replica,
        refreshed["refreshed_at"],
        refreshed["last_day"],
        days,
        tenant_id,
        [dict(r) for r in jobs],
        [dict(r) for r in webhooks],
        [dict(r) for r in onboarding],
    )


async def create_pool(url: str) -> asyncpg.Pool:
    """The dashboard's connections to the replica: none until a page asks (a replica
    that is away must not keep the service from starting), two at most."""
    return await db.create_pool(
        url,
        min_size=0,
        max_size=2,
        settings=READER_SETTINGS,
        name="tenantry-analytics",
        connect_timeout=CONNECT_TIMEOUT,
    )


async def create_refresh_pool(worker_url: str, *, pooled: bool = False) -> asyncpg.Pool:
    """The refresher's connection (the worker's login), opened when a refresh is first
    asked about (`pooled`: through a transaction-mode pooler, as the worker's other
    connections)."""
    return await db.create_pool(
        worker_url,
        min_size=0,
        max_size=1,
        settings=db.WORKER_TIMEOUTS,
        name="tenantry-refresh",
        pooled=pooled,
    )


@dataclass
class Reader:
    """What the dashboard's analytics page reads through."""

    pool: asyncpg.Pool
    allow_primary: bool

    async def report(self, days: int, tenant_id: uuid.UUID | None) -> Report:
        async with self.pool.acquire() as conn:
            return await read(
                conn, days=days, tenant_id=tenant_id, allow_primary=self.allow_primary
            )


class Refresher:
    """Refreshes the views on the primary, once per `interval_s` across every process
    (tenantry.refresh_analytics decides, under the lock of its state row).  A component
    of its own, not a maintenance task: a refresh may take minutes, and lease rescue
    must not wait behind it."""

    name = "refresh_analytics"

    def __init__(self, pool: asyncpg.Pool, interval_s: float, rnd: Random | None = None) -> None:
        self._pool = pool
        self._interval = interval_s
        self._rnd = rnd or system_random()
        self._log = log.get("analytics")

    async def run_once(self) -> int:
        """1 if this call refreshed the views, 0 if it was not due or another process
        was refreshing them."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(Q["refresh_timeout"], REFRESH_TIMEOUT)
            refreshed = bool(await conn.fetchval(Q["refresh"], self._interval))
        if refreshed:
            self._log.info("analytics_refreshed")
        return int(refreshed)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        poll = min(self._interval, REFRESH_POLL_S)
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                # The database away, a refresh cancelled by its timeout: try next time.
                self._log.warning("analytics_refresh_failed", error=safe_text(str(exc)))
            await anyio.sleep(poll * (0.75 + 0.5 * self._rnd.random()))
