"""The soak test's mixed workload (tests/acceptance/test_soak.py): jobs that succeed,
fail first, fail with poison errors, time out, and a periodic one."""

from __future__ import annotations

from datetime import timedelta

from tenantry.jobs import Job, Policy, Registry
from tests.acceptance import handlers

registry = Registry()
registry.add("record", handlers.record)
_FAST_RETRY = Policy(max_attempts=5, backoff_base=0.05, backoff_cap=0.2)


@registry.handler("flaky", policy=_FAST_RETRY)
async def flaky(job: Job) -> None:
    """Fails its first attempt, then records itself like `record`."""
    if job.attempt == 1:
        raise ConnectionError("the first attempt always fails")
    await handlers.record(job)


@registry.handler("poison", policy=Policy(max_attempts=2, backoff_base=0.05, backoff_cap=0.1))
async def poison(job: Job) -> None:
    """An error no text column takes: a NUL byte and a lone surrogate."""
    raise OSError(5, "bad\x00 read", "caf\udcff.txt")


@registry.handler(
    "slow", policy=Policy(max_attempts=2, backoff_base=0.05, backoff_cap=0.1, timeout=0.3)
)
async def slow(job: Job) -> None:
    import anyio  # noqa: PLC0415 - only this handler sleeps

    await anyio.sleep(30)


@registry.handler("tick", every=timedelta(seconds=1))
async def tick(job: Job) -> None:
    async with job.complete_in_tx() as tx:
        await tx.execute("INSERT INTO public.ticks (period) VALUES ($1)", job.payload["period"])
