"""The logins the service runs as.

Two logins: DATABASE_URL's, for everything tenant code does (`tenantry_service`:
tenant tables under row-level security), and the worker's (TENANTRY_WORKER_URL), for
the cross-tenant functions (`tenantry_worker`, `tenantry_operator`).  `tenantry migrate`
(on TENANTRY_ADMIN_URL) creates them if missing; the service refuses to start if
either could bypass row-level security or holds the other's roles.

A third login, the autoscaler's (TENANTRY_METRICS_URL, `tenantry_metrics`), may only
count the work waiting (tenantry.worker_demand); `tenantry migrate` creates it when
set, and refuses it by the same checks.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from . import logging as log
from .db import Conn
from .errors import ConfigError, InsecureRole
from .sql import queries_for

Q = queries_for(__file__, "roles.sql")

SERVICE_ROLES = ("tenantry_service",)
WORKER_ROLES = ("tenantry_worker", "tenantry_operator")
# An autoscaler's login (TENANTRY_METRICS_URL): tenantry.worker_demand and nothing else.
METRICS_ROLES = ("tenantry_metrics",)
# The login the embedded default creates for itself; the worker's adds WORKER_SUFFIX.
DEFAULT_LOGIN = "tenantry_app"
WORKER_SUFFIX = "_worker"


@dataclass(frozen=True)
class Login:
    user: str
    password: str | None


def login_of(url: str) -> Login:
    """The user and password a connection URL logs in with, where libpq looks for
    them: the URL, its `user`/`password` parameters, PGUSER/PGPASSWORD, and the
    operating-system user.  (A password only in ~/.pgpass is not seen: the login is
    then created without one, and connecting fails with a clear error.)"""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    user = (
        unquote(parts.username or "")
        or (query.get("user") or [""])[0]
        or os.environ.get("PGUSER", "")
        or getpass.getuser()
    )
    password = (
        unquote(parts.password or "")
        or (query.get("password") or [""])[0]
        or os.environ.get("PGPASSWORD", "")
    )
    return Login(user, password or None)


def with_login(url: str, user: str, password: str | None = None) -> str:
    """The same URL logging in as another user."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    cred = quote(user, safe="")
    if password is not None:
        cred += ":" + quote(password, safe="")
    pairs = parse_qsl(parts.query)
    query = parts.query
    if any(k in ("user", "password") for k, _ in pairs):
        query = urlencode([(k, v) for k, v in pairs if k not in ("user", "password")])
    return urlunsplit(parts._replace(netloc=f"{cred}@{host}", query=query))


def worker_url_for(service_url: str) -> str:
    """The worker's login by default: the service's name plus WORKER_SUFFIX, with the
    same password."""
    login = login_of(service_url)
    return with_login(service_url, login.user + WORKER_SUFFIX, login.password)


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """A SCRAM-SHA-256 verifier (RFC 5802/7677, PostgreSQL's stored form), so that
    the password itself never travels to the server or into its logs."""
    salt = salt or os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


async def login_exists(admin: Conn, user: str) -> bool:
    return bool(await admin.fetchval(Q["role_exists"], user))


async def other_tenantry_roles(admin: Conn, user: str, allowed: Sequence[str]) -> list[str]:
    """The tenantry roles outside `allowed` that `user` holds (none if it is missing)."""
    return list(await admin.fetchval(Q["other_tenantry_roles"], user, list(allowed)))


async def ensure_login(admin: Conn, login: Login, grants: Sequence[str]) -> bool:
    """Create a login role if missing (NOSUPERUSER, NOBYPASSRLS, NOCREATEROLE) and
    grant it `grants`.  An existing role is left as it is, apart from the grants: the
    startup check refuses it if it is unsafe.  True if this call created it."""
    created = False
    if not await admin.fetchval(Q["role_exists"], login.user):
        if login.password is not None and not login.password.isascii():
            # The verifier is computed here without SASLprep normalisation, which
            # only ASCII passwords are certain not to need.
            raise ConfigError(
                f"the password of login {login.user!r} is not ASCII: create the role"
                " yourself, or choose an ASCII password"
            )
        verifier = scram_verifier(login.password) if login.password else None
        try:
            await admin.execute(await admin.fetchval(Q["create_login"], login.user, verifier))
            created = True
            log.get("roles").info("login_role_created", role=login.user)
        except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
            pass  # another process created it a moment ago
    await admin.execute(await admin.fetchval(Q["grant_roles"], login.user, list(grants)))
    return created


async def check_login(conn: Conn, variable: str, allowed: Sequence[str]) -> None:
    """Refuse a login (named by the environment `variable` it came from) that could
    bypass row-level security or reach roles other than `allowed`."""
    row = await conn.fetchrow(Q["login_risks"], list(allowed))
    assert row is not None
    name = row["login"]
    reasons = []
    if row["acting_as"] != name:
        reasons.append(f'switches to role "{row["acting_as"]}" (RESET ROLE would undo it)')
    if row["superuser"]:
        reasons.append("is a superuser")
    if row["bypassrls"]:
        reasons.append("has BYPASSRLS")
    if row["createrole"]:
        reasons.append("has CREATEROLE")
    if row["owner"]:
        reasons.append("owns the tenantry schema or its tables")
    if row["can_become"]:
        reasons.append("can SET ROLE to " + ", ".join(row["can_become"]))
    if reasons:
        raise InsecureRole(
            f'{variable} logs in as role "{name}", which {" and ".join(reasons)}: '
            "it could reach other tenants' rows past row-level security. "
            "Keep an administrator's URL as TENANTRY_ADMIN_URL (used only to migrate) and "
            f"point {variable} at a login that is NOSUPERUSER, NOBYPASSRLS, NOCREATEROLE, "
            f"not the owner, and a member of {', '.join(allowed)} only, for example "
            f"postgresql://{DEFAULT_LOGIN}:PASSWORD@HOST/DB for DATABASE_URL (its worker "
            f"login is then {DEFAULT_LOGIN}{WORKER_SUFFIX}); `tenantry migrate` creates "
            "both logins"
        )


async def check_reaches_no_table(conn: Conn, variable: str) -> None:
    """Refuse a login (named by `variable`) meant to read nothing but through a function
    (the metrics login) that can read or write a table, view or sequence of the schema:
    by a grant of its own or PostgreSQL's pg_read_all_data / pg_write_all_data."""
    names = [r["name"] for r in await conn.fetch(Q["reachable_relations"])]
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise InsecureRole(
            f"{variable} logs in as a role that can read or write {shown}: it should"
            " reach no table of the schema (only the function it is granted). Revoke"
            " those grants, or point it at a login of its own; `tenantry migrate` creates"
            " one when the role does not exist"
        )
