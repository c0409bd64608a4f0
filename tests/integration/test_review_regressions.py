"""Regressions found by an adversarial review, each reproduced first: a payload the
claim cannot decode, a cap raced by two claims, a bulk insert at commit, wake-ups under
SET CONSTRAINTS IMMEDIATE and behind a long commit, a queued job moved into the future,
handlers that raise what no handler should, and errors that cannot be printed."""

from __future__ import annotations

import uuid

import anyio
import asyncpg
import pytest
import structlog
from structlog.contextvars import merge_contextvars

from tenantry import db
from tenantry import logging as log
from tenantry.errors import Snooze
from tenantry.jobs import queue as jobs
from tenantry.jobs.model import Job
from tenantry.jobs.registry import Policy, Registry
from tests.helpers import TENANT_A, TENANT_B, one, running_worker, wait_lock_waiter
from tests.integration.test_listener_and_periodic import Heard


@pytest.mark.parametrize(
    "payload",
    [
        '{"x": 1e400}',  # jsonb keeps it; no double holds it
        "[" * 1100 + "]" * 1100,  # deeper than orjson's limit
    ],
)
async def test_a_payload_the_worker_cannot_decode_buries_that_job_only(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool, payload: str
) -> None:
    """Regression: the claim's rows were decoded all at once; a payload PostgreSQL
    accepts but orjson cannot read failed the whole claim after the database had made
    it, so every row of that claim stayed leased to nobody, was rescued, claimed with
    it again and lost again: other tenants' jobs never ran."""
    poison = await admin_pool.fetchval(
        "INSERT INTO tenantry.jobs (tenant_id, kind, payload) VALUES ($1, 'k', $2::text::jsonb)"
        " RETURNING id",
        TENANT_A,
        payload,
    )
    for _ in range(5):
        await jobs.enqueue(pool, tenant_id=TENANT_B, kind="k")
    reg = Registry()
    ran: list[uuid.UUID] = []

    @reg.handler("k")
    async def k(job: Job) -> None:
        ran.append(job.tenant_id)

    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_flushed(6)
    assert ran == [TENANT_B] * 5
    dead = await jobs.dead_show(worker_pool, poison)
    assert dead["reason"] == "permanent" and "payload" in dead["last_error"]


async def test_two_claims_at_once_keep_the_cap(admin_pool: asyncpg.Pool, worker_url: str) -> None:
    """Regression: each claim counted the tenant's running rows in its own snapshot, so
    two claims at once (here one in a transaction that stays open a moment) could
    each take a row of a tenant capped at 1."""
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind, run_at) VALUES ($1, 'k', now())", TENANT_A
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind, run_at, state)"
        " VALUES ($1, 'k', now() - interval '1 minute', 'scheduled')",
        TENANT_A,
    )
    claim = "SELECT id FROM tenantry.claim_jobs('default', 5, $1, 30, NULL, 1) WHERE id IS NOT NULL"
    first = await db.connect(worker_url)
    second = await db.connect(worker_url)
    try:
        tx = first.transaction()
        await tx.start()
        got_first = await first.fetch(claim, "w1")
        got_second: list[asyncpg.Record] = []

        async def claim_second() -> None:
            got_second.extend(await second.fetch(claim, "w2"))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(claim_second)
                await wait_lock_waiter(admin_pool)  # the second waits for the first...
                await tx.commit()  # ...and then sees its claim
    finally:
        await first.close()
        await second.close()
    assert len(got_first) == 1 and got_second == []
    assert (
        await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs WHERE state = 'running'") == 1
    )


async def test_a_bulk_insert_into_many_queues_commits(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: the wake-up took an advisory lock per row's queue and 5 ms bucket at
    commit, so one transaction inserting into thousands of queues (or over a long
    commit) filled the server's lock table: "out of shared memory", the transaction
    lost."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A))
        await conn.execute(
            "INSERT INTO tenantry.jobs (tenant_id, queue, kind)"
            " SELECT $1, 'q' || g, 'k' FROM generate_series(1, 12000) g",
            TENANT_A,
        )
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 12000


async def test_set_constraints_immediate_does_not_silence_other_producers(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, database_url: str
) -> None:
    """Regression: with SET CONSTRAINTS ALL IMMEDIATE (Django and Rails issue it) the
    wake-up ran at the INSERT, and the throttle's row stayed locked until that
    transaction committed: other producers' commits meanwhile sent nothing."""
    await worker_pool.execute("SELECT tenantry.ensure_wake_keys(ARRAY['imm'])")
    heard = await Heard.on(database_url, "tenantry_jobs")
    try:
        async with pool.acquire() as open_conn, open_conn.transaction():
            await open_conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A))
            await open_conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
            await jobs.enqueue(open_conn, tenant_id=TENANT_A, kind="x", queue="imm")
            for _ in range(10):
                await jobs.enqueue(pool, tenant_id=TENANT_B, kind="x", queue="imm")
                await anyio.sleep(0.01)
            await heard.wait(2)
    finally:
        await heard.conn.close()


async def test_a_queued_job_moved_into_the_future_waits(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: an enqueue that debounces (ON CONFLICT ... DO UPDATE SET run_at =
    later) left the row `queued` with a run_at an hour ahead, and the claim, which
    trusts the state, ran it at once."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(TENANT_A))
        for _ in range(2):
            await conn.execute(
                "INSERT INTO tenantry.jobs (tenant_id, kind, dedup_key) VALUES ($1, 'k', 'd')"
                " ON CONFLICT (tenant_id, dedup_key) WHERE dedup_key IS NOT NULL"
                " DO UPDATE SET run_at = now() + interval '1 hour'",
                TENANT_A,
            )
    row = await one(admin_pool, "SELECT state::text, run_at > now() AS later FROM tenantry.jobs")
    assert tuple(row) == ("scheduled", True)
    got = await worker_pool.fetch(
        "SELECT id FROM tenantry.claim_jobs('default', 5, 'w', 30, NULL, NULL) WHERE id IS NOT NULL"
    )
    assert got == []


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("cannot print me")


@pytest.mark.parametrize(
    "error",
    [SystemExit(3), KeyboardInterrupt(), _Unprintable()],
    ids=["SystemExit", "KeyboardInterrupt", "unprintable"],
)
async def test_a_handler_that_raises_anything_fails_its_attempt_only(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool, error: BaseException
) -> None:
    """Regression: a handler raising SystemExit (argparse or click inside it) ended the
    whole process; an exception whose str() raised lost the job's outcome (it was
    retried only when its lease expired, its error never recorded)."""
    reg = Registry()

    @reg.handler("bad", policy=Policy(max_attempts=1))
    async def bad(job: Job) -> None:
        raise error

    @reg.handler("good")
    async def good(job: Job) -> None:
        return None

    bad_id = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="bad")
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="good")
    async with running_worker(pool, worker_pool, reg) as (_w, rec):
        await rec.wait_flushed(2)
    dead = await jobs.dead_show(worker_pool, bad_id)
    assert dead["reason"] == "exhausted"
    assert type(error).__name__ in dead["last_error"]
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0


@pytest.mark.parametrize("delay", [float("nan"), float("inf"), -1.0, 1e12])
def test_a_snooze_delay_must_be_a_sane_number_of_seconds(delay: float) -> None:
    with pytest.raises(ValueError):
        Snooze(delay)


async def test_a_jobs_log_lines_carry_the_request_id_that_enqueued_it(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    """An operator follows one sign-up from its request into its jobs: every line a
    job's task logs, the handler's own included, carries the request's id."""
    reg = Registry()

    @reg.handler("traced", policy=Policy(max_attempts=1))
    async def traced(job: Job) -> None:
        log.get("handler").warning("handler_says")
        raise RuntimeError("and fails")

    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="traced", payload={"request_id": "req-7"})
    with structlog.testing.capture_logs(processors=[merge_contextvars]) as logs:
        async with running_worker(pool, worker_pool, reg) as (_w, rec):
            await rec.wait_flushed(1)
    lines = {e["event"]: e for e in logs if e["event"] in ("handler_says", "job_dead")}
    assert lines.keys() == {"handler_says", "job_dead"}
    assert {e.get("request_id") for e in lines.values()} == {"req-7"}
