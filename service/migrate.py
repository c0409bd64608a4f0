"""Forward-only numbered migrations from `schema/`, applied under an advisory lock.

Each migration runs in its own transaction that records it (version, name, checksum)
before running its SQL, so a failed migration leaves no trace and two migrators at
once are serialised by the lock.  An applied migration whose file changed afterwards
is refused: the database would no longer be what the files say.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from . import logging as log
from .db import Conn
from .errors import SchemaMismatch

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"
# pg_advisory_lock(classid, objid): a two-key namespace of our own, so the
# application's single-key advisory locks can never collide with ours.
LOCK_CLASS = 0x7E4A
LOCK_MIGRATE = 1

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS tenantry;
CREATE TABLE IF NOT EXISTS tenantry.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class Status:
    pending: list[Migration]
    unknown: list[int]  # applied in the database, absent from the code
    edited: list[int]  # applied, but the file's checksum differs

    @property
    def current(self) -> bool:
        return not (self.pending or self.unknown or self.edited)

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
        return "; ".join(parts)


def discover(directory: Path = SCHEMA_DIR) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise SchemaMismatch(f"{path.name}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise SchemaMismatch("two migration files share a version number")
    return found


async def _applied(conn: Conn) -> dict[int, str]:
    exists = await conn.fetchval("SELECT to_regclass('tenantry.schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM tenantry.schema_migrations")
    return {r["version"]: r["checksum"] for r in rows}


def _compare(migrations: list[Migration], applied: dict[int, str]) -> Status:
    known = {m.version: m for m in migrations}
    return Status(
        pending=[m for m in migrations if m.version not in applied],
        unknown=sorted(v for v in applied if v not in known),
        edited=sorted(v for v, c in applied.items() if v in known and known[v].checksum != c),
    )


async def status(conn: Conn, directory: Path = SCHEMA_DIR) -> Status:
    return _compare(discover(directory), await _applied(conn))


async def migrate(conn: Conn, directory: Path = SCHEMA_DIR) -> list[Migration]:
    """Apply pending migrations; return those applied by this call."""
    logger = log.get("migrate")
    migrations = discover(directory)
    await conn.execute("SELECT pg_advisory_lock($1, $2)", LOCK_CLASS, LOCK_MIGRATE)
    try:
        await conn.execute(_BOOTSTRAP)
        st = _compare(migrations, await _applied(conn))
        if st.unknown or st.edited:
            raise SchemaMismatch(st.describe())
        done: list[Migration] = []
        for m in st.pending:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO tenantry.schema_migrations (version, name, checksum)"
                    " VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
                await conn.execute(m.sql)
            logger.info("migration_applied", version=m.version, name=m.name)
            done.append(m)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_CLASS, LOCK_MIGRATE)
