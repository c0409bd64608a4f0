"""Migrations: apply, check, refuse edited or unknown ones, concurrent migrators."""

from __future__ import annotations

from pathlib import Path

import anyio
import asyncpg
import pytest

from service import db, migrate
from service.errors import SchemaMismatch


async def test_migrate_applies_all_then_nothing(empty_database_url: str) -> None:
    conn = await db.connect(empty_database_url)
    try:
        assert not (await migrate.status(conn)).current
        applied = await migrate.migrate(conn)
        assert applied == [*migrate.discover(), *migrate.repeatables()]
        assert await migrate.migrate(conn) == []
        assert (await migrate.status(conn)).current
    finally:
        await conn.close()


async def test_concurrent_migrators_apply_each_migration_once(empty_database_url: str) -> None:
    conns = [await db.connect(empty_database_url) for _ in range(4)]
    results: list[int] = []
    try:

        async def run(c: asyncpg.Connection) -> None:
            results.append(len(await migrate.migrate(c)))

        async with anyio.create_task_group() as tg:
            for c in conns:
                tg.start_soon(run, c)
        everything = len(migrate.discover()) + len(migrate.repeatables())
        assert sorted(results) == [0, 0, 0, everything]
        count = await conns[0].fetchval("SELECT count(*) FROM tenantry.schema_migrations")
        assert count == len(migrate.discover())
    finally:
        for c in conns:
            await c.close()


async def test_database_ahead_of_code_is_refused(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO tenantry.schema_migrations (version, name, checksum)"
        " VALUES (9999, 'future', 'x')"
    )
    st = await migrate.status(conn)
    assert st.unknown == [9999] and "ahead" in st.describe()
    with pytest.raises(SchemaMismatch, match="ahead"):
        await migrate.migrate(conn)


async def test_edited_migration_is_refused(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "UPDATE tenantry.schema_migrations SET checksum = 'edited' WHERE version = 1"
    )
    st = await migrate.status(conn)
    assert st.edited == [1]
    with pytest.raises(SchemaMismatch, match="edited"):
        await migrate.migrate(conn)


async def test_failed_migration_leaves_no_trace(empty_database_url: str, tmp_path: Path) -> None:
    d = tmp_path
    (d / "0001_ok.sql").write_text("CREATE TABLE tenantry.a (x int);")
    (d / "0002_bad.sql").write_text("CREATE TABLE tenantry.b (x int); SELECT 1/0;")
    conn = await db.connect(empty_database_url)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate.migrate(conn, d, files=())
        versions = await conn.fetch("SELECT version FROM tenantry.schema_migrations")
        assert [r["version"] for r in versions] == [1]
        assert await conn.fetchval("SELECT to_regclass('tenantry.b')") is None
    finally:
        await conn.close()


async def test_a_changed_functions_file_is_applied_again_and_never_downgraded(
    empty_database_url: str, tmp_path: Path
) -> None:
    """Repeatable migrations: a functions file is applied after the numbered
    migrations, again when its version is raised, and never otherwise.  Regression:
    with checksums alone, older code migrating after newer code put its own functions
    back (replicas of two versions in a rolling deploy took turns)."""
    numbered = tmp_path / "schema"
    numbered.mkdir()
    (numbered / "0001_t.sql").write_text("CREATE TABLE tenantry.t (x int);")
    (numbered / "0002_r.sql").write_text(
        "CREATE TABLE tenantry.schema_repeatables (name text PRIMARY KEY, version integer"
        " NOT NULL, checksum text NOT NULL, applied_at timestamptz DEFAULT now());"
    )
    module = tmp_path / "thing"
    module.mkdir()
    functions = module / "functions.sql"

    def write(version: int, answer: int) -> None:
        functions.write_text(
            f"-- version: {version}\n"
            "CREATE OR REPLACE FUNCTION tenantry.answer() RETURNS int"
            f" LANGUAGE sql RETURN {answer};"
        )

    write(1, 41)
    conn = await db.connect(empty_database_url)
    try:
        first = await migrate.migrate(conn, numbered, files=[functions])
        assert [getattr(m, "version", None) if isinstance(m, migrate.Migration) else m.name
                for m in first] == [1, 2, "thing"]  # fmt: skip
        assert await conn.fetchval("SELECT tenantry.answer()") == 41
        assert await migrate.migrate(conn, numbered, files=[functions]) == []
        write(2, 42)  # a new version of the code
        st = await migrate.status(conn, numbered, files=[functions])
        assert st.stale == ["thing"] and st.behind and "older than this code" in st.describe()
        again = await migrate.migrate(conn, numbered, files=[functions])
        assert [r.name for r in again if isinstance(r, migrate.Repeatable)] == ["thing"]
        assert await conn.fetchval("SELECT tenantry.answer()") == 42
        assert (await migrate.status(conn, numbered, files=[functions])).current
        write(1, 41)  # the old code again, as in a rolling deploy: refused
        st = await migrate.status(conn, numbered, files=[functions])
        assert st.files_ahead == ["thing"] and not st.behind and not st.current
        with pytest.raises(SchemaMismatch, match="newer functions"):
            await migrate.migrate(conn, numbered, files=[functions])
        assert await conn.fetchval("SELECT tenantry.answer()") == 42
        write(2, 43)  # an edit that forgot to raise the version: refused
        with pytest.raises(SchemaMismatch, match="without a new version"):
            await migrate.migrate(conn, numbered, files=[functions])
        assert await conn.fetchval("SELECT tenantry.answer()") == 42
        functions.write_text("CREATE FUNCTION tenantry.x() RETURNS int LANGUAGE sql RETURN 1;")
        with pytest.raises(SchemaMismatch, match="starts with `-- version: N`"):
            migrate.repeatables([functions])
    finally:
        await conn.close()
