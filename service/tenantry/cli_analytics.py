"""`tenantry analytics`: the analytics views, read on the replica as the analyst's login
(TENANTRY_ANALYTICS_URL), with the replica's lag.  Unset URL, or a URL that lands on a
primary without TENANTRY_ANALYTICS_ALLOW_PRIMARY: exit 2 with the reason."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import asyncpg

from . import config, db
from .analytics import store as analytics
from .errors import ConfigError, InsecureRole, SchemaMismatch
from .timefmt import utc_text

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_DAYS = 7

Out = Callable[[str], None]
Fail = Callable[[str, int], int]


def _days(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of days") from None
    if not 1 <= value <= analytics.WINDOW_DAYS:
        raise argparse.ArgumentTypeError(
            f"{raw!r}: the views hold 1 to {analytics.WINDOW_DAYS} days"
        )
    return value


def add_commands(sub: Any, uuid_type: Callable[[str], uuid.UUID]) -> None:
    a = sub.add_parser(
        "analytics",
        help="jobs, webhooks and sign-ups per day, read on the read replica"
        " (TENANTRY_ANALYTICS_URL), with its lag",
    )
    a.add_argument("--tenant", type=uuid_type, help="only this tenant's jobs and webhooks")
    a.add_argument(
        "--days",
        type=_days,
        default=DEFAULT_DAYS,
        help=f"the last N days (1 to {analytics.WINDOW_DAYS}; default {DEFAULT_DAYS})",
    )
    a.add_argument("--json", action="store_true")


def run(
    args: argparse.Namespace,
    settings: config.Settings,
    out: Out,
    fail: Fail,
    json_text: Callable[..., str],
) -> int:
    url = settings.analytics_url
    if url is None:
        return fail(analytics.NOT_CONFIGURED, EXIT_USAGE)
    try:
        report = anyio.run(_read, url, args.days, args.tenant, settings.analytics_allow_primary)
    except ConfigError as exc:  # a primary refused, a login without the grant
        return fail(str(exc), EXIT_USAGE)
    except (SchemaMismatch, InsecureRole) as exc:
        return fail(str(exc), EXIT_FAILED)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return fail(f"analytics replica: {exc} ({db.redact_dsn(url)})", EXIT_FAILED)
    if args.json:
        out(json_text(report.as_json(), indent=True))
    else:
        for line in describe(report):
            out(line)
    return EXIT_OK


async def _read(
    url: str, days: int, tenant_id: uuid.UUID | None, allow_primary: bool
) -> analytics.Report:
    conn = await db.connect(
        url, server_settings=analytics.READER_SETTINGS, timeout=analytics.CONNECT_TIMEOUT
    )
    try:
        return await analytics.read(
            conn, days=days, tenant_id=tenant_id, allow_primary=allow_primary
        )
    finally:
        await conn.close()


def replica_line(replica: analytics.Replica) -> str:
    if not replica.in_recovery:
        return "replica: none, reading the PRIMARY (TENANTRY_ANALYTICS_ALLOW_PRIMARY=true)"
    lag = "unknown (nothing replayed yet)" if replica.lag_s is None else f"{replica.lag_s:.1f} s"
    behind = "unknown" if replica.behind_bytes is None else f"{replica.behind_bytes:,}"
    return (
        f"replica: standby; lag {lag} (since the last replayed transaction's commit);"
        f" {behind} bytes received, not yet replayed"
    )


def describe(report: analytics.Report) -> list[str]:
    refreshed = (
        utc_text(report.refreshed_at)
        if report.refreshed_at
        else "never (only made by the migration)"
    )
    scope = f"tenant {report.tenant_id}" if report.tenant_id else "all tenants"
    lines = [
        replica_line(report.replica),
        f"views refreshed: {refreshed}; the {report.days} days to {report.last_day} (UTC); {scope}",
        "",
        "jobs",
    ]
    if report.jobs:
        lines += _table(
            ("day", "kind", "succeeded", "failed_attempts", "dead", "succeeded_7d", "dead_7d"),
            report.jobs,
        )
    else:
        lines.append("  no job finished in the window")
    lines += ["", "webhooks"]
    lines += _table(
        (
            "day",
            "deliveries",
            "delivered",
            "dead",
            "attempts",
            "failed_attempts",
            "failure_ratio_7d",
        ),
        report.webhooks,
    )
    lines += ["", "onboarding (every sign-up, by the day it was accepted)"]
    lines += _table(
        (
            "day",
            "accepted",
            "completed",
            "failed",
            "in_progress",
            "complete_p50_s",
            "complete_p95_s",
            "completion_ratio_7d",
        ),
        report.onboarding,
    )
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    # A kind may hold a line break (any text up to 200 characters): written as it is, it
    # would start a row of its own.  The other control characters are escaped on output.
    return str(value).replace("\n", "\\x0a")


def _table(header: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[str]:
    table = [tuple(header)] + [tuple(_cell(r[c]) for c in header) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
