"""Connections: the pool for tenant and worker work, and single connections for the
listener and the migrator (which must never come from the pool)."""

from __future__ import annotations

import socket
import weakref
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import asyncpg.exceptions
import orjson
from asyncpg.pool import PoolConnectionProxy

Pool = asyncpg.Pool
# A connection of our own or one borrowed from the pool: both run queries alike.
Conn = asyncpg.Connection | PoolConnectionProxy
# Anything that can run a single statement (a pool borrows a connection for it).
Executor = asyncpg.Connection | PoolConnectionProxy | asyncpg.Pool


# The database is unreachable, restarting, or a connection broke: what a restart
# (AdminShutdown, CannotConnectNow), a terminated backend (ConnectionDoesNotExist,
# InternalClientError on a pooled connection), a network partition (OSError, timeouts)
# or a lock or statement timeout raise.  Callers retry these later; the HTTP edge
# answers 503.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.LockNotAvailableError,
)

# Server side: the server probes an idle client, so a vanished client is noticed; and
# while it runs a statement it checks every second that the client is still there
# (client_connection_check_interval, PostgreSQL 14+, in milliseconds), so the statement
# of a process that died (kill -9) is cancelled rather than run to its end.  That
# matters for a statement that is its own transaction (provisioning's group of steps,
# the accept): left to finish, it would commit without anyone to answer; cancelled, the
# next run does it again.  Either leaves the onboarding whole; this way a dead process
# also holds no lock for longer than a second.
_SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "client_connection_check_interval": "1000",
}
# Client side (Linux): a vanished server is noticed within about 25 s when idle, and a
# request that the server never acknowledges fails after 30 s, instead of waiting
# forever for an answer over a partitioned network.
_CLIENT_KEEPALIVES = (
    ("TCP_KEEPIDLE", 10),
    ("TCP_KEEPINTVL", 5),
    ("TCP_KEEPCNT", 3),
    ("TCP_USER_TIMEOUT", 30_000),
)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _keepalive(conn: Conn) -> None:
    # asyncpg keeps its transport private; the pool's init hands over the connection
    # itself, not a proxy.
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket: nothing in between to partition
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _CLIENT_KEEPALIVES:
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


async def init_connection(conn: Conn) -> None:
    """jsonb and json as Python values, through orjson, and TCP keepalives, on every
    connection."""
    for typename in ("jsonb", "json"):
        await conn.set_type_codec(
            typename, schema="pg_catalog", encoder=_dumps, decoder=orjson.loads, format="text"
        )
    _keepalive(conn)


# A transaction-mode pooler (PgBouncer pool_mode=transaction) hands each transaction of
# a client to whichever server connection is free: a named prepared statement made on
# one is missing on the next, so asyncpg's statement cache is off (unnamed statements
# only), and the startup packet may carry only what the pooler tracks per client
# itself (PgBouncer refuses the others: "unsupported startup parameter").  The session
# settings dropped here (keepalives, timeouts, the claim's plan and commit settings) can
# be set on the login roles instead (README, connection poolers).
_POOLER_STARTUP_PARAMETERS = frozenset({"application_name"})


def _connect_options(server_settings: dict[str, str], pooled: bool) -> dict[str, Any]:
    if not pooled:
        return {"server_settings": server_settings}
    kept = {k: v for k, v in server_settings.items() if k in _POOLER_STARTUP_PARAMETERS}
    return {"server_settings": kept, "statement_cache_size": 0}


async def connect(dsn: str, *, pooled: bool = False, **kwargs: Any) -> asyncpg.Connection:
    """One connection; `pooled`: through a transaction-mode pooler."""
    settings = {**_SERVER_KEEPALIVES, **kwargs.pop("server_settings", {})}
    conn: asyncpg.Connection = await asyncpg.connect(
        dsn, **kwargs, **_connect_options(settings, pooled)
    )
    await init_connection(conn)
    return conn


# The worker's own statements (claims, outcomes, rescue, the hub's reads) never wait on
# a lock for long: a claim stuck behind a migration's or VACUUM FULL's lock fails after
# 5 s and is tried again later, rather than hold a connection and the shutdown.
WORKER_TIMEOUTS = {"lock_timeout": "5s", "statement_timeout": "60s"}
# The dashboard's statements: a page is a few bounded reads; one that takes longer than
# this is refused, not waited for.
OPS_TIMEOUTS = {"lock_timeout": "2s", "statement_timeout": "10s"}


async def create_ops_pool(dsn: str, *, pooled: bool = False) -> asyncpg.Pool:
    """The dashboard's connections (the worker's login, for the operators' functions):
    a pool of their own, so that however many pages are open, the worker's polls, its
    rescues and the metrics' readings never wait behind one."""
    return await create_pool(
        dsn, min_size=0, max_size=2, settings=OPS_TIMEOUTS, name="tenantry-ops", pooled=pooled
    )


# The worker's claims and heartbeats run on connections of their own with these settings.
# - synchronous_commit off: a claim or a lease extension lost in a server crash is
#   harmless (the row is simply still queued, or its lease shorter), and it saves a WAL
#   flush per claim.  Completions stay synchronous on the main pool.
# - force_generic_plan: planning the fair claim (a recursive walk and a lateral fetch
#   per tenant) costs more than running it.  Per claim of 30 rows from a 50,000-job
#   backlog, custom plans took 1.6 / 2.2 / 3.1 ms for 1 / 4 / 100 tenants, the generic
#   plan 1.4 / 1.4 / 1.9 ms.  Its shape does not depend on statistics (a test EXPLAINs
#   it under both kinds of plan, with statistics from an empty and a full queue).
CLAIM_SETTINGS = {
    "synchronous_commit": "off",
    "plan_cache_mode": "force_generic_plan",
    **WORKER_TIMEOUTS,
}


async def _keep_session(_conn: Any) -> None:
    """No server-side reset on release: for pools whose connections never change
    session state (the claim pool), it saves a round trip per claim."""


# Connections whose borrower ran nothing that can leave session state behind (see
# `leaves_no_session_state`): their release skips the reset's round trip, once.
_UNTOUCHED: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()


def leaves_no_session_state(conn: Conn) -> None:
    """Tell the pool that `conn` (borrowed) ran only statements that leave nothing in the
    session: each its own transaction (no BEGIN left open), settings transaction-local
    only, no LISTEN, cursor, advisory lock or prepared state of the caller's.  Its
    release then skips the reset (RESET ALL, UNLISTEN *, ...): one round trip fewer.
    Only for the statement just run: any other use of the connection before release
    must not follow the call."""
    # asyncpg's proxy keeps the connection private; the reset hook gets the connection.
    raw = getattr(conn, "_con", None) if isinstance(conn, PoolConnectionProxy) else conn
    if isinstance(raw, asyncpg.Connection) and not raw.is_in_transaction():
        _UNTOUCHED.add(raw)


async def _reset_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release (asyncpg's own, after it rolled back any open
    transaction), unless the borrower said there is nothing to reset."""
    if conn in _UNTOUCHED:
        _UNTOUCHED.discard(conn)
        return
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    settings: dict[str, str] | None = None,
    name: str = "tenantry",
    stateless: bool = False,
    pooled: bool = False,
    connect_timeout: float = 60.0,
) -> asyncpg.Pool:
    """`pooled`: `dsn` goes through a transaction-mode pooler.  `connect_timeout`:
    seconds a new connection may take (asyncpg's default)."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=connect_timeout,
        init=init_connection,
        reset=_keep_session if stateless else _reset_session,
        # The pool resets connections on release (RESET ALL, UNLISTEN, ...), so a tenant
        # context set with is_local=true can never outlive its transaction anyway (but
        # after a borrower that said there is nothing to reset: leaves_no_session_state).
        **_connect_options(
            {"application_name": name, **_SERVER_KEEPALIVES, **(settings or {})}, pooled
        ),
    )
    assert pool is not None
    return pool


async def create_claim_pool(dsn: str, *, pooled: bool = False) -> asyncpg.Pool:
    """The worker's claim and heartbeat connections: two, so that one queue's claim may
    overlap another's, or a heartbeat."""
    return await create_pool(
        dsn,
        min_size=1,
        max_size=2,
        settings=CLAIM_SETTINGS,
        name="tenantry-claim",
        stateless=True,
        pooled=pooled,
    )


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
