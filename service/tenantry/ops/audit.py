"""The audit trail: who did what, with which filter, to how many rows.  Each action is
an outbox event of the system tenant, written in the action's own transaction (recorded
if and only if the action commits), and a log line once it has committed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import asyncpg

from .. import logging as log
from ..db import Conn
from ..sql import queries_for

Q = queries_for(__file__)
_log = log.get("audit")


Change = Callable[[Conn], Awaitable[int]]
Isolation = Literal["read_committed", "repeatable_read"]


async def act(
    pool: asyncpg.Pool,
    actor: str,
    action: str,
    detail: dict[str, Any],
    change: Change,
    *,
    isolation: Isolation = "read_committed",
) -> int:
    """Run `change` (which returns how many rows it changed) and record it, in one
    transaction; log it once committed.  Returns the count."""
    async with pool.acquire() as conn:
        return await act_on(conn, actor, action, detail, change, isolation=isolation)


async def act_on(
    conn: Conn,
    actor: str,
    action: str,
    detail: dict[str, Any],
    change: Change,
    *,
    isolation: Isolation = "read_committed",
) -> int:
    """`act` on a connection of the caller's."""
    async with conn.transaction(isolation=isolation):
        rows = await change(conn)
        await conn.execute(Q["audit"], actor, action, detail, rows)
    _log.info("operator_action", operator=actor, action=action, detail=detail, rows=rows)
    return rows


async def page(conn: Conn, before: int | None, limit: int) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(Q["audit_page"], before, limit)]
