"""Times as the HTTP interface and the events give them: one format, RFC 3339 in UTC with
microseconds and `Z` (2026-12-01T07:51:00.000000Z), which every client parses the same
way and sorts as text.  The events' `at` is made in SQL in the same format
(tenantry.event_data in outbox/functions.sql)."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_text(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
