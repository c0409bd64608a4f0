"""Handlers of the replicas test (tests/acceptance/test_replicas.py): each records every
start of a run (in a transaction of its own, so a run that is repeated shows twice) and
its completion (with the job, so exactly once), for the test to count."""

from __future__ import annotations

from datetime import timedelta

import anyio

from tenantry.jobs import Job, Registry

registry = Registry()

RECORD = "INSERT INTO public.replica_runs (job_id, kind, phase, period) VALUES ($1, $2, $3, $4)"


async def _run(job: Job, seconds: float = 0.0) -> None:
    period = job.payload.get("period")
    async with job.tenant_tx() as tx:
        await tx.execute(RECORD, job.id, job.kind, "started", period)
    if seconds:
        await anyio.sleep(seconds)
    async with job.complete_in_tx() as tx:
        await tx.execute(RECORD, job.id, job.kind, "completed", period)


@registry.handler("replica.record")
async def record(job: Job) -> None:
    await _run(job)


@registry.handler("replica.linger")
async def linger(job: Job) -> None:
    """Runs for `seconds`: keeps its replica draining for that long after SIGTERM."""
    await _run(job, float(job.payload["seconds"]))


@registry.handler("replica.tick", every=timedelta(seconds=1))
async def tick(job: Job) -> None:
    await _run(job)
