"""Replaying every migration yields exactly the committed schema snapshot.

A change to the schema therefore shows up in review as a change to
`tests/integration/schema_snapshot.txt`.  After an intended change, regenerate it with
`UPDATE_SCHEMA_SNAPSHOT=1 make test` and commit the result.
"""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg

HERE = Path(__file__).parent
SNAPSHOT = HERE / "schema_snapshot.txt"


async def test_migrations_replay_to_the_committed_snapshot(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch((HERE / "schema_snapshot.sql").read_text())
    actual = "\n".join(r["line"] for r in rows) + "\n"
    if os.environ.get("UPDATE_SCHEMA_SNAPSHOT"):
        SNAPSHOT.write_text(actual)
    assert actual == SNAPSHOT.read_text(), (
        "the schema differs from tests/integration/schema_snapshot.txt; if intended, "
        "regenerate it with UPDATE_SCHEMA_SNAPSHOT=1"
    )
