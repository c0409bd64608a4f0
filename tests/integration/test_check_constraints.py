"""0010-0014 rewrote six CHECK constraints without counted repetition (`{1,200}` and the
like cost PostgreSQL's regular expressions 16-30 us a row, `+` with the length checked
apart 0.3 us): each must accept exactly the strings the old one did."""

from __future__ import annotations

import re

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

# (table, constraint, column) -> the check as 0002, 0003 and 0007 wrote it, on `s`.
BEFORE = {
    ("outbox", "outbox_aggregate_type", "aggregate_type"): "s ~ '^[A-Za-z0-9_.:-]{1,100}$'",
    ("outbox", "outbox_event_type", "event_type"): "s ~ '^[A-Za-z0-9_.:-]{1,200}$'",
    ("tenants", "tenants_slug_format", "slug"): "s ~ '^[a-z0-9]([a-z0-9-]{0,48}[a-z0-9])?$'",
    ("workspaces", "workspaces_slug_format", "slug"): (
        "s ~ '^[a-z0-9]([a-z0-9-]{0,48}[a-z0-9])?$'"
    ),
    ("roles", "roles_name_format", "name"): "s ~ '^[a-z][a-z0-9_]{0,39}$'",
    ("operators", "operators_name", "name"): "s ~ '^[A-Za-z0-9_.@-]{1,100}$'",
}

# The allowed characters of every pattern, their edges, and characters none allows
# (upper case where only lower is, a space, a line break, a slash, non-ASCII letters,
# the Kelvin sign that folds to K).
ALPHABET = "aAzZ09_.:-@ \n/é\u212aß"
BOUNDS = (0, 1, 2, 39, 40, 41, 48, 49, 50, 51, 99, 100, 101, 199, 200, 201)
EDGES = [c * n for c in "a0-_" for n in BOUNDS] + ["a" + "-" * 48 + "a", "a" + "-" * 49 + "a"]


async def _current(admin_pool: asyncpg.Pool, table: str, constraint: str) -> tuple[str, bool]:
    row = await admin_pool.fetchrow(
        "SELECT pg_get_constraintdef(c.oid) AS def, c.convalidated FROM pg_constraint c"
        " WHERE c.conrelid = ('tenantry.' || $1)::regclass AND c.conname = $2",
        table,
        constraint,
    )
    assert row is not None
    definition = re.fullmatch(r"CHECK \((.*)\)", row["def"])
    assert definition is not None
    return definition[1], row["convalidated"]


@pytest.mark.parametrize(("table", "constraint", "column"), list(BEFORE), ids=lambda v: v)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(strings=st.lists(st.text(alphabet=ALPHABET, max_size=210), max_size=40))
@example(strings=EDGES)
async def test_each_rewritten_check_accepts_exactly_what_the_old_one_did(
    admin_pool: asyncpg.Pool, table: str, constraint: str, column: str, strings: list[str]
) -> None:
    now, validated = await _current(admin_pool, table, constraint)
    assert validated
    assert "{" not in now  # no counted repetition left
    on_s = re.sub(rf"\b{column}\b", "s", now)
    rows = await admin_pool.fetch(
        f"SELECT s, coalesce({BEFORE[(table, constraint, column)]}, false) AS before,"
        f"       coalesce({on_s}, false) AS now"
        "   FROM unnest($1::text[]) s",
        strings,
    )
    assert [(r["s"], r["now"]) for r in rows] == [(r["s"], r["before"]) for r in rows]
