"""Queue controls: a pause and a concurrency that live in the database, so that every
process follows them, whichever set them."""

from __future__ import annotations

import anyio
import asyncpg
import orjson

from tenantry.errors import Invalid
from tenantry.jobs import queue as jobs
from tenantry.jobs.model import Job
from tenantry.jobs.registry import Registry
from tests.helpers import TENANT_A, function_statement, running_worker

CLAIM = "SELECT id, more FROM tenantry.claim_jobs('default', 10, 'w', 30, NULL, NULL)"


async def test_a_paused_queue_hands_out_nothing_until_resumed(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    ids = {await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k") for _ in range(3)}
    paused = await jobs.set_queue_control(worker_pool, "default", "test", paused=True)
    assert paused.paused and paused.updated_by == "test"
    rows = await worker_pool.fetch(CLAIM)
    # Only the claim's state row: nothing claimed, and nothing said to remain.
    assert [(r["id"], r["more"]) for r in rows] == [(None, False)]
    # Another queue is not paused by it.
    other = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k", queue="other")
    got = await worker_pool.fetch(
        "SELECT id FROM tenantry.claim_jobs('other', 10, 'w', 30, NULL, NULL) WHERE id IS NOT NULL"
    )
    assert [r["id"] for r in got] == [other]
    await jobs.set_queue_control(worker_pool, "default", "test", paused=False)
    rows = await worker_pool.fetch(CLAIM)
    assert {r["id"] for r in rows if r["id"] is not None} == ids


async def test_controls_are_listed_and_validated(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k", queue="mail")
    await jobs.set_queue_control(worker_pool, "reports", "ops", concurrency=3)
    listed = {c.queue: c for c in await jobs.queue_controls(worker_pool)}
    assert set(listed) == {"mail", "reports"}
    assert not listed["mail"].paused and listed["mail"].concurrency is None
    assert listed["reports"].concurrency == 3 and listed["reports"].updated_by == "ops"
    # A pause leaves the concurrency as it was; clearing it leaves the pause.
    await jobs.set_queue_control(worker_pool, "reports", "ops", paused=True)
    c = await jobs.set_queue_control(worker_pool, "reports", "ops", clear_concurrency=True)
    assert c.paused and c.concurrency is None
    for bad in ({"concurrency": 0}, {"concurrency": 10_001}):
        try:
            await jobs.set_queue_control(worker_pool, "reports", "ops", **bad)  # type: ignore[arg-type]
        except Invalid as exc:
            assert exc.field == "concurrency"
        else:
            raise AssertionError(f"{bad} accepted")
    try:
        await jobs.set_queue_control(worker_pool, "q" * 101, "ops", paused=True)
    except Invalid as exc:
        assert exc.field == "queue"
    else:
        raise AssertionError("a bad queue name was accepted")


async def test_the_service_login_cannot_set_controls(pool: asyncpg.Pool) -> None:
    try:
        await jobs.set_queue_control(pool, "default", "tenant code", paused=True)
    except asyncpg.InsufficientPrivilegeError:
        pass
    else:
        raise AssertionError("tenant code paused a queue")


async def test_a_running_worker_follows_a_pause_and_a_resume(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    ran: list[int] = []
    reg = Registry()

    @reg.handler("k")
    async def k(job: Job) -> None:
        ran.append(job.id)

    async with running_worker(pool, worker_pool, reg) as (worker, rec):
        loop = worker.loops["default"]
        await jobs.set_queue_control(worker_pool, "default", "test", paused=True)
        await rec.wait_for(lambda: loop.paused)
        ids = [await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k") for _ in range(3)]
        # Three more polls of the paused queue (each reads its controls): nothing ran.
        seen = len(rec.named("controls_read"))
        await rec.wait_for(lambda: len(rec.named("controls_read")) >= seen + 3)
        assert ran == []
        assert not rec.named("claimed")
        await jobs.set_queue_control(worker_pool, "default", "test", paused=False)
        await rec.wait_flushed(3)
    assert sorted(ran) == sorted(ids)


async def test_a_pause_hands_back_what_the_worker_had_prefetched(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    gate = anyio.Event()
    started: list[int] = []
    reg = Registry()

    @reg.handler("k")
    async def k(job: Job) -> None:
        started.append(job.id)
        await gate.wait()

    first = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k")
    second = await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k")
    # One slot and one row of prefetch: the second job is claimed and waits.
    async with running_worker(pool, worker_pool, reg, queues={"default": 1}, prefetch=1.0) as (
        worker,
        rec,
    ):
        loop = worker.loops["default"]
        await rec.wait_for(lambda: len(started) == 1 and len(loop.ready) == 1)
        await jobs.set_queue_control(worker_pool, "default", "test", paused=True)
        await rec.wait_for(lambda: loop.paused and not loop.ready)
        await rec.wait_flushed(1)  # the hand-back is written
        row = await admin_pool.fetchrow(
            "SELECT state, lease_owner, attempts FROM tenantry.jobs WHERE id = $1", second
        )
        assert row is not None
        assert (row["state"], row["lease_owner"], row["attempts"]) == ("queued", None, 0)
        gate.set()  # the running job finishes; the paused queue starts nothing more
        await rec.wait_flushed(2)
        seen = len(rec.named("controls_read"))
        await rec.wait_for(lambda: len(rec.named("controls_read")) >= seen + 2)
        assert started == [first]


async def test_a_concurrency_set_in_the_database_overrides_the_process(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    gate = anyio.Event()
    running = 0
    most = 0
    reg = Registry()

    @reg.handler("k")
    async def k(job: Job) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await gate.wait()
        finally:
            running -= 1

    await jobs.set_queue_control(worker_pool, "default", "test", concurrency=1)
    # The jobs wait before the process starts: its first claim already follows the
    # operator's concurrency (the loop reads the controls before it claims).
    for _ in range(4):
        await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k")
    async with running_worker(pool, worker_pool, reg, queues={"default": 5}) as (worker, rec):
        loop = worker.loops["default"]
        await rec.wait_for(lambda: running == 1)
        assert loop.concurrency == 1
        seen = len(rec.named("controls_read"))
        await rec.wait_for(lambda: len(rec.named("controls_read")) >= seen + 2)
        assert running == 1 and most == 1
        # Back to the process's own: five at once.
        await jobs.set_queue_control(worker_pool, "default", "test", clear_concurrency=True)
        await rec.wait_for(lambda: running == 4)
        assert loop.concurrency == 5
        gate.set()
        await rec.wait_flushed(4)
    assert most == 4


async def test_listing_the_queues_reads_index_heads_not_the_table(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """Regression: the list walked tenantry.jobs without a state, which no index of the
    table covers: a full scan per queue (1,305 queues over 300,000 jobs: 60 s, then the
    statement timeout).  Now every probe is an index range, whatever the table holds."""
    for q in ("a", "b", "c"):
        await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k", queue=q)
    statement = function_statement("queue_controls_list")
    async with admin_pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {statement}")
    nodes = []
    stack = [(plan if isinstance(plan, list) else orjson.loads(plan))[0]["Plan"]]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack += node.get("Plans", [])
    scanned = [n for n in nodes if n.get("Relation Name") == "jobs"]
    assert scanned and all(n["Node Type"] != "Seq Scan" for n in scanned), [
        (n["Node Type"], n.get("Index Name")) for n in scanned
    ]
