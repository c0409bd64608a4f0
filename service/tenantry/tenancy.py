"""Tenant context: a transaction in which `app.tenant_id` names one tenant.

The setting is transaction-local (`set_config(..., true)`, or `SET LOCAL` in the
`set_local` mode), so it dies with the transaction and can never leak to the next user
of a pooled connection.  BEGIN and the setting travel in one simple-protocol message:
one round trip instead of two.

Two ways to name the tenant (TENANTRY_TENANT_CONTEXT), the same to PostgreSQL:
- `set_config` (the default): `SELECT set_config('app.tenant_id', ..., true)`.
- `set_local`: `SET LOCAL app.tenant_id = ...`.  Citus propagates SET LOCAL to the
  worker nodes (with `citus.propagate_set_commands = 'local'`) but not set_config(), so
  a policy evaluated on a worker node would see no tenant (docs/scaling.md).
"""

from __future__ import annotations

import os
import re
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


TENANT_CONTEXT_MODES = ("set_config", "set_local")
# The process's mode (one per process: it follows the database it runs against); None
# until chosen: by use_tenant_context (the CLI, from its settings), or else from
# TENANTRY_TENANT_CONTEXT at the first tenant transaction (an application using the
# Python interface without the CLI, in the same deployment).
_context: dict[str, str | None] = {"mode": None}


def use_tenant_context(mode: str) -> None:
    """How this process names a transaction's tenant (TENANTRY_TENANT_CONTEXT): one of
    TENANT_CONTEXT_MODES.  A property of the deployment's database, the same for every
    connection of the process; set once at start."""
    if mode not in TENANT_CONTEXT_MODES:
        raise ValueError(f"must be one of {', '.join(TENANT_CONTEXT_MODES)}")
    _context["mode"] = mode


# Settings are inlined into the statement (so that BEGIN shares its message), which is
# safe only for names we write and values made of these characters: a UUID's or a
# digest's hex.
_SAFE_NAME = re.compile(r"app\.[a-z_]+")
_SAFE_VALUE = re.compile(r"[0-9a-f-]*")


def tenant_context_mode() -> str:
    """How this process names a transaction's tenant: one of TENANT_CONTEXT_MODES."""
    return _mode()


def _mode() -> str:
    mode = _context["mode"]
    if mode is None:
        raw = os.environ.get("TENANTRY_TENANT_CONTEXT") or "set_config"
        if raw not in TENANT_CONTEXT_MODES:
            raise ValueError(
                f"TENANTRY_TENANT_CONTEXT must be one of {', '.join(TENANT_CONTEXT_MODES)}"
            )
        _context["mode"] = mode = raw
    return mode


def _setting_sql(name: str, value: str) -> str:
    if not _SAFE_NAME.fullmatch(name) or not _SAFE_VALUE.fullmatch(value):
        raise ValueError(f"not a setting that can be inlined: {name}")
    if _mode() == "set_local":
        return f"SET LOCAL {name} = '{value}'"
    return f"SELECT set_config('{name}', '{value}', true)"


# The settings of a tenant transaction opened with index_plans: the planner may not
# choose a sequential scan where an index serves (README, "Plans that do not depend on
# statistics").  A connection keeps a prepared statement's plan until the table's
# statistics change; one made while a VACUUM or ANALYZE had last found the table empty
# scans it whole on every call through a burst, until autovacuum next analyzes it (the
# onboarding status read and the SSE replay: 2 ms a call at 20,000 rows against 0.2).
# Every tenant table leads its indexes with tenant_id, so in a tenant's transaction the
# service's statements always have one.  jit: before PostgreSQL 18 a scan the setting
# cannot avoid is costed at 10^10, past jit_above_cost.
_INDEX_PLANS = (("enable_seqscan", "off"), ("jit", "off"))


def _context_sql(tenant_id: uuid.UUID, index_plans: bool) -> str:
    """The statements that open a tenant transaction, one message: BEGIN, the tenant,
    and with `index_plans` the planner's settings, all transaction-local."""
    tenant = _setting_sql("app.tenant_id", str(tenant_id))
    if not index_plans:
        return f"BEGIN; {tenant}"
    if _mode() == "set_local":
        plans = "; ".join(f"SET LOCAL {name} = {value}" for name, value in _INDEX_PLANS)
        return f"BEGIN; {tenant}; {plans}"
    plans = ", ".join(f"set_config('{name}', '{value}', true)" for name, value in _INDEX_PLANS)
    return f"BEGIN; {tenant}, {plans}"


async def set_transaction_setting(conn: Conn, name: str, value: str) -> None:
    """Set `name` (an `app.` setting) to `value` (hex digits and dashes) for the rest of
    the open transaction, the way the tenant context is set."""
    await conn.execute(_setting_sql(name, value))


# The tenant of each connection inside `tenant_tx_on`, so that an operation joining
# that transaction (`tenant_scope`) can check its tenant without a round trip.
_OPEN: dict[int, uuid.UUID] = {}


@asynccontextmanager
async def tenant_tx_on(
    conn: Conn, tenant_id: object, *, index_plans: bool = False
) -> AsyncIterator[Conn]:
    """A transaction on `conn` in `tenant_id`'s context: row-level security shows and
    accepts that tenant's rows only.  Commits when the block ends, rolls back when it
    raises.  `index_plans`: the statements planned in it never scan a table
    sequentially where an index serves (enable_seqscan and jit off, transaction-local),
    so that a plan the connection keeps does not depend on the tables' statistics: for
    statements that find a tenant's rows through an index leading with tenant_id."""
    tid = parse_tenant_id(tenant_id)
    # str(UUID) is canonical hex and dashes: safe to inline, and inlining is what lets
    # BEGIN and the settings share one message.
    await conn.execute(_context_sql(tid, index_plans))
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
async def tenant_tx(
    pool: asyncpg.Pool, tenant_id: object, *, index_plans: bool = False
) -> AsyncIterator[Conn]:
    """A connection from `pool` in a transaction in `tenant_id`'s context (see
    `tenant_tx_on`, and there `index_plans`): `async with tenant_tx(pool, tenant) as
    conn: ...`."""
    tid = parse_tenant_id(tenant_id)
    async with pool.acquire() as conn, tenant_tx_on(conn, tid, index_plans=index_plans) as tx:
        yield tx


@asynccontextmanager
async def tenant_scope(executor: Executor, tenant_id: object) -> AsyncIterator[Conn]:
    """The tenant's context for one operation.  A connection already in a transaction
    joins it, after checking that the transaction is this tenant's (a mismatch is a
    caller's bug: better an error than rows that silently are not there).  A pool, or
    an idle connection, gets a tenant transaction of its own, with `index_plans`: the
    service's own statements find a tenant's rows through its indexes."""
    tid = parse_tenant_id(tenant_id)
    if isinstance(executor, asyncpg.Pool):
        async with tenant_tx(executor, tid, index_plans=True) as tx:
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
        async with tenant_tx_on(executor, tid, index_plans=True) as tx:
            yield tx
