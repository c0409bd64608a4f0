"""Migrations: forward-only numbered ones from `schema/`, then repeatable ones.

Numbered migrations (`schema/NNNN_name.sql`) hold the tables, types and indexes.  Each
runs in its own transaction that records it (version, name, checksum) before running
its SQL, so a failed migration leaves no trace and two migrators at once are
serialised by the advisory lock.  An applied migration whose file changed afterwards
is refused: the database would no longer be what the files say.

Repeatable migrations are the functions and triggers, kept in a `functions.sql` next to
the module that owns them (the claim beside the worker), so that a statement is read
and changed in one place.  Like Flyway's repeatable migrations, each file is applied
again, after the numbered ones, when it changed.  Each file starts with `-- version: N`,
raised with every change: a database holding a higher version than the code's is
ahead (older code never overwrites newer functions, as two versions running side by
side in a rolling deploy would otherwise take turns doing), and the same version with
another checksum is an edit that forgot to raise it.  Such a file must be re-runnable:
CREATE OR REPLACE, and triggers through `tenantry.ensure_trigger`, which touches a
trigger (and locks its table) only when its definition changed.  A function whose
signature changes is dropped in the file itself, just before it is created again, and
only if it still has its old signature (CREATE OR REPLACE cannot change a signature),
so the change is one transaction.

Each migration's transaction waits at most `lock_timeout` for a lock: a statement
queued behind a long transaction for a table's lock holds up every later query of
that table meanwhile, so it gives up, waits and tries again, `attempts` times, then
fails with MigrationBlocked (nothing applied).  A migration that PostgreSQL chose as
the victim of a deadlock (one that locks two tables, while a transaction of the
service holds the second and asks for the first) is rolled back whole, so it is
tried again the same way.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import asyncpg

from . import logging as log
from .db import Conn
from .errors import MigrationBlocked, SchemaMismatch

_PACKAGE = Path(__file__).resolve().parent
# The numbered migrations: the top-level schema/ folder, installed as the package
# `tenantry.schema` (pyproject.toml), so that a wheel carries them.
SCHEMA_DIR = Path(str(importlib.resources.files("tenantry.schema")))
# Applied in this order (a later file may use an earlier one's functions).
REPEATABLE_FILES: tuple[Path, ...] = (
    _PACKAGE / "jobs" / "functions.sql",
    _PACKAGE / "outbox" / "functions.sql",
    _PACKAGE / "onboarding" / "functions.sql",
    _PACKAGE / "tenants" / "functions.sql",
    _PACKAGE / "webhooks" / "functions.sql",
    _PACKAGE / "ops" / "functions.sql",
    _PACKAGE / "analytics" / "functions.sql",
)
# pg_advisory_lock(classid, objid): a two-key namespace of our own, so the
# application's single-key advisory locks can never collide with ours.
LOCK_CLASS = 0x7E4A
LOCK_MIGRATE = 1

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_VERSION = re.compile(r"\A-- version: (\d+)\n")

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS tenantry;
CREATE TABLE IF NOT EXISTS tenantry.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


def _checksum(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return _checksum(self.sql)


@dataclass(frozen=True)
class Repeatable:
    """A functions file, named by the module that owns it (`jobs`, `outbox`, ...)."""

    name: str
    version: int
    sql: str

    @property
    def checksum(self) -> str:
        return _checksum(self.sql)


@dataclass(frozen=True)
class Status:
    pending: list[Migration]
    unknown: list[int]  # applied in the database, absent from the code
    edited: list[int]  # applied, but the file's checksum differs
    # Repeatable files the database holds an older version of (or none): `migrate`
    # applies them.
    stale: list[str] = field(default_factory=list)
    # Repeatable files the database holds a newer version of (newer code migrated), or
    # the same version with other contents (an edit that did not raise the version).
    files_ahead: list[str] = field(default_factory=list)
    files_edited: list[str] = field(default_factory=list)

    @property
    def current(self) -> bool:
        return not (self.behind or self.unknown or self.edited or self.files_ahead)

    @property
    def behind(self) -> bool:
        """Something of this code's is not applied (a process running it would call
        tables or functions that are not there)."""
        return bool(self.pending or self.stale or self.files_edited)

    def describe(self) -> str:
        if self.current:
            return "schema is current"
        parts = []
        if self.pending:
            parts.append(
                "behind: pending " + ", ".join(f"{m.version:04d}_{m.name}" for m in self.pending)
            )
        if self.unknown:
            parts.append(
                "ahead: the database has migrations this code does not know: "
                + ", ".join(f"{v:04d}" for v in self.unknown)
                + " (deploy newer code)"
            )
        if self.edited:
            parts.append(
                "edited after being applied: "
                + ", ".join(f"{v:04d}" for v in self.edited)
                + " (restore the file; add a new migration instead)"
            )
        if self.stale:
            parts.append(
                "functions older than this code's: "
                + ", ".join(self.stale)
                + " (run `tenantry migrate` with this version)"
            )
        if self.files_ahead:
            parts.append(
                "ahead: the database has newer functions than this code's: "
                + ", ".join(self.files_ahead)
                + " (deploy newer code)"
            )
        if self.files_edited:
            parts.append(
                "functions changed without a new version: "
                + ", ".join(self.files_edited)
                + " (raise the `-- version:` line of the file)"
            )
        return "; ".join(parts)


def discover(directory: Path = SCHEMA_DIR) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise SchemaMismatch(f"{path.name}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    if not found:
        # An install without them would take any database, an empty one too, as current.
        raise SchemaMismatch(f"no migrations in {directory}: this installation is incomplete")
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise SchemaMismatch("two migration files share a version number")
    return found


def repeatables(files: Sequence[Path] = REPEATABLE_FILES) -> list[Repeatable]:
    """The repeatable files, each named after the folder (module) that holds it."""
    found = []
    for path in files:
        sql = path.read_text(encoding="utf-8")
        version = _VERSION.match(sql)
        if version is None:
            raise SchemaMismatch(f"{path}: a functions file starts with `-- version: N`")
        found.append(Repeatable(path.parent.name, int(version[1]), sql))
    return found


async def _applied(conn: Conn) -> dict[int, str]:
    exists = await conn.fetchval("SELECT to_regclass('tenantry.schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM tenantry.schema_migrations")
    return {r["version"]: r["checksum"] for r in rows}


async def _applied_repeatables(conn: Conn) -> dict[str, tuple[int, str]]:
    exists = await conn.fetchval("SELECT to_regclass('tenantry.schema_repeatables') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT name, version, checksum FROM tenantry.schema_repeatables")
    return {r["name"]: (r["version"], r["checksum"]) for r in rows}


def _compare(
    migrations: list[Migration],
    applied: dict[int, str],
    files: list[Repeatable],
    applied_files: dict[str, tuple[int, str]],
) -> Status:
    known = {m.version: m for m in migrations}
    held = {r.name: applied_files.get(r.name, (0, "")) for r in files}
    return Status(
        pending=[m for m in migrations if m.version not in applied],
        unknown=sorted(v for v in applied if v not in known),
        edited=sorted(v for v, c in applied.items() if v in known and known[v].checksum != c),
        stale=[r.name for r in files if held[r.name][0] < r.version],
        files_ahead=[r.name for r in files if held[r.name][0] > r.version],
        files_edited=[
            r.name
            for r in files
            if held[r.name] != (r.version, r.checksum) and held[r.name][0] == r.version
        ],
    )


async def status(
    conn: Conn, directory: Path = SCHEMA_DIR, files: Sequence[Path] = REPEATABLE_FILES
) -> Status:
    applied, applied_files = await _applied(conn), await _applied_repeatables(conn)
    return _compare(discover(directory), applied, repeatables(files), applied_files)


async def _in_transaction(
    conn: Conn,
    what: str,
    work: Callable[[], Awaitable[None]],
    *,
    lock_timeout: float,
    attempts: int,
) -> None:
    """Run `work` in a transaction whose lock waits are bounded, again after a pause
    when a lock was not granted in time or the transaction was a deadlock's victim
    (either way it was rolled back whole)."""
    logger = log.get("migrate")
    deadlock = False
    for attempt in range(1, attempts + 1):
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT set_config('lock_timeout', $1, true)", f"{int(lock_timeout * 1000)}ms"
                )
                await work()
            return
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
            deadlock = isinstance(exc, asyncpg.DeadlockDetectedError)
            if attempt == attempts:
                break
            pause = min(lock_timeout, 5.0) * (0.5 + random.random())
            logger.warning(
                "migration_lock_wait",
                migration=what,
                attempt=attempt,
                reason="deadlock" if deadlock else "lock_timeout",
                retry_in_s=round(pause, 3),
            )
            await anyio.sleep(pause)
    if deadlock:  # the last attempt's
        times = "once" if attempts == 1 else f"{attempts} times"
        why = f"tried {times}, the last time a deadlock's victim: it locks tables in"
        why += " another order than a transaction running meanwhile (see pg_stat_activity)"
    else:
        why = f"a lock was not granted within {lock_timeout:g}s, {attempts} times: a long"
        why += " transaction holds the table (see pg_stat_activity)"
    raise MigrationBlocked(
        f"{what}: {why}; nothing of it was applied, run `tenantry migrate` again"
    )


async def migrate(
    conn: Conn,
    directory: Path = SCHEMA_DIR,
    files: Sequence[Path] = REPEATABLE_FILES,
    *,
    lock_timeout: float = 5.0,
    attempts: int = 6,
) -> list[Migration | Repeatable]:
    """Apply pending numbered migrations, then the repeatable files that changed;
    return what this call applied."""
    logger = log.get("migrate")
    migrations = discover(directory)
    functions = repeatables(files)
    await conn.execute("SELECT pg_advisory_lock($1, $2)", LOCK_CLASS, LOCK_MIGRATE)
    try:
        await conn.execute(_BOOTSTRAP)
        st = _compare(migrations, await _applied(conn), functions, await _applied_repeatables(conn))
        if st.unknown or st.edited or st.files_ahead or st.files_edited:
            raise SchemaMismatch(st.describe())
        done: list[Migration | Repeatable] = []
        for m in st.pending:

            async def apply_numbered(m: Migration = m) -> None:
                await conn.execute(
                    "INSERT INTO tenantry.schema_migrations (version, name, checksum)"
                    " VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
                await conn.execute(m.sql)

            await _in_transaction(
                conn,
                f"{m.version:04d}_{m.name}",
                apply_numbered,
                lock_timeout=lock_timeout,
                attempts=attempts,
            )
            logger.info("migration_applied", version=m.version, name=m.name)
            done.append(m)
        stale = set(st.stale)
        for r in functions:
            if r.name not in stale:
                continue

            async def apply_repeatable(r: Repeatable = r) -> None:
                await conn.execute(r.sql)
                await conn.execute(
                    "INSERT INTO tenantry.schema_repeatables (name, version, checksum)"
                    " VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE"
                    " SET version = excluded.version, checksum = excluded.checksum,"
                    " applied_at = now()",
                    r.name,
                    r.version,
                    r.checksum,
                )

            await _in_transaction(
                conn,
                f"{r.name} functions",
                apply_repeatable,
                lock_timeout=lock_timeout,
                attempts=attempts,
            )
            logger.info("functions_applied", name=r.name, checksum=r.checksum[:12])
            done.append(r)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_CLASS, LOCK_MIGRATE)
