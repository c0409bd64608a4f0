"""Connections: the pool for tenant and worker work, and single connections for the
listener and the migrator (which must never come from the pool)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

Pool = asyncpg.Pool
# A connection of our own or one borrowed from the pool: both run queries alike.
Conn = asyncpg.Connection | PoolConnectionProxy
# Anything that can run a single statement (a pool borrows a connection for it).
Executor = asyncpg.Connection | PoolConnectionProxy | asyncpg.Pool


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def init_connection(conn: Conn) -> None:
    """jsonb and json as Python values, through orjson, on every connection."""
    for typename in ("jsonb", "json"):
        await conn.set_type_codec(
            typename, schema="pg_catalog", encoder=_dumps, decoder=orjson.loads, format="text"
        )


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(dsn, **kwargs)
    await init_connection(conn)
    return conn


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init_connection,
        # The pool resets connections on release (RESET ALL, UNLISTEN, ...), so a tenant
        # context set with is_local=true can never outlive its transaction anyway.
        server_settings={"application_name": "tenantry"},
    )
    assert pool is not None
    return pool


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced, for messages and logs."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "[unparseable dsn]"
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
