"""ATKMAIN: adversarial tests of the wake-up gate, the fair claim, the welcome mail and
the fan-out's read bounds (the changes merged up to e54887d)."""

from __future__ import annotations

import asyncpg
import pytest

from tenantry.jobs import queue as jobs
from tenantry.tenancy import tenant_tx
from tests.helpers import TENANT_A

# hashtext('capped-100511') = hashtext('tenantry_jobs:q-6433') = -724815250: a capped
# queue whose claim lock has the key of another queue's wake-up gate (both class
# 0x7E4C = 32332).  Found by joining 300,000 names of each kind on their hash.
CAPPED_QUEUE = "capped-100511"
GATED_QUEUE = "q-6433"


@pytest.mark.parametrize(
    "capped_queue",
    [
        pytest.param(CAPPED_QUEUE, id="hash-collision"),
        pytest.param(f"tenantry_jobs:{GATED_QUEUE}", id="name-is-the-gate-key"),
    ],
)
async def test_atkmain_a_capped_claim_is_not_held_up_by_another_queues_quiet_producer(
    pool: asyncpg.Pool, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, capped_queue: str
) -> None:
    """The capped claim's turn-taking lock (claim_jobs: pg_advisory_xact_lock(32332,
    hashtext(queue))) and the wake-up gate (wake_at_commit: the shared
    pg_try_advisory_xact_lock_shared(32332, hashtext('tenantry_jobs:' || queue))) share
    one lock class, so their keys meet whenever hashtext(A) = hashtext('tenantry_jobs:'
    || B): a queue named 'tenantry_jobs:B' (queue names are any 1-100 characters), or a
    32-bit collision (one expected among ~65,000 queue names of each side).  A producer
    on B that stays quiet behind the gate (for as long as its transaction lasts when it
    set its constraints IMMEDIATE) then blocks every capped claim of A until the
    worker's lock_timeout (5 s) fails it: A's jobs stop starting."""
    assert await admin_pool.fetchval(
        "SELECT hashtext($1) = hashtext('tenantry_jobs:' || $2)", capped_queue, GATED_QUEUE
    )
    await worker_pool.execute("SELECT tenantry.ensure_wake_keys($1)", [GATED_QUEUE])
    # A wake-up is pending on the gated queue: its producers stay quiet, behind the gate.
    await worker_pool.execute(
        "UPDATE tenantry.notify_throttle SET last_at = now() + interval '1 hour' WHERE key = $1",
        f"tenantry_jobs:{GATED_QUEUE}",
    )
    await jobs.enqueue(pool, tenant_id=TENANT_A, kind="x", queue=capped_queue)
    async with tenant_tx(pool, TENANT_A) as open_tx:
        await open_tx.execute("SET CONSTRAINTS ALL IMMEDIATE")
        await jobs.enqueue(open_tx, tenant_id=TENANT_A, kind="x", queue=GATED_QUEUE)
        held = await admin_pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND mode = 'ShareLock' AND granted"
        )
        assert held == 1, "the producer did not stay quiet behind the gate"
        async with worker_pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '500ms'")
            try:
                rows = await conn.fetch(
                    "SELECT * FROM tenantry.claim_jobs($1, 10, 'atkmain', 30, NULL, 1)",
                    capped_queue,
                )
            except asyncpg.LockNotAvailableError:
                pytest.fail(
                    f"the capped claim of {capped_queue!r} waited for the gate of"
                    f" {GATED_QUEUE!r} (lock class 32332 shared)"
                )
        assert [r["id"] for r in rows if r["id"] is not None], "the capped job was not claimed"
