"""Migrations: apply, check, refuse edited or unknown ones, concurrent migrators."""

from __future__ import annotations

from pathlib import Path

import anyio
import asyncpg
import pytest

from tenantry import db, migrate
from tenantry.errors import MigrationBlocked, SchemaMismatch
from tests.helpers import TENANT_A, eventually, wait_lock_waiter


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


def _next_versions(tmp_path: Path, edit: dict[str, tuple[str, str]] | None = None) -> list[Path]:
    """The functions files as the next release would ship them: each version raised,
    with the given (module: (old, new)) text replaced."""
    out = []
    for path in migrate.REPEATABLE_FILES:
        module = path.parent.name
        sql = path.read_text(encoding="utf-8")
        version = int(sql.split("\n", 1)[0].removeprefix("-- version: "))
        sql = sql.replace(f"-- version: {version}\n", f"-- version: {version + 1}\n", 1)
        if edit and module in edit:
            old, new = edit[module]
            assert old in sql
            sql = sql.replace(old, new)
        (tmp_path / module).mkdir()
        (tmp_path / module / "functions.sql").write_text(sql, encoding="utf-8")
        out.append(tmp_path / module / "functions.sql")
    return out


async def test_new_functions_do_not_wait_for_open_transactions_on_the_queue(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Regression: every application of the jobs' functions file dropped and created
    its triggers, which waits for each open transaction that touched the table and
    meanwhile blocks every insert: a deploy stalled all producers behind the longest
    transaction.  Unchanged triggers are now left alone."""
    files = _next_versions(tmp_path)
    conn = await db.connect(database_url)
    try:
        async with pool.acquire() as open_tx, open_tx.transaction():
            await open_tx.execute("SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A))
            await open_tx.execute(
                "INSERT INTO tenantry.jobs (tenant_id, kind) VALUES ($1, 'k')", TENANT_A
            )
            with anyio.fail_after(10):
                applied = await migrate.migrate(conn, files=files)
        assert sorted(r.name for r in applied if isinstance(r, migrate.Repeatable)) == [
            "analytics",
            "jobs",
            "onboarding",
            "ops",
            "outbox",
            "tenants",
            "webhooks",
        ]
        triggers = await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgname IN"
            " ('jobs_wake', 'jobs_schedule_delayed', 'outbox_wake')"
        )
        assert triggers == 3
    finally:
        await conn.close()


async def test_a_migration_behind_a_long_transaction_gives_up_and_changes_nothing(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """A changed trigger must lock its table; behind a long transaction the migration
    waits lock_timeout, tries again, then fails with a clear error and nothing applied
    (rather than queueing for the lock, which blocks every producer meanwhile).  Once
    the transaction ends it applies."""
    files = _next_versions(
        tmp_path,
        {"jobs": ("FOR EACH ROW WHEN (NEW.state = 'queued')\n",
                  "FOR EACH ROW WHEN (NEW.state = 'queued' AND NEW.queue IS NOT NULL)\n")},
    )  # fmt: skip
    conn = await db.connect(database_url)
    try:
        async with pool.acquire() as open_tx:
            tx = open_tx.transaction()
            await tx.start()
            await open_tx.execute("SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A))
            await open_tx.execute(
                "INSERT INTO tenantry.jobs (tenant_id, kind) VALUES ($1, 'k')", TENANT_A
            )
            with pytest.raises(MigrationBlocked, match="jobs functions: a lock was not granted"):
                await migrate.migrate(conn, files=files, lock_timeout=0.2, attempts=2)
            st = await migrate.status(conn, files=files)
            assert st.stale == [
                "jobs",
                "outbox",
                "onboarding",
                "tenants",
                "webhooks",
                "ops",
                "analytics",
            ]
            # A producer is not held up by the failed attempts.
            with anyio.fail_after(5):
                await pool.execute("SELECT 1")
            await tx.rollback()
        await migrate.migrate(conn, files=files, lock_timeout=0.2, attempts=2)
        assert (await migrate.status(conn, files=files)).current
        definition = await conn.fetchval(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'jobs_wake'"
        )
        assert "queue IS NOT NULL" in definition
    finally:
        await conn.close()


async def test_new_functions_enable_a_trigger_disabled_by_hand(
    database_url: str, tmp_path: Path
) -> None:
    """Regression (third review): a trigger was created again only when its definition
    changed, so one disabled by hand (ALTER TABLE ... DISABLE TRIGGER) stayed disabled
    through every later migration, and with it every wake-up."""
    conn = await db.connect(database_url)
    try:
        await conn.execute("ALTER TABLE tenantry.jobs DISABLE TRIGGER jobs_wake")
        await migrate.migrate(conn, files=_next_versions(tmp_path))
        enabled = await conn.fetchval(
            "SELECT tgenabled::text FROM pg_trigger WHERE tgname = 'jobs_wake'"
        )
        assert enabled == "O"
    finally:
        await conn.close()


@pytest.mark.parametrize(("how", "state"), [("ALWAYS", "A"), ("REPLICA", "R")])
async def test_new_functions_keep_a_trigger_an_operator_set_to_fire_always_or_on_replicas(
    database_url: str, tmp_path: Path, how: str, state: str
) -> None:
    """Regression (fourth review): the functions file created again every trigger not in
    the plain enabled state, so one an operator had set to ENABLE ALWAYS (to be heard
    from a logical replication subscriber too) was turned back into a plain one, and
    the release waited for open producer transactions to drop it."""
    conn = await db.connect(database_url)
    try:
        await conn.execute(f"ALTER TABLE tenantry.jobs ENABLE {how} TRIGGER jobs_wake")
        await migrate.migrate(conn, files=_next_versions(tmp_path))
        enabled = await conn.fetchval(
            "SELECT tgenabled::text FROM pg_trigger WHERE tgname = 'jobs_wake'"
        )
        assert enabled == state
    finally:
        await conn.execute("ALTER TABLE tenantry.jobs ENABLE TRIGGER jobs_wake")
        await conn.close()


async def test_a_reader_of_one_table_holds_up_only_that_tables_check_rewrite(
    empty_database_url: str, tmp_path: Path
) -> None:
    """Regression (attack on the checks' rewrite): it changed five tables in one
    transaction, outbox first, and held the outbox locked while it waited for a reader of
    `roles`: every emit waited the lock timeout, on each attempt.  One table a migration
    now, so the outbox's is done and its table free while the roles' waits."""
    before = tmp_path / "schema"
    before.mkdir()
    for m in migrate.discover():
        if m.version <= 9:
            (before / f"{m.version:04d}_{m.name}.sql").write_text(m.sql, encoding="utf-8")
    conn = await db.connect(empty_database_url)
    reader = await db.connect(empty_database_url)
    writer = await db.connect(empty_database_url)
    try:
        await migrate.migrate(conn, directory=before)
        reading = reader.transaction()
        await reading.start()
        await reader.fetchval("SELECT count(*) FROM tenantry.roles")
        roles = await writer.fetchval("SELECT 'tenantry.roles'::regclass::oid")

        async def migrate_behind_the_reader() -> None:
            with pytest.raises(MigrationBlocked, match="0013_roles_name_check"):
                await migrate.migrate(conn, lock_timeout=3.0, attempts=1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(migrate_behind_the_reader)

            async def roles_awaited() -> bool:
                return bool(
                    await writer.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE relation = $1 AND NOT granted",
                        roles,
                    )
                )

            await eventually(roles_awaited, timeout=10)
            # While the roles' migration waits: the outbox takes writes at once.
            await writer.execute("SET lock_timeout = '100ms'")
            await writer.execute(
                "INSERT INTO tenantry.outbox"
                " (tenant_id, aggregate_type, aggregate_id, version, event_type)"
                " VALUES ($1, 'probe', 'x', 1, 'probe.written')",
                TENANT_A,
            )
        await reading.rollback()
        assert [m.version for m in (await migrate.status(conn)).pending] == [13, 14, 15]
        await migrate.migrate(conn)
        validated = await conn.fetch(
            "SELECT conname FROM pg_constraint WHERE conname = ANY($1::text[]) AND convalidated",
            [
                "outbox_aggregate_type",
                "outbox_event_type",
                "tenants_slug_format",
                "workspaces_slug_format",
                "roles_name_format",
                "operators_name",
            ],
        )
        assert len(validated) == 6
    finally:
        for c in (conn, reader, writer):
            await c.close()


async def _migrate_into_a_deadlock(
    url: str, tmp_path: Path, *, attempts: int
) -> tuple[asyncpg.Connection, Path, list[int] | MigrationBlocked]:
    """A migration that locks the jobs table, then the outbox, while a transaction of
    the service holds the outbox and then asks for the jobs table: a deadlock, whose
    victim PostgreSQL makes the migration (its deadlock_timeout is the shorter, so its
    backend is the one that finds the cycle).  Returns the migrator's connection (for the
    caller to close), the migrations' folder, and the versions migrate() applied or the
    MigrationBlocked it raised."""
    directory = tmp_path / "schema"
    directory.mkdir()
    for m in migrate.discover():
        (directory / f"{m.version:04d}_{m.name}.sql").write_text(m.sql, encoding="utf-8")
    conn = await db.connect(url)
    other = await db.connect(url)
    try:
        await migrate.migrate(conn, directory=directory)
        last = max(m.version for m in migrate.discover())
        (directory / f"{last + 1:04d}_jobs_then_outbox.sql").write_text(
            "LOCK TABLE tenantry.jobs IN SHARE ROW EXCLUSIVE MODE;\n"
            "LOCK TABLE tenantry.outbox IN SHARE ROW EXCLUSIVE MODE;\n",
            encoding="utf-8",
        )
        await conn.execute("SET deadlock_timeout = '200ms'")
        await other.execute("SET deadlock_timeout = '60s'")
        result: list[int] | MigrationBlocked = []

        async def run() -> None:
            nonlocal result
            try:
                done = await migrate.migrate(
                    conn, directory=directory, lock_timeout=2.0, attempts=attempts
                )
                result = [m.version for m in done if isinstance(m, migrate.Migration)]
            except MigrationBlocked as exc:
                result = exc

        tx = other.transaction()
        await tx.start()
        await other.execute("LOCK TABLE tenantry.outbox IN ROW EXCLUSIVE MODE")
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_lock_waiter(other, timeout=10)  # the migration, at the outbox
            # Granted once the migration, the deadlock's victim, has rolled back.
            with anyio.fail_after(10):
                await other.execute("LOCK TABLE tenantry.jobs IN ROW EXCLUSIVE MODE")
            await tx.commit()
        return conn, directory, result
    except BaseException:
        await conn.close()
        raise
    finally:
        await other.close()


async def test_a_migration_that_is_a_deadlocks_victim_is_tried_again(
    empty_database_url: str, tmp_path: Path
) -> None:
    """Regression (follow-up of the checks' rewrite): a migration that PostgreSQL chose
    as a deadlock's victim failed the whole `tenantry migrate` with DeadlockDetectedError,
    although it had been rolled back whole and could simply run again."""
    conn, directory, result = await _migrate_into_a_deadlock(
        empty_database_url, tmp_path, attempts=3
    )
    try:
        last = max(m.version for m in migrate.discover())
        assert result == [last + 1]
        assert (await migrate.status(conn, directory=directory)).current
    finally:
        await conn.close()


async def test_a_migration_that_stays_a_deadlocks_victim_fails_clearly_and_applies_nothing(
    empty_database_url: str, tmp_path: Path
) -> None:
    conn, directory, result = await _migrate_into_a_deadlock(
        empty_database_url, tmp_path, attempts=1
    )
    try:
        last = max(m.version for m in migrate.discover())
        assert isinstance(result, MigrationBlocked)
        assert f"{last + 1:04d}_jobs_then_outbox: tried once, the last time a deadlock's" in str(
            result
        )
        pending = (await migrate.status(conn, directory=directory)).pending
        assert [m.version for m in pending] == [last + 1]
    finally:
        await conn.close()
