"""Provisioning: the `onboarding.provision` job, one committed group of steps at a time.

Each group of steps (STEP_GROUPS) runs in one transaction with the onboarding locked,
one call of tenantry.onboarding_run_steps (machine.run_steps): each step checks the
ledger (a step already done is skipped), writes its rows with ids derived from the
onboarding id, and is recorded with the onboarding's next version and its event.
Effects outside the database happen before that transaction and
are idempotent themselves (a directory that may exist, an email whose idempotency key
is the onboarding's), so a retry or a kill -9 anywhere repeats at most an idempotent
call and never duplicates or orphans anything.

A permanent failure (the mail server refuses the address, every slug is taken) ends
the onboarding in `failed` at once: the tenant's rows are deleted, what earlier steps
created outside the database is removed by a compensation job enqueued in the same
transaction, and the failed event says what was undone.  Any other error is retried;
when the job is dead-lettered for whatever reason (its attempts used up, a time-out or
a worker's crash on the last one included), its dead-letter hook fails the onboarding
the same way.  So every onboarding ends `completed` or `failed`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from .. import logging as log
from ..db import Conn
from ..errors import PermanentFailure
from ..jobs.model import Job
from ..jobs.queue import enqueue
from ..jobs.registry import DeadLetter, Policy, Registry
from ..tenants import store as tenants
from . import machine
from .mail import Mail, Mailer, MailRejected
from .model import STEPS, derived_id
from .storage import Storage


# The steps' transactions.  Two per sign-up: the tenant's rows with the storage, then the
# welcome email with the end.  A step whose effect outside the database announces the
# steps before it (Provisioner._after_commit: the welcome email says the workspace is
# ready) starts a group, its effect done once those steps have committed.  Any other
# effect outside the database (Provisioner._ahead: the storage) is done before the
# transaction of the group it is in.  Every step is still recorded in the ledger and
# announced by an event of its own, in order.  The storage is recorded before the
# email is sent, so that a refused address (which fails the onboarding) knows to remove
# it.
def step_groups(
    steps: tuple[str, ...], after_commit: frozenset[str]
) -> tuple[tuple[str, ...], ...]:
    groups: list[list[str]] = []
    for step in steps:
        if not groups or step in after_commit:
            groups.append([step])
        else:
            groups[-1].append(step)
    return tuple(tuple(g) for g in groups)


# Each attempt is bounded by the process's TENANTRY_JOB_TIMEOUT; twenty of them, at most a
# minute apart, before the onboarding is failed (its dead-letter hook).
POLICY = Policy(max_attempts=20, backoff_base=1.0, backoff_cap=60.0)
COMPENSATE_KIND = "onboarding.compensate"


def _failure_code(exc: Exception) -> str:
    """The failed event's `code` for a permanent failure (model.FAILURE_CODES)."""
    if isinstance(exc, MailRejected):
        return "email_rejected"
    if isinstance(exc, NameUnavailable):
        return "name_unavailable"
    return "failed"


def _request_id(payload: Any) -> str | None:
    rid = payload.get("request_id") if isinstance(payload, dict) else None
    return rid if isinstance(rid, str) else None


class NameUnavailable(PermanentFailure):
    """No slug can be made from the organisation's name: every candidate is taken."""


class Provisioner:
    def __init__(
        self, storage: Storage, mailer: Mailer, *, queue: str = "default", product: str = "Tenantry"
    ) -> None:
        self._storage = storage
        self._mailer = mailer
        self._queue = queue
        self._product = product
        self._log = log.get("provision")

    def registry(self) -> Registry:
        reg = Registry()
        reg.add(machine.PROVISION_KIND, self.run, policy=POLICY, on_dead=self.gave_up)
        reg.add(COMPENSATE_KIND, self.compensate, policy=POLICY)
        return reg

    async def run(self, job: Job) -> None:
        onboarding_id = uuid.UUID(str(job.payload["onboarding_id"]))
        logger = self._log.bind(onboarding_id=str(onboarding_id), tenant_id=str(job.tenant_id))
        try:
            await self._steps(job, onboarding_id, logger)
        except (MailRejected, PermanentFailure) as exc:
            # The onboarding's own end, not an incident: the job completes with it.
            await self._fail(
                job,
                onboarding_id,
                str(exc) or type(exc).__name__,
                code=_failure_code(exc),
                logger=logger,
                payload=job.payload,
            )
        # Anything else is retried with backoff (the ledger skips what is done), and
        # ends in gave_up() if the job dies.

    async def gave_up(self, job: Job, dead: DeadLetter) -> None:
        """The dead-letter hook of the provisioning job (`job` is the hook's own job):
        the onboarding fails, with compensation, whatever killed its job."""
        onboarding_id = uuid.UUID(str(dead.payload["onboarding_id"]))
        logger = self._log.bind(onboarding_id=str(onboarding_id), tenant_id=str(job.tenant_id))
        reason = f"gave up after {dead.attempts} attempts ({dead.reason}): {dead.error}"
        await self._fail(
            job, onboarding_id, reason, code="gave_up", logger=logger, payload=dead.payload
        )

    async def _steps(self, job: Job, onboarding_id: uuid.UUID, logger: log.Logger) -> None:
        """Run the steps not yet in the ledger, a group of them per call of
        machine.run_steps (`step_groups`): one round trip and one transaction per group.
        The ledger is read under the onboarding's lock in each call, not before: the
        first group's call always runs (it finds its steps done on a retry), and tells
        what is left."""
        tid = job.tenant_id
        args = await self._step_args(job, onboarding_id)
        request_id = _request_id(job.payload)
        done: frozenset[str] = frozenset()
        last: machine.StepsRun | None = None  # the onboarding as the last commit left it
        while True:
            group = next(g for g in STEP_GROUPS if not set(g) <= done)
            todo = [s for s in group if s not in done]
            # The group's effects outside the database, in step order, before its
            # transaction (each idempotent: a retry repeats it harmlessly).
            ahead = [s for s in todo if s in self._ahead]
            for step in ahead:
                await self._ahead[step](self, tid)
            after_commit = self._after_commit.get(todo[0])
            if after_commit is not None:
                # Never the first group's step (step_groups), so a commit came before.
                assert last is not None
                await after_commit(self, onboarding_id, last)
            made_effects = bool(ahead) or after_commit is not None
            o = await self._run_steps(
                job,
                onboarding_id,
                todo,
                args,
                request_id=request_id,
                # The last group completes the job in its own transaction.
                completes_job=group[-1] == STEPS[-1],
                # Failed while this run made its effect (a rescued job still running, or
                # a run of an onboarding that had failed already): the failure's
                # compensation may have run before it, so another one runs after it (no
                # dedup key: not merged into that one).
                compensation=self._compensation(onboarding_id, request_id)
                if made_effects
                else None,
            )
            if o.ran:  # said once they have committed: one line per commit
                logger.info("onboarding_steps_done", steps=list(o.ran))
            if o.terminal:
                return
            done, last = o.done, o

    async def _run_steps(
        self,
        job: Job,
        onboarding_id: uuid.UUID,
        todo: list[str],
        args: machine.StepArgs,
        *,
        request_id: str | None,
        completes_job: bool,
        compensation: dict[str, Any] | None,
    ) -> machine.StepsRun:
        try:
            o = await machine.run_steps(
                job.pool, job.tenant_id, onboarding_id, todo, args, request_id=request_id,
                completes_job=job.lease_for_completion() if completes_job else None,
                compensation=compensation,
            )  # fmt: skip
        except machine.NoFreeSlug as exc:  # retrying cannot help
            raise NameUnavailable(str(exc)) from exc
        if completes_job:
            job.completed_by_statement()
        return o

    async def _step_args(self, job: Job, onboarding_id: uuid.UUID) -> machine.StepArgs:
        """What the database steps write: ids derived from the onboarding's, the default
        roles, and the tenant's candidate slugs, from the slug base the accept put in the
        job's payload (a job enqueued before it did reads the onboarding's name)."""
        base = job.payload.get("slug_base") if isinstance(job.payload, dict) else None
        if not isinstance(base, str):
            async with job.tenant_tx(session_untouched=True, index_plans=True) as tx:
                found = await machine.get(tx, job.tenant_id, onboarding_id)
            base = tenants.slug_base(found.tenant_name)
        names, permissions = tenants.default_roles()
        return machine.StepArgs(
            tenant_slugs=tenants.slug_candidates(job.tenant_id, base),
            owner_id=derived_id(onboarding_id, "owner"),
            role_names=names,
            role_permissions=permissions,
            workspace_id=derived_id(onboarding_id, "workspace"),
        )

    def _compensation(self, onboarding_id: uuid.UUID, request_id: str | None) -> dict[str, Any]:
        return {
            "queue": self._queue,
            "payload": {"onboarding_id": str(onboarding_id)}
            | ({"request_id": request_id} if request_id else {}),
        }

    # --- effects outside the database (idempotent) --------------------------------------
    # The database steps' rows are written by tenantry.onboarding_run_steps itself.

    async def _make_storage(self, tenant_id: uuid.UUID) -> None:
        await self._storage.ensure(tenant_id)

    async def _send_welcome(self, onboarding_id: uuid.UUID, o: machine.StepsRun) -> None:
        name = o.tenant_name
        await self._mailer.send(
            Mail(
                key=f"onboarding-{onboarding_id}-welcome",
                to=o.email,
                subject=f"Welcome to {self._product}: {name} is ready",
                text=(
                    f"Hello,\n\nthe workspace of {name} has been set up, and you are its owner."
                    f"\n\n-- {self._product}\n"
                ),
            )
        )

    # Effects that need only the tenant's id, done before the transaction of their
    # group, ahead of the steps before them in it: the storage (idempotent, and removed
    # by the compensation if the onboarding fails).
    _ahead: dict[str, Callable[[Provisioner, uuid.UUID], Awaitable[None]]] = {
        "storage": _make_storage,
    }
    # Effects that announce the steps before them, done once those have committed: the
    # welcome email tells the owner the workspace is ready.  Each starts a group.
    _after_commit: dict[
        str, Callable[[Provisioner, uuid.UUID, machine.StepsRun], Awaitable[None]]
    ] = {
        "welcome_email": _send_welcome,
    }

    async def _fail(
        self,
        job: Job,
        onboarding_id: uuid.UUID,
        reason: str,
        *,
        code: str,
        logger: log.Logger,
        payload: Any,
    ) -> None:
        """The database decides first: under the onboarding's lock, unless another run
        finished it meanwhile, the tenant's rows go, the onboarding becomes `failed`,
        and the removal of what lies outside the database is enqueued as a job of its
        own in the same transaction (so it happens, retried, even if this process dies
        right after the commit, and never for an onboarding that did not fail).  `job`
        (the provisioning job, or its dead-letter hook's) completes with it; `payload` is the
        provisioning job's (its request id goes into the event)."""
        async with job.complete_in_tx(index_plans=True) as tx:
            rid = _request_id(payload)
            o = await machine.lock(tx, job.tenant_id, onboarding_id, request_id=rid)
            if o.terminal:
                return
            compensated = ["tenant"] if await tenants.delete_tenant(tx, job.tenant_id) else []
            if "storage" in o.done:
                compensated.append("storage")
            await machine.failed(o, reason[:500], code, compensated)
            await self._compensate_later(
                tx, job, onboarding_id, rid, f"{COMPENSATE_KIND}:{onboarding_id}"
            )
        logger.warning("onboarding_failed", code=code, reason=reason[:500], compensated=compensated)

    async def _compensate_later(
        self,
        tx: Conn,
        job: Job,
        onboarding_id: uuid.UUID,
        rid: str | None,
        dedup_key: str | None,
    ) -> None:
        """Enqueue the removal of what the onboarding made outside the database, in
        `tx` (it runs only if `tx` commits)."""
        await enqueue(
            tx,
            tenant_id=job.tenant_id,
            kind=COMPENSATE_KIND,
            payload={"onboarding_id": str(onboarding_id)} | ({"request_id": rid} if rid else {}),
            queue=self._queue,
            dedup_key=dedup_key,
        )

    async def compensate(self, job: Job) -> None:
        """Undo what a failed onboarding made outside the database (idempotent: the
        storage may be gone already, or may never have been made)."""
        removed = await self._storage.remove(job.tenant_id)
        self._log.info(
            "onboarding_compensated",
            onboarding_id=str(job.payload.get("onboarding_id")),
            tenant_id=str(job.tenant_id),
            storage_removed=removed,
        )


STEP_GROUPS = step_groups(STEPS, frozenset(Provisioner._after_commit))
