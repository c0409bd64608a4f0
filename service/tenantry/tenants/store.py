"""Tenants and API keys.  Every statement runs in the tenant's own context."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ..db import Executor
from ..errors import Conflict, Invalid, NotFound, Unauthorized
from ..sql import queries_for
from ..tenancy import parse_tenant_id, tenant_scope
from .keys import new_key, parse_key

Q = queries_for(__file__)

_SLUG = re.compile(r"^[a-z0-9]([a-z0-9-]{0,48}[a-z0-9])?$")
# A tenant's name: what the sign-up form and `tenantry tenants create` accept.
NAME_MIN, NAME_MAX = 3, 50
_KEY_NAME_MAX = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
PLANS = ("free", "pro")


@dataclass(frozen=True)
class Tenant:
    id: uuid.UUID
    slug: str
    name: str
    plan: str
    state: str
    created_at: datetime


@dataclass(frozen=True)
class NewKey:
    id: int
    secret: str  # shown once, never stored


@dataclass(frozen=True)
class KeyInfo:
    id: int
    name: str
    created_at: datetime
    revoked_at: datetime | None


def slug_from(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:50].strip("-")
    return slug


def tenant_name(raw: str, field: str = "name") -> str:
    """A tenant's name as people type it, with its runs of whitespace made one space,
    and checked: 3 to 50 characters, a letter or a digit (of any script) among them, no
    control characters."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: bytes that were not UTF-8 (argv)
        raise Invalid(field, "is not UTF-8 text") from None
    if _CONTROL.search(raw.replace("\t", " ").replace("\n", " ").replace("\r", " ")):
        raise Invalid(field, "must not contain control characters")
    name = " ".join(raw.split())
    if not NAME_MIN <= len(name) <= NAME_MAX:
        raise Invalid(field, f"must be {NAME_MIN} to {NAME_MAX} characters")
    if not any(c.isalnum() for c in name):
        raise Invalid(field, "must contain a letter or a digit")
    return name


def tenant_slug(raw: str) -> str:
    """A slug as given (the public handle): 1-50 of a-z, 0-9 and inner dashes."""
    if not _SLUG.match(raw):
        raise Invalid("slug", "must be 1-50 of a-z, 0-9 and inner dashes")
    return raw


async def create_tenant(
    conn: Executor,
    *,
    name: str,
    slug: str | None = None,
    plan: str = "free",
    tenant_id: uuid.UUID | None = None,
    state: str = "active",
) -> Tenant:
    name = tenant_name(name)
    tid = tenant_id or uuid.uuid4()
    # A name without an ASCII letter or digit (Москва) has no slug of its own.
    slug = tenant_slug(slug) if slug is not None else (slug_from(name) or f"tenant-{tid.hex[:8]}")
    if plan not in PLANS:
        raise Invalid("plan", f"must be one of {', '.join(PLANS)}")
    try:
        async with tenant_scope(conn, tid) as tx:
            row = await tx.fetchrow(Q["create_tenant"], tid, slug, name, plan, state)
    except asyncpg.UniqueViolationError as exc:
        # The slug is a public handle, unique across tenants by design.
        raise Conflict(f"slug {slug!r} is taken") from exc
    assert row is not None
    return Tenant(**dict(row))


async def get_tenant(conn: Executor, tenant_id: object) -> Tenant:
    tid = parse_tenant_id(tenant_id)
    async with tenant_scope(conn, tid) as tx:
        row = await tx.fetchrow(Q["get_tenant"], tid)
    if row is None:
        raise NotFound(f"no tenant {tid}")
    return Tenant(**dict(row))


async def create_key(conn: Executor, tenant_id: object, *, name: str = "") -> NewKey:
    tid = parse_tenant_id(tenant_id)
    if len(name) > _KEY_NAME_MAX:
        raise Invalid("name", f"must be at most {_KEY_NAME_MAX} characters")
    secret, digest = new_key(tid)
    try:
        async with tenant_scope(conn, tid) as tx:
            key_id = await tx.fetchval(Q["create_key"], tid, name, digest)
    except asyncpg.ForeignKeyViolationError as exc:
        raise NotFound(f"no tenant {tid}") from exc
    return NewKey(int(key_id), secret)


async def list_keys(conn: Executor, tenant_id: object) -> list[KeyInfo]:
    """A tenant's keys (never their secrets); NotFound for a tenant that does not exist."""
    tid = parse_tenant_id(tenant_id)
    async with tenant_scope(conn, tid) as tx:
        rows = await tx.fetch(Q["list_keys"], tid)
        if not rows and await tx.fetchrow(Q["get_tenant"], tid) is None:
            raise NotFound(f"no tenant {tid}")
    return [KeyInfo(**dict(r)) for r in rows]


async def list_tenants(conn: Executor, limit: int = 100) -> list[Tenant]:
    """Every tenant, newest first, across tenants: the operator's login only
    (tenantry.tenants_list)."""
    rows = await conn.fetch(Q["list_tenants"], limit)
    return [Tenant(**dict(r)) for r in rows]


async def revoke_key(conn: Executor, tenant_id: object, key_id: int) -> None:
    tid = parse_tenant_id(tenant_id)
    async with tenant_scope(conn, tid) as tx:
        found = await tx.fetchval(Q["revoke_key"], tid, key_id)
    if found is None:
        raise NotFound(f"tenant {tid} has no key {key_id}")


async def authenticate(conn: Executor, raw_key: str) -> uuid.UUID:
    """The tenant a key belongs to, or Unauthorized (one message for every failure:
    malformed, unknown, revoked and foreign keys look alike)."""
    parsed = parse_key(raw_key)
    if parsed is None:
        raise Unauthorized("invalid API key")
    async with tenant_scope(conn, parsed.tenant_id) as tx:
        found = await tx.fetchval(Q["find_key"], parsed.tenant_id, parsed.secret_hash)
    if found is None:
        raise Unauthorized("invalid API key")
    return parsed.tenant_id


# --- provisioning's building blocks -------------------------------------------------
# The rows are written by the SQL functions of functions.sql (tenantry.tenant_create_with_
# free_slug, tenant_add_user, tenant_add_roles, tenant_add_workspace_with_member,
# tenant_set_state), which provisioning calls from one function per group of steps
# (tenantry.onboarding_run_steps); what they are given is decided here.

DEFAULT_ROLES = {
    "owner": ("tenant.manage", "members.manage", "workspaces.manage", "billing.manage"),
    "admin": ("members.manage", "workspaces.manage"),
    "member": (),
}


def default_roles() -> tuple[list[str], list[str]]:
    """The default roles as two parallel arrays: names, and each one's permissions as one
    comma-separated text (tenantry.tenant_add_roles)."""
    names = list(DEFAULT_ROLES)
    return names, [",".join(DEFAULT_ROLES[n]) for n in names]


def slug_base(name: str) -> str:
    """The slug a new tenant's name asks for (at most 37 characters, room for the
    suffixes of slug_candidates)."""
    return slug_from(name)[:37].strip("-") or "tenant"


def slug_candidates(tenant_id: uuid.UUID, base: str) -> list[str]:
    """The slugs a new tenant may take, in order: its slug_base and, when another tenant
    holds that, the same made unique by the tenant id's first hex digits (deterministic,
    so a retry picks the same one)."""
    return [base, f"{base}-{tenant_id.hex[:6]}", f"{base}-{tenant_id.hex[:12]}"]


async def delete_tenant(tx: Executor, tenant_id: uuid.UUID) -> bool:
    """Delete the tenant and (cascading) everything it owns; False if it did not exist."""
    async with tenant_scope(tx, tenant_id) as conn:
        return await conn.fetchval(Q["delete_tenant"], tenant_id) is not None
