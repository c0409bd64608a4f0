"""What a handler sees of its job."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from ..db import Conn
from ..errors import Conflict
from ..sql import queries_for
from ..tenancy import tenant_tx_on

Q = queries_for(__file__)


@dataclass(eq=False)
class Job:
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
    # Set when the handler completed the job inside its own transaction.
    completed_in_tx: bool = field(default=False, repr=False)

    @property
    def pool(self) -> asyncpg.Pool:
        """The tenant code's pool, for reads outside the job's transactions (each
        needs a tenant transaction of its own: `tenancy.tenant_tx`)."""
        return self._pool

    @asynccontextmanager
    async def tenant_tx(self, *, complete: bool = True) -> AsyncIterator[Conn]:
        """A connection in a transaction scoped to this job's tenant.

        With `complete=True` (the default) the job's completion is written in the same
        transaction when the block exits cleanly: the handler's database effects and the
        job's removal commit together, so they happen exactly once.  If this worker no
        longer holds the job's lease (it was rescued after a stall), the transaction is
        rolled back instead of committing effects twice.
        """
        async with self._pool.acquire() as conn, tenant_tx_on(conn, self.tenant_id) as tx:
            yield tx
            if complete:
                done = await tx.fetchval(
                    Q["complete_one"], self.tenant_id, self.id, self._lease_owner
                )
                if done != 1:
                    raise Conflict(f"job {self.id}: lease lost; effects rolled back")
                self.completed_in_tx = True
