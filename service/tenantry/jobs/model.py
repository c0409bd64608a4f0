"""What a handler sees of its job."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from ..db import Conn, leaves_no_session_state
from ..errors import Conflict, TenantryError
from ..sql import queries_for
from ..tenancy import tenant_tx_on

Q = queries_for(__file__)


class JobAlreadyCompleted(TenantryError):
    """A second `complete_in_tx()` in one run of a handler: the job was completed by the
    first, and effects of a second could no longer commit with the completion."""


@dataclass(eq=False)
class Job:
    """A job as its handler receives it.

    `payload` is the decoded JSON payload; `attempt` counts from 1 (this run
    included) up to `max_attempts`.  Write the job's effects in `complete_in_tx()`
    (they commit with the job's completion: exactly once) or in `tenant_tx()` (a plain
    tenant transaction: at least once).  A handler ends the job by returning (done),
    raising `Snooze` (run again later, no attempt used), `PermanentFailure` or
    `Cancel` (dead at once), or any other exception (retried with backoff until its
    attempts run out)."""

    id: int
    tenant_id: uuid.UUID
    queue: str
    kind: str
    payload: Any
    attempt: int
    max_attempts: int
    priority: int
    created_at: datetime
    _pool: asyncpg.Pool = field(repr=False)
    _lease_owner: str = field(repr=False)
    # Set once a `complete_in_tx()` block (or a statement given lease_for_completion())
    # has committed.
    completed_in_tx: bool = field(default=False, repr=False)

    def lease_for_completion(self) -> tuple[int, str]:
        """The job's id and this run's lease owner, for a handler whose transaction is
        one statement of its own that completes the job with its effects (an SQL function
        calling tenantry.complete_job(tenant, id, lease owner), which is false when the
        lease was lost: the function must then roll everything back).  Once that
        statement has committed, say so with `completed_by_statement()`."""
        if self.completed_in_tx:
            raise JobAlreadyCompleted(f"job {self.id} was completed already in this run")
        return self.id, self._lease_owner

    def completed_by_statement(self) -> None:
        """The statement given `lease_for_completion()` committed: the job is complete
        (the worker does not complete it again)."""
        self.completed_in_tx = True

    @property
    def pool(self) -> asyncpg.Pool:
        """The tenant code's pool (row-level security; no cross-tenant function)."""
        return self._pool

    @asynccontextmanager
    async def tenant_tx(
        self, *, session_untouched: bool = False, index_plans: bool = False
    ) -> AsyncIterator[Conn]:
        """A transaction in this job's tenant context, like `tenancy.tenant_tx`: it
        commits when the block exits cleanly and does not complete the job (the worker
        does that when the handler returns).  Effects written here can happen more than
        once if the job is retried; `complete_in_tx()` makes them exactly-once.

        `session_untouched=True` says the block runs nothing that outlives the
        transaction in the connection's session (no plain SET, LISTEN, session advisory
        lock, temporary table or prepared statement of its own): after a commit the
        pool then skips its reset on release, a round trip fewer.  `index_plans` as for
        `tenancy.tenant_tx_on`."""
        async with self._pool.acquire() as conn:
            async with tenant_tx_on(conn, self.tenant_id, index_plans=index_plans) as tx:
                yield tx
            if session_untouched:
                leaves_no_session_state(conn)

    @asynccontextmanager
    async def complete_in_tx(
        self, *, session_untouched: bool = False, index_plans: bool = False
    ) -> AsyncIterator[Conn]:
        """A transaction in this job's tenant context that also completes the job: the
        block's effects and the job's completion commit together, so they happen
        exactly once.

        Once per run of the handler.  A second `complete_in_tx()` raises
        JobAlreadyCompleted before touching anything (open `tenant_tx()` for writes
        after the completion).  If this worker no longer holds the job's lease (it was
        rescued after a stall), nothing commits and Conflict is raised: the effects are
        not done twice.  If the COMMIT itself fails (a deferred constraint), the job is
        not completed, and the error fails the attempt like any other.
        `session_untouched` and `index_plans` as for `tenant_tx()`."""
        if self.completed_in_tx:
            raise JobAlreadyCompleted(
                f"job {self.id} was completed by an earlier complete_in_tx() of this run;"
                " write further effects in job.tenant_tx()"
            )
        async with self._pool.acquire() as conn:
            async with tenant_tx_on(conn, self.tenant_id, index_plans=index_plans) as tx:
                yield tx
                done = await tx.fetchval(
                    Q["complete_one"], self.tenant_id, self.id, self._lease_owner
                )
                if done != 1:
                    raise Conflict(f"job {self.id}: lease lost; effects rolled back")
            # Only now has it committed.
            self.completed_in_tx = True
            if session_untouched:
                leaves_no_session_state(conn)
