"""The onboarding state machine: the only writer of onboarding state.

accepted -> provisioning (one step at a time) -> completed, or -> failed.  Every
transition happens with the onboarding's row locked, bumps its version by one and
appends the event of that version to the outbox, in the transaction of the step's own
rows: the state, the ledger, the step's effects and the event commit together or not
at all.  The version is what the SSE stream's `id:` is, so a browser resumes exactly
after the last transition it saw.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ..db import Conn, Executor, leaves_no_session_state
from ..errors import Conflict, NotFound
from ..outbox import store as outbox
from ..sql import queries_for
from ..tenancy import tenant_context_mode, tenant_scope, tenant_tx
from ..tenants import store as tenants
from .model import (
    AGGREGATE,
    FAILED,
    STEPS,
    TERMINAL_STATES,
    Onboarding,
    SignUp,
    StepDone,
    explain_failure,
)

Q = queries_for(__file__)
PROVISION_KIND = "onboarding.provision"


@dataclass(frozen=True)
class Accepted:
    onboarding_id: uuid.UUID
    tenant_id: uuid.UUID
    created_at: datetime
    replayed: bool  # an earlier request with the same idempotency key made it


def key_hash(idempotency_key: str) -> bytes:
    return hashlib.sha256(idempotency_key.encode("utf-8")).digest()


async def accept(
    pool: asyncpg.Pool,
    sign_up: SignUp,
    *,
    idempotency_key: str | None,
    queue: str,
    request_id: str | None = None,
) -> Accepted:
    """Record a sign-up and enqueue its provisioning, in one transaction.  The request's
    id goes with the provisioning job (its log lines carry it).

    One call of tenantry.accept_onboarding does it all (the key, the onboarding, its
    first event, the job): it names the tenant and presents the key itself, so sent
    alone it is its own transaction, and the accept is one round trip (the pool's reset
    on release is skipped: the call leaves nothing in the session).  In the set_local
    mode (Citus needs the tenant named by SET LOCAL) it runs inside a tenant
    transaction instead.

    With an idempotency key, the first request to present it wins: a concurrent one
    waits on the key's unique index until the winner commits, then finds its row and
    answers what the winner answered (the same body) or Conflict (another body)."""
    tenant_id, onboarding_id = uuid.uuid4(), uuid.uuid4()
    args = (
        tenant_id,
        onboarding_id,
        sign_up.email,
        sign_up.tenant_name,
        sign_up.plan,
        None if idempotency_key is None else key_hash(idempotency_key),
        sign_up.digest(),
        {"state": "accepted"} | _request(request_id),
        # The slug the tenant will ask for goes with the job: provisioning's first
        # group is then one call, without reading the onboarding's name first.
        {"onboarding_id": str(onboarding_id), "slug_base": tenants.slug_base(sign_up.tenant_name)}
        | _request(request_id),
        queue,
    )
    row = await _call_alone(pool, tenant_id, Q["accept"], *args)
    assert row is not None
    outcome = row["outcome"]
    if outcome == "conflict":
        raise Conflict("this Idempotency-Key was used with a different request body")
    if outcome == "unfinished":  # pragma: no cover - the conflicting row was just seen
        raise Conflict("the idempotency key is being used by a request that did not finish")
    return Accepted(
        row["onboarding_id"], row["tenant_id"], row["created_at"], replayed=outcome == "replayed"
    )


async def _call_alone(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, query: str, *args: Any
) -> asyncpg.Record | None:
    """One call of a function that names its tenant itself (tenantry.enter_tenant_context),
    sent alone: its own transaction, one round trip, and no reset of the session on
    release (it set transaction-local settings only).  In the set_local mode (Citus needs
    the tenant named by SET LOCAL) it runs inside a tenant transaction instead, without
    index_plans: the functions called here plan with those settings of their own."""
    if tenant_context_mode() == "set_local":
        async with tenant_tx(pool, tenant_id) as tx:
            return await tx.fetchrow(query, *args)
    async with pool.acquire() as conn:
        row: asyncpg.Record | None = await conn.fetchrow(query, *args)
        leaves_no_session_state(conn)
        return row


async def find(conn: Executor, tenant_id: uuid.UUID, onboarding_id: uuid.UUID) -> Onboarding | None:
    async with tenant_scope(conn, tenant_id) as tx:
        row = await tx.fetchrow(Q["get"], tenant_id, onboarding_id)
        if row is None:
            return None
        steps = await tx.fetch(Q["steps"], tenant_id, onboarding_id)
    return Onboarding(**dict(row), steps=[StepDone(r["step"], r["done_at"]) for r in steps])


async def of_tenant(conn: Executor, tenant_id: uuid.UUID, limit: int = 20) -> list[Onboarding]:
    """A tenant's onboardings with their steps, newest first."""
    async with tenant_scope(conn, tenant_id) as tx:
        ids = [r["id"] for r in await tx.fetch(Q["of_tenant"], tenant_id, limit)]
    return [o for i in ids if (o := await find(conn, tenant_id, i)) is not None]


async def get(conn: Executor, tenant_id: uuid.UUID, onboarding_id: uuid.UUID) -> Onboarding:
    found = await find(conn, tenant_id, onboarding_id)
    if found is None:
        raise NotFound(f"no onboarding {onboarding_id}")
    return found


@dataclass
class Locked:
    """An onboarding locked for one transition, inside the step's transaction."""

    tx: Conn
    tenant_id: uuid.UUID
    id: uuid.UUID
    state: str
    version: int
    email: str
    tenant_name: str
    plan: str
    done: frozenset[str]
    # The id of the request that started the onboarding, carried by every event it
    # leads to, so one sign-up can be followed from its request to its last event.
    request_id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


async def lock(
    tx: Conn, tenant_id: uuid.UUID, onboarding_id: uuid.UUID, *, request_id: str | None = None
) -> Locked:
    row = await tx.fetchrow(Q["lock"], tenant_id, onboarding_id)
    if row is None:
        raise NotFound(f"no onboarding {onboarding_id}")
    return Locked(
        tx,
        tenant_id,
        onboarding_id,
        row["state"],
        row["version"],
        row["email"],
        row["tenant_name"],
        row["plan"],
        frozenset(row["done"]),
        request_id,
    )


async def _transition(
    o: Locked, state: str, event_type: str, payload: dict[str, Any], reason: str | None = None
) -> int:
    version = await o.tx.fetchval(Q["transition"], o.tenant_id, o.id, o.version, state, reason)
    if version is None:  # pragma: no cover - the row is locked by this transaction
        raise Conflict(f"onboarding {o.id} moved on under its lock")
    await outbox.emit(
        o.tx,
        tenant_id=o.tenant_id,
        aggregate_type=AGGREGATE,
        aggregate_id=str(o.id),
        event_type=event_type,
        payload={"state": state, **payload, **_request(o.request_id)},
        version=version,
    )
    o.state, o.version = state, version
    return int(version)


@dataclass(frozen=True)
class StepArgs:
    """What the database steps write besides the onboarding's own fields (provision.py
    decides it; ids derived from the onboarding's, so a repeat writes nothing new)."""

    tenant_slugs: list[str]
    owner_id: uuid.UUID
    role_names: list[str]
    role_permissions: list[str]
    workspace_id: uuid.UUID


@dataclass(frozen=True)
class StepsRun:
    """The onboarding as a call of run_steps left it (committed), and the steps it ran."""

    state: str
    version: int
    email: str
    tenant_name: str
    plan: str
    done: frozenset[str]
    ran: list[str]

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


# SQLSTATEs raised by tenantry.onboarding_run_steps (functions.sql).
NO_FREE_SLUG = "TY001"
LEASE_LOST = "TY002"


class NoFreeSlug(Conflict):
    """Every candidate slug of the tenant is taken (the group wrote nothing)."""


async def run_steps(
    pool: asyncpg.Pool,
    tenant_id: uuid.UUID,
    onboarding_id: uuid.UUID,
    todo: list[str],
    args: StepArgs,
    *,
    request_id: str | None,
    completes_job: tuple[int, str] | None = None,
    compensation: dict[str, Any] | None = None,
) -> StepsRun:
    """Run the steps of `todo` that the ledger does not have, unless the onboarding has
    ended, and record each with the onboarding's next version and its event: one call of
    tenantry.onboarding_run_steps, its own transaction (the lock, the ledger read under
    it, the steps' rows and records commit together or not at all).

    `completes_job` = (job id, lease owner): the job completes in the same transaction;
    if the lease is lost, nothing commits and Conflict is raised.  `compensation`
    ({"queue", "payload"}): an effect outside the database was made for this call, so a
    compensation job is enqueued if the onboarding is found failed.  NoFreeSlug when the
    tenant step finds every slug taken (nothing written)."""
    job_id, lease_owner = completes_job if completes_job is not None else (None, None)
    params = (
        tenant_id,
        onboarding_id,
        todo,
        list(STEPS),
        args.tenant_slugs,
        args.owner_id,
        args.role_names,
        args.role_permissions,
        args.workspace_id,
        request_id,
        job_id,
        lease_owner,
        compensation,
    )
    try:
        row = await _call_alone(pool, tenant_id, Q["run_steps"], *params)
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == NO_FREE_SLUG:
            raise NoFreeSlug(str(exc)) from exc
        if exc.sqlstate == LEASE_LOST:
            raise Conflict(str(exc)) from exc
        raise
    if row is None:
        raise NotFound(f"no onboarding {onboarding_id}")
    return StepsRun(
        row["state"],
        row["version"],
        row["email"],
        row["tenant_name"],
        row["plan"],
        frozenset(row["done"]),
        list(row["ran"]),
    )


def _request(request_id: str | None) -> dict[str, str]:
    return {"request_id": request_id} if request_id else {}


async def failed(o: Locked, reason: str, code: str, compensated: list[str]) -> None:
    """End the onboarding in `failed`.  The event says why twice: `reason` (the technical
    cause, for operators) and `code`, `field` and `message` (model.explain_failure, for
    the person and the page); `failed_step` is the step that could not be done, and
    `undone` the steps done before it whose effects are gone again (`compensated` names
    what was removed: the tenant's rows, its storage)."""
    failure = explain_failure(code, o.email, o.tenant_name)
    undone = [s for s in STEPS if s in o.done and _undone_by(s, compensated)]
    await _transition(
        o,
        "failed",
        FAILED,
        {
            "reason": reason,
            "code": failure.code,
            "field": failure.field,
            "message": failure.message,
            "failed_step": next((s for s in STEPS if s not in o.done), None),
            "undone": undone,
            "compensated": compensated,
        },
        reason,
    )


def _undone_by(step: str, compensated: list[str]) -> bool:
    """A done step is undone when what it made was removed: the database steps' rows go
    with the tenant, the storage with the compensation; a sent email stays sent."""
    if step == "storage":
        return "storage" in compensated
    return step != "welcome_email" and "tenant" in compensated


async def prune_keys(conn: Executor, retention_hours: int, batch: int) -> int:
    """Forget idempotency keys past their retention (the worker's login)."""
    pruned: int = await conn.fetchval(Q["prune_keys"], retention_hours, batch)
    return pruned
