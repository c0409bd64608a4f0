"""A cheap fingerprint of everything the service stores: for each table of the schema
`tenantry`, its row count and the newest `xmin` (the transaction that last inserted or
updated one of its rows).  Any insert or update moves a table's newest `xmin`, any
delete its count (an insert and a delete in one transaction move the `xmin`), so two
equal fingerprints mean nothing was written in between."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg

Fingerprint = dict[str, tuple[int, int]]
T = TypeVar("T")

_TABLES = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'tenantry' AND c.relkind IN ('r', 'p') ORDER BY c.relname
"""


async def query(conn: asyncpg.Connection) -> str:
    """One statement reading every table's fingerprint."""
    tables = [r["relname"] for r in await conn.fetch(_TABLES)]
    return " UNION ALL ".join(
        f"SELECT '{t}' AS t, count(*) AS n, coalesce(max(xmin::text::bigint), 0) AS x"
        f" FROM tenantry.{t}"
        for t in tables
    )


async def fingerprint(conn: asyncpg.Connection, statement: str) -> Fingerprint:
    """Read as a superuser (row-level security would hide other tenants' rows)."""
    return {r["t"]: (r["n"], r["x"]) for r in await conn.fetch(statement)}


def changed(before: Fingerprint, after: Fingerprint) -> list[str]:
    """The tables written between the two fingerprints."""
    return sorted(t for t in before.keys() | after.keys() if before.get(t) != after.get(t))


class Fingerprinter:
    """`fingerprint()` for synchronous callers (Schemathesis' hooks): one connection on
    an event loop of its own, in a thread of its own."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="fingerprint").start()
        self._conn: asyncpg.Connection = self._run(asyncpg.connect(url))
        self._statement = self._run(query(self._conn))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def fingerprint(self) -> Fingerprint:
        return self._run(fingerprint(self._conn, self._statement))
