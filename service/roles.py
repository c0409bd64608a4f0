"""The login the service runs as.

`tenantry migrate` (on TENANTRY_ADMIN_URL) creates the login role named in
DATABASE_URL if it is missing and grants it `tenantry_service`; the service refuses
to start if its login could bypass row-level security.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

from . import logging as log
from .db import Conn
from .errors import InsecureRole
from .sql import queries_for

Q = queries_for(__file__, "roles.sql")

SERVICE_ROLE = "tenantry_service"
# The login the embedded default creates for itself.
DEFAULT_LOGIN = "tenantry_app"


@dataclass(frozen=True)
class Login:
    user: str
    password: str | None


def login_of(url: str) -> Login:
    """The user and password a connection URL logs in with (libpq's default user is
    the operating-system user)."""
    parts = urlsplit(url)
    user = unquote(parts.username) if parts.username else os.environ.get("PGUSER") or ""
    if not user:
        user = getpass.getuser()
    password = unquote(parts.password) if parts.password else None
    return Login(user, password)


def with_login(url: str, user: str, password: str | None = None) -> str:
    """The same URL logging in as another user."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    cred = user if password is None else f"{user}:{password}"
    return urlunsplit(parts._replace(netloc=f"{cred}@{host}"))


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


async def ensure_login(admin: Conn, login: Login) -> bool:
    """Create the service's login role if missing (NOSUPERUSER, NOBYPASSRLS) and grant
    it the service's privileges.  An existing role is left as it is, apart from the
    grant: the startup check refuses it if it is unsafe.  True if created."""
    created = False
    if not await admin.fetchval(Q["role_exists"], login.user):
        verifier = scram_verifier(login.password) if login.password else None
        await admin.execute(await admin.fetchval(Q["create_login"], login.user, verifier))
        created = True
        log.get("roles").info("login_role_created", role=login.user)
    await admin.execute(await admin.fetchval(Q["grant_service"], login.user))
    return created


async def check_login(conn: Conn) -> None:
    """Refuse a login that could bypass row-level security."""
    row = await conn.fetchrow(Q["login_risks"])
    assert row is not None
    name = row["login"]
    reasons = []
    if row["superuser"]:
        reasons.append("is a superuser")
    if row["bypassrls"]:
        reasons.append("has BYPASSRLS")
    if row["owner"]:
        reasons.append("owns the tenantry schema or its tables")
    if row["can_become"]:
        reasons.append("can SET ROLE to " + ", ".join(row["can_become"]))
    if reasons:
        raise InsecureRole(
            f'DATABASE_URL logs in as role "{name}", which {" and ".join(reasons)}: '
            "it could read and write every tenant's rows past row-level security. "
            "Keep that URL as TENANTRY_ADMIN_URL (used only to migrate) and point "
            "DATABASE_URL at a login that is NOSUPERUSER, NOBYPASSRLS and not the owner, "
            f"for example postgresql://{DEFAULT_LOGIN}:PASSWORD@HOST/DB; "
            "`tenantry migrate` creates that role and grants it tenantry_service"
        )
