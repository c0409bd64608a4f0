"""Tenantry: a Postgres-native backbone for multi-tenant SaaS background work.

The Python interface, for handler authors and for code that enqueues work:

    import tenantry

    registry = tenantry.Registry()

    @registry.handler("invoice.send", policy=tenantry.Policy(max_attempts=5))
    async def send(job: tenantry.Job) -> None:
        async with job.complete_in_tx() as conn:  # completes the job with the write
            ...

    async with tenantry.tenant_tx(pool, tenant_id) as conn:
        await tenantry.enqueue(conn, tenant_id=tenant_id, kind="invoice.send")
        await tenantry.emit(conn, tenant_id=tenant_id, aggregate_type="invoice",
                            aggregate_id="42", event_type="invoice.created", payload={})

`tenantry run` with `TENANTRY_HANDLERS=myapp.jobs:registry` runs the handlers.  What
`__all__` lists is the public interface; every other module and name is internal and
may change between versions.
"""

from __future__ import annotations

from .errors import (
    Cancel,
    Conflict,
    Invalid,
    PermanentFailure,
    Snooze,
    TenantContextError,
    TenantryError,
)
from .jobs.model import Job, JobAlreadyCompleted
from .jobs.queue import enqueue
from .jobs.registry import DeadLetter, Policy, Registry
from .outbox.store import emit
from .tenancy import SYSTEM_TENANT, tenant_tx, tenant_tx_on

__version__ = "0.1.0"

__all__ = [
    "SYSTEM_TENANT",
    "Cancel",
    "Conflict",
    "DeadLetter",
    "Invalid",
    "Job",
    "JobAlreadyCompleted",
    "PermanentFailure",
    "Policy",
    "Registry",
    "Snooze",
    "TenantContextError",
    "TenantryError",
    "__version__",
    "emit",
    "enqueue",
    "tenant_tx",
    "tenant_tx_on",
]
