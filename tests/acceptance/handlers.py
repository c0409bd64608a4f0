"""Handlers the acceptance tests load into the real process via TENANTRY_HANDLERS."""

from __future__ import annotations

import anyio

from tenantry.jobs import Job, Registry

registry = Registry()


@registry.handler("sleep")
async def sleep(job: Job) -> None:
    await anyio.sleep(float(job.payload.get("seconds", 0)))


@registry.handler("block_first_attempt")
async def block_first_attempt(job: Job) -> None:
    """Hangs on its first attempt (the test kills the process); succeeds after."""
    if job.attempt == 1:
        await anyio.sleep_forever()


@registry.handler("record")
async def record(job: Job) -> None:
    async with job.complete_in_tx() as tx:
        await tx.execute(
            "INSERT INTO public.acceptance_log (job_id, attempt, n) VALUES ($1, $2, $3)",
            job.id,
            job.attempt,
            job.payload.get("n"),
        )
