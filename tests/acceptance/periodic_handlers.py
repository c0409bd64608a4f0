"""A periodic handler for the acceptance test that proves periodic jobs run (loaded
only by that test: every other process would otherwise enqueue it too)."""

from __future__ import annotations

from datetime import timedelta

from tenantry.jobs import Job, Registry

registry = Registry()


@registry.handler("tick", every=timedelta(seconds=1))
async def tick(job: Job) -> None:
    async with job.complete_in_tx() as tx:
        await tx.execute(
            "INSERT INTO public.ticks (tenant_id, period) VALUES ($1, $2)",
            job.tenant_id,
            job.payload["period"],
        )
