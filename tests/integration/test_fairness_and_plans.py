"""The claim: runnable rows only, global priority, fairness among tenants, caps that
never halt it, the system tenant, and the plans of its statements."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime

import anyio
import asyncpg
import pytest

from tenantry.jobs import queue as jobs
from tenantry.jobs.model import Job
from tenantry.jobs.registry import Registry
from tenantry.jobs.worker import Q, Worker, WorkerConfig
from tenantry.tenancy import SYSTEM_TENANT
from tests.helpers import TENANT_A, TENANT_B, function_statement, running_worker


def probe_worker(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, concurrency: int, **config: object
) -> Worker:
    """A worker whose claims a test calls by hand (it never runs)."""
    return Worker(
        pool,
        Registry(),
        WorkerConfig(queues={"default": concurrency}, **config),  # type: ignore[arg-type]
        owner=f"probe-{uuid.uuid4().hex[:6]}",
        worker_pool=worker_pool,
    )


def low_tenants(n: int) -> list[uuid.UUID]:
    """Tenant ids that sort before any random one (the claim walks tenants in order)."""
    return [uuid.UUID(int=i + 1) for i in range(n)]


HIGH = uuid.UUID("ffffffff-0000-0000-0000-000000000001")


async def test_noisy_tenant_does_not_starve_another(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """50,000 of A's jobs are queued; B's job, enqueued after them, starts next."""
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind) "
        "SELECT $1, 'work' FROM generate_series(1, 50000)",
        TENANT_A,
    )
    await admin_pool.execute("ANALYZE tenantry.jobs")
    order: list[uuid.UUID] = []
    gate = anyio.Event()
    reg = Registry()

    @reg.handler("work")
    async def work(job: Job) -> None:
        order.append(job.tenant_id)
        if job.tenant_id == TENANT_B:
            gate.set()

    async with running_worker(pool, worker_pool, reg, queues={"default": 20}) as (_w, rec):
        await rec.wait_for(lambda: len(order) >= 40)
        await jobs.enqueue(pool, tenant_id=TENANT_B, kind="work")
        mark = len(order)
        await rec.wait_for(gate.is_set)
        # B ran within the next couple of claims, not after A's backlog: ahead of it
        # at most the rows already claimed when it was enqueued (20 slots, 10
        # prefetched, a claim of 30 in flight) and one more claim whose snapshot
        # predates B's commit.
        assert order.index(TENANT_B) - mark <= 20 + 10 + 30 + 30


async def test_claim_interleaves_tenants_and_fills_its_slots(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind) SELECT $1, 'w' FROM generate_series(1, 100)",
        TENANT_A,
    )
    await jobs.enqueue(pool, tenant_id=TENANT_B, kind="w")
    got = await probe_worker(pool, worker_pool, 4).claim("default", 4, None)
    assert got is not None
    # Both tenants' first rows come first; B has no more, so A fills the rest.
    assert [r["tenant_id"] for r in got.rows[:2]] == [TENANT_A, TENANT_B]
    assert sorted(r["tenant_id"] for r in got.rows) == [TENANT_A] * 3 + [TENANT_B]
    assert got.more  # A has more


async def test_a_lone_tenant_is_claimed_in_order_past_rows_another_claim_holds(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """One tenant alone at a priority is claimed as a range scan that locks as it goes
    (claim_jobs_of): rows another claim holds are stepped over and the claim still
    fills its slots from the rows behind them, in the tenant's order, then goes on to
    the next priority.  (The walk's round chose its rows first and lost the held ones.)"""
    high = [await jobs.enqueue(pool, tenant_id=TENANT_A, kind="w", priority=5) for _ in range(4)]
    low = [await jobs.enqueue(pool, tenant_id=TENANT_A, kind="w") for _ in range(3)]
    async with admin_pool.acquire() as other:
        tx = other.transaction()
        await tx.start()
        # Another claim holds A's first two urgent rows.
        await other.execute("SELECT 1 FROM tenantry.jobs WHERE id = ANY($1) FOR UPDATE", high[:2])
        got = await probe_worker(pool, worker_pool, 4).claim("default", 4, None)
        await tx.rollback()
    assert got is not None
    assert [r["id"] for r in got.rows] == high[2:] + low[:2]
    assert got.more and got.cursor == TENANT_A


async def test_per_tenant_cap(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind) SELECT $1, 'w' FROM generate_series(1, 10)",
        TENANT_A,
    )
    w = probe_worker(pool, worker_pool, 10, tenant_concurrency=3)
    first = await w.claim("default", 10, None)
    assert first is not None and len(first.rows) == 3 and not first.more
    again = await w.claim("default", 10, first.cursor)
    assert again is not None and again.rows == [] and not again.more  # A holds its three


async def test_a_claim_cut_short_by_its_slots_says_more_remain(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression (found by the model test): with a cap, each tenant's share equalled
    its room, so a round whose candidates outnumbered its slots counted every tenant as
    done, and the claim said nothing was left while a row of a tenant with room was."""
    for t, n in ((TENANT_A, 2), (TENANT_B, 2)):
        for _ in range(n):
            await jobs.enqueue(pool, tenant_id=t, kind="w")
    w = probe_worker(pool, worker_pool, 3, tenant_concurrency=2)
    first = await w.claim("default", 3, None)
    assert first is not None and len(first.rows) == 3 and first.more
    second = await w.claim("default", 1, first.cursor)
    assert second is not None and len(second.rows) == 1


async def test_tenants_whose_jobs_are_all_delayed_do_not_halt_the_others(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: fifteen low-id tenants, each with one job due in an hour, took the
    walk's places (concurrency 10, prefetch 0.5: 15 tenants a claim), so a high-id
    tenant's five runnable jobs did not start for as long as those rows waited."""
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind, run_at)"
        " SELECT t, 'later', now() + interval '1 hour' FROM unnest($1::uuid[]) t",
        low_tenants(15),
    )
    for _ in range(5):
        await jobs.enqueue(pool, tenant_id=HIGH, kind="now")
    reg = Registry()
    started: list[uuid.UUID] = []

    @reg.handler("now")
    async def now(job: Job) -> None:
        started.append(job.tenant_id)

    async with running_worker(pool, worker_pool, reg, queues={"default": 10}) as (_w, rec):
        await rec.wait_for(lambda: len(started) == 5, timeout=5)
    states = await admin_pool.fetch("SELECT state, count(*) FROM tenantry.jobs GROUP BY 1")
    assert {r["state"]: r["count"] for r in states} == {"scheduled": 15}


async def test_tenants_at_their_cap_do_not_halt_the_others(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: with a cap of 1 and eight low-id tenants busy, a ninth tenant's job
    never started while two slots stood free."""
    busy = low_tenants(8)
    for t in busy:
        for _ in range(3):
            await jobs.enqueue(pool, tenant_id=t, kind="hold")
    reg = Registry()
    release = anyio.Event()
    ninth_ran = anyio.Event()

    @reg.handler("hold")
    async def hold(job: Job) -> None:
        await release.wait()

    @reg.handler("ninth")
    async def ninth(job: Job) -> None:
        ninth_ran.set()

    async with running_worker(
        pool, worker_pool, reg, queues={"default": 10}, tenant_concurrency=1, prefetch=0.0
    ) as (_w, rec):
        await rec.wait_for(lambda: len(rec.named("started")) == 8)
        await jobs.enqueue(pool, tenant_id=HIGH, kind="ninth")
        with anyio.fail_after(5):
            await ninth_ran.wait()
        release.set()


async def test_a_high_priority_job_goes_first_across_all_tenants(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: with 200 tenants, a priority-100 job ran in claim 14, after 195
    priority-0 jobs: priority was honoured only within the window a claim walked."""
    tenants = sorted(uuid.uuid4() for _ in range(200))
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind) SELECT t, 'w' FROM unnest($1::uuid[]) t",
        tenants,
    )
    urgent = await jobs.enqueue(pool, tenant_id=tenants[-1], kind="w", priority=100)
    got = await probe_worker(pool, worker_pool, 15).claim("default", 15, None)
    assert got is not None and len(got.rows) == 15
    assert got.rows[0]["id"] == urgent
    assert [r["priority"] for r in got.rows[1:]] == [0] * 14


async def test_the_system_tenants_jobs_are_claimed(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: the walk started after the nil UUID, so the system tenant's rows
    (every periodic job by default) were never claimed."""
    job_id = await jobs.enqueue(pool, tenant_id=SYSTEM_TENANT, kind="w")
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="w")
    w = probe_worker(pool, worker_pool, 1)
    seen: list[int] = []
    cursor = None
    for _ in range(2):
        got = await w.claim("default", 1, cursor)
        assert got is not None
        seen += [r["id"] for r in got.rows]
        cursor = got.cursor
    assert job_id in seen


async def test_cursor_rotates_through_many_tenants(
    worker_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    tenants = sorted(uuid.uuid4() for _ in range(30))
    for t in tenants:
        await jobs.enqueue(pool, tenant_id=t, kind="w")
    reg = Registry()
    seen: list[uuid.UUID] = []

    @reg.handler("w")
    async def w(job: Job) -> None:
        seen.append(job.tenant_id)

    async with running_worker(pool, worker_pool, reg, queues={"default": 4}) as (_w, rec):
        await rec.wait_flushed(30)
    assert sorted(seen) == tenants


async def test_due_jobs_are_staged_and_claimed(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """A scheduled job becomes runnable once due, staged by the claim itself."""
    later = datetime(2000, 1, 1, tzinfo=UTC)  # a plain INSERT with a future run_at...
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind, run_at) VALUES ($1, 'w', now() + '1h')",
        TENANT_A,
    )
    assert await admin_pool.fetchval("SELECT state::text FROM tenantry.jobs") == "scheduled"
    w = probe_worker(pool, worker_pool, 5)
    got = await w.claim("default", 5, None)
    assert got is not None and got.rows == [] and not got.more
    await admin_pool.execute("UPDATE tenantry.jobs SET run_at = $1", later)  # ...falls due
    got = await w.claim("default", 5, None)
    assert got is not None and len(got.rows) == 1


async def test_claim_uses_its_partial_index(admin_pool: asyncpg.Pool, pool: asyncpg.Pool) -> None:
    tenants = [uuid.uuid4() for _ in range(50)]
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind) "
        "SELECT t, 'w' FROM unnest($1::uuid[]) t, generate_series(1, 400)",
        tenants,
    )
    await admin_pool.execute("ANALYZE tenantry.jobs")
    claim = function_statement("claim_jobs_at")
    async with admin_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        rows = await conn.fetch(
            "EXPLAIN (ANALYZE, COSTS OFF) " + claim, "default", 0, 50, "probe", 30.0, None, None, 50
        )
        await tx.rollback()
    plan = "\n".join(r[0] for r in rows)
    # The tenant walk and the per-tenant fetch both run on the claim index...
    assert plan.count("jobs_claim_idx") >= 2, plan
    # ...and nothing reads the whole table.
    assert "Seq Scan on jobs" not in plan, plan


async def test_outcome_and_lease_statements_look_jobs_up_by_primary_key(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: with statistics saying no job runs (the usual case right after an
    ANALYZE), `state = 'running'` in a completion made the planner scan the whole
    partial running index once per key; under load one batch completion took 48 s."""
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind) "
        "SELECT t, 'w' FROM unnest($1::uuid[]) t, generate_series(1, 2000)",
        [uuid.uuid4() for _ in range(4)],
    )
    await admin_pool.execute("VACUUM ANALYZE tenantry.jobs")
    claimed = await admin_pool.fetch(Q["claim"], "default", 200, "probe", 30.0, None, None)
    claimed = [r for r in claimed if r["id"] is not None]
    assert len(claimed) == 200
    tids = [r["tenant_id"] for r in claimed]
    ids = [r["id"] for r in claimed]
    now = [datetime.now(UTC)] * len(ids)
    n = len(ids)
    outcome_args: tuple[object, ...] = (
        "probe",
        tids, ids,
        tids, ids, now, [None] * n, [None] * n, [True] * n, [False] * n,
        tids, ids, ["x"] * n, [{}] * n, ["permanent"] * n, [None] * n, [False] * n,
        tids, ids,
    )  # fmt: skip
    statements: dict[str, tuple[object, ...]] = {
        "record_job_outcomes": outcome_args,
        "extend_job_leases": (tids, ids, "probe", 30.0),
    }
    for name, args in statements.items():
        # The function's statement, explained by a superuser: like the function's
        # owner, it bypasses row-level security.
        sql = function_statement(name)
        async with admin_pool.acquire() as conn:
            # A generic plan is what a long-lived prepared statement ends up with.
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            tx = conn.transaction()
            await tx.start()
            rows = await conn.fetch("EXPLAIN (COSTS OFF) " + sql, *args)
            await tx.rollback()
            await conn.execute("RESET plan_cache_mode")
        plan = "\n".join(r[0] for r in rows)
        assert "jobs_running_idx" not in plan, f"{name}:\n{plan}"
        assert "Seq Scan on jobs" not in plan, f"{name}:\n{plan}"
        assert "Index Scan using jobs_pkey" in plan, f"{name}:\n{plan}"
        assert "Tid Scan on jobs" in plan, f"{name}:\n{plan}"


@pytest.mark.parametrize("analyzed", ["empty", "full"])
@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
async def test_claim_plan_does_not_depend_on_statistics(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool, analyzed: str, plan_mode: str
) -> None:
    """Regression: statistics from an empty queue (what autovacuum usually sees) made
    the planner serve the claim from the wrong index and sort the whole backlog on
    every claim: 0.7 s per claim with 40,000 queued jobs.  The claim connections use
    generic plans (db.CLAIM_SETTINGS), so both kinds must hold up, with either
    statistics."""
    if analyzed == "empty":
        await admin_pool.execute("ANALYZE tenantry.jobs")
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind) "
        "SELECT t, 'w' FROM unnest($1::uuid[]) t, generate_series(1, 5000)",
        [uuid.uuid4() for _ in range(4)],
    )
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind, run_at) "
        "SELECT t, 'w', now() + interval '1 hour' FROM unnest($1::uuid[]) t, "
        "generate_series(1, 5000)",
        [uuid.uuid4() for _ in range(4)],
    )
    if analyzed == "full":
        await admin_pool.execute("ANALYZE tenantry.jobs")
    first = await admin_pool.fetchrow(
        "SELECT tenant_id, run_at, id FROM tenantry.jobs WHERE state = 'queued'"
        " ORDER BY tenant_id, run_at, id LIMIT 1"
    )
    assert first is not None
    lone_tenant = (first["tenant_id"], first["run_at"], first["id"])
    for name, args in (
        ("claim_jobs_at", ("default", 0, 100, "probe", 30.0, None, 3, 100)),
        ("claim_jobs_of", ("default", 0, *lone_tenant, 100, "probe", 30.0)),
        ("stage_due_jobs", ("default", 1000)),
    ):
        sql = function_statement(name)
        async with admin_pool.acquire() as conn:
            await conn.execute(f"SET plan_cache_mode = {plan_mode}")
            tx = conn.transaction()
            await tx.start()
            rows = await conn.fetch("EXPLAIN (COSTS OFF) " + sql, *args)
            await tx.rollback()
            await conn.execute("RESET plan_cache_mode")
        plan = "\n".join(r[0] for r in rows)
        assert "Seq Scan on jobs" not in plan, f"{name}:\n{plan}"
        if name == "claim_jobs_at":
            assert plan.count("jobs_claim_idx") >= 2, plan
            assert "Sort" not in plan.split("CTE candidates")[0], plan  # no sort in the walk
        elif name == "claim_jobs_of":
            # One range of the claim index, locked as it is read: no sort before the
            # LIMIT (the one sort orders the claimed rows it returns).
            assert "Index Scan using jobs_claim_idx" in plan, plan
            assert "Sort" not in plan.split("CTE picked")[1].split("CTE claimed")[0], plan
        else:
            assert "jobs_scheduled_idx" in plan, plan


async def test_backlogged_tenants_are_served_evenly_over_many_claims(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Round robin across claims: however the claims' sizes vary, tenants that stay
    backlogged never drift more than a row or two apart."""
    tenants = [SYSTEM_TENANT, *low_tenants(3), HIGH]
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind)"
        " SELECT t, 'w' FROM unnest($1::uuid[]) t, generate_series(1, 200)",
        tenants,
    )
    w = probe_worker(pool, worker_pool, 20)
    served: Counter[uuid.UUID] = Counter()
    cursor = None
    for size in [1, 2, 3, 7, 1, 12, 5, 4, 9, 2, 11, 3, 1, 6, 8, 10, 2, 2, 5, 7] * 5:
        got = await w.claim("default", size, cursor)
        assert got is not None and len(got.rows) == size
        cursor = got.cursor
        served.update(r["tenant_id"] for r in got.rows)
        counts = [served[t] for t in tenants]
        assert max(counts) - min(counts) <= 1, counts
