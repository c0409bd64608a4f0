"""Operators of the dashboard: accounts with a role (`read` or `admin`) and a key,
one-time sign-in links, and browser sessions.

Every secret (a key, a link's token, a session cookie) is 256 random bits shown once;
the database keeps only its SHA-256, so a copy of the database signs nobody in.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import asyncpg

from ..db import Executor
from ..errors import Conflict, Invalid, NotFound
from ..sql import queries_for

Q = queries_for(__file__)

ROLES = ("read", "admin")
KEY_PREFIX = "tok_"
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")
# How long a sign-in link and a session are good for.
LINK_TTL_S = 15 * 60
SESSION_TTL_S = 12 * 3600


@dataclass(frozen=True)
class Operator:
    name: str
    role: str
    # The session's CSRF token: every action of this session must carry it.
    csrf: str = ""

    @property
    def admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Session:
    operator: Operator
    cookie: str  # the secret the browser keeps; shown once


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise Invalid("name", "1 to 100 letters, digits or . _ @ -")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise Invalid("role", f"one of {', '.join(ROLES)}")
    return role


async def add(conn: Executor, name: str, role: str) -> str:
    """A new operator; returns its key (shown once)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        await conn.execute(Q["operator_add"], check_name(name), check_role(role), digest(key))
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"an operator named {name} exists already") from exc
    return key


async def update(
    conn: Executor,
    name: str,
    *,
    role: str | None = None,
    new_key: bool = False,
    disabled: bool | None = None,
) -> str | None:
    """Change an operator; every change but enabling signs its sessions out.  Returns
    the new key when `new_key`."""
    key = KEY_PREFIX + secrets.token_urlsafe(32) if new_key else None
    found = await conn.fetchval(
        Q["operator_update"],
        name,
        check_role(role) if role is not None else None,
        digest(key) if key is not None else None,
        disabled,
    )
    if not found:
        raise NotFound(f"no operator named {name}")
    return key


async def remove(conn: Executor, name: str) -> None:
    if not await conn.fetchval(Q["operator_remove"], name):
        raise NotFound(f"no operator named {name}")


async def listing(conn: Executor) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(Q["operators_list"])]


async def link(conn: Executor, name: str, ttl_seconds: int = LINK_TTL_S) -> str:
    """A one-time sign-in token for `name` (put it in /ops/sign-in?link=...)."""
    token = secrets.token_urlsafe(32)
    if not await conn.fetchval(Q["link_create"], name, digest(token), ttl_seconds):
        raise NotFound(f"no enabled operator named {name}")
    return token


def sign_in_url(base_url: str, token: str) -> str:
    """The page a one-time link opens (`base_url`: where the service is reached)."""
    return f"{base_url.rstrip('/')}/ops/sign-in?{urlencode({'link': token})}"


async def sign_in(
    conn: Executor,
    *,
    key: str | None = None,
    link_token: str | None = None,
    ttl_seconds: int = SESSION_TTL_S,
) -> Session | None:
    """A new session for the operator holding `key` or the link `link_token`; None
    when neither signs anyone in."""
    if not (key or link_token):
        return None
    cookie = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(24)
    row = await conn.fetchrow(
        Q["sign_in"],
        digest(key) if key else None,
        digest(link_token) if link_token and not key else None,
        digest(cookie),
        csrf,
        ttl_seconds,
    )
    if row is None:
        return None
    return Session(Operator(row["name"], row["role"], csrf), cookie)


async def session(conn: Executor, cookie: str) -> tuple[Operator, datetime] | None:
    """The operator signed in with `cookie`, and when the session ends."""
    row = await conn.fetchrow(Q["session"], digest(cookie))
    if row is None:
        return None
    return Operator(row["name"], row["role"], row["csrf"]), row["expires_at"]


async def sign_out(conn: Executor, cookie: str) -> None:
    await conn.execute(Q["sign_out"], digest(cookie))
