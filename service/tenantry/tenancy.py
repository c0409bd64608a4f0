"""Tenant context: a transaction in which `app.tenant_id` names one tenant.

The setting is transaction-local (`set_config(..., true)`), so it dies with the
transaction and can never leak to the next user of a pooled connection.  BEGIN and
set_config travel in one simple-protocol message: one round trip instead of two.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from .db import Conn, Executor
from .errors import Invalid, TenantContextError

# The system tenant: work that belongs to no tenant (periodic jobs by default).  The
# nil UUID, which no tenant can have (tenants_not_system).
SYSTEM_TENANT = uuid.UUID(int=0)


def parse_tenant_id(value: object) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        raise Invalid("tenant_id", "must be a UUID string")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise Invalid("tenant_id", f"{value[:40]!r} is not a UUID") from None


# The tenant of each connection inside `tenant_tx_on`, so that an operation joining
# that transaction (`tenant_scope`) can check its tenant without a round trip.
_OPEN: dict[int, uuid.UUID] = {}


@asynccontextmanager
async def tenant_tx_on(conn: Conn, tenant_id: object) -> AsyncIterator[Conn]:
    """A transaction on `conn` in `tenant_id`'s context: row-level security shows and
    accepts that tenant's rows only.  Commits when the block ends, rolls back when it
    raises."""
    tid = parse_tenant_id(tenant_id)
    # str(UUID) is canonical hex and dashes: safe to inline, and inlining is what lets
    # BEGIN and set_config share one message.
    await conn.execute(f"BEGIN; SELECT set_config('app.tenant_id', '{tid}', true)")
    _OPEN[id(conn)] = tid
    try:
        yield conn
    except BaseException:
        await _rollback_quietly(conn)
        raise
    else:
        await conn.execute("COMMIT")
    finally:
        _OPEN.pop(id(conn), None)


async def _rollback_quietly(conn: Conn) -> None:
    """Roll back after an error without hiding it: the connection may be broken (its
    backend terminated), or a pool's proxy already detached from it, and then asking it
    anything raises an error of its own that would replace the one that matters.  A
    connection that cannot roll back is closed by its pool; the server rolls back."""
    try:
        if not conn.is_closed():
            await conn.execute("ROLLBACK")
    except Exception:
        pass  # the original error is the one to report


@asynccontextmanager
async def tenant_tx(pool: asyncpg.Pool, tenant_id: object) -> AsyncIterator[Conn]:
    """A connection from `pool` in a transaction in `tenant_id`'s context (see
    `tenant_tx_on`): `async with tenant_tx(pool, tenant) as conn: ...`."""
    tid = parse_tenant_id(tenant_id)
    async with pool.acquire() as conn, tenant_tx_on(conn, tid) as tx:
        yield tx


@asynccontextmanager
async def tenant_scope(executor: Executor, tenant_id: object) -> AsyncIterator[Conn]:
    """The tenant's context for one operation.  A connection already in a transaction
    joins it, after checking that the transaction is this tenant's (a mismatch is a
    caller's bug: better an error than rows that silently are not there).  A pool, or
    an idle connection, gets a tenant transaction of its own."""
    tid = parse_tenant_id(tenant_id)
    if isinstance(executor, asyncpg.Pool):
        async with tenant_tx(executor, tid) as tx:
            yield tx
    elif executor.is_in_transaction():
        known = _OPEN.get(id(executor))
        current = (
            str(known)
            if known is not None
            # A transaction the caller opened itself: ask the server.
            else await executor.fetchval("SELECT current_setting('app.tenant_id', true)")
        )
        if current != str(tid):
            raise TenantContextError(
                f"the open transaction is in tenant context {current or '(none)'!r},"
                f" not {str(tid)!r}: open it with tenant_tx for this tenant"
            )
        yield executor
    else:
        async with tenant_tx_on(executor, tid) as tx:
            yield tx
