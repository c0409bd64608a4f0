"""Claims racing each other on one queue (separate connections, so separate backends):
no row is ever held by two claims at once, whichever way the claim goes (one tenant
alone at a priority: the range scan of claim_jobs_of; several: the walk and its lock by
ctid), while rows are enqueued, completed and put back as runnable behind the claims'
backs (new row versions at new ctids, and rows that sort before where a claim starts)."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import pytest

from tenantry import db

TENANT_SETS = {
    "one tenant": [uuid.UUID(int=5)],
    "two tenants": [uuid.UUID(int=5), uuid.UUID(int=2**128 - 1)],
    "many tenants": [uuid.UUID(int=i) for i in range(1, 40)],
}
CLAIMERS = 4
CLAIMS_EACH = 150

CLAIM = "SELECT * FROM tenantry.claim_jobs('default', $1, $2, 30, $3, NULL)"
# Both statements touch the row only if this claim still holds it: a row another claim
# took over as well would show here as 0 rows.
PUT_BACK = (
    "UPDATE tenantry.jobs SET state = 'queued', run_at = now() - interval '1 hour',"
    " lease_owner = NULL WHERE id = $1 AND lease_owner = $2 AND state = 'running'"
)
COMPLETE = "DELETE FROM tenantry.jobs WHERE id = $1 AND lease_owner = $2 AND state = 'running'"


@pytest.mark.parametrize("tenant_set", sorted(TENANT_SETS))
async def test_racing_claims_never_hold_a_row_twice(database_url: str, tenant_set: str) -> None:
    tenants = TENANT_SETS[tenant_set]
    rnd = random.Random(tenant_set)
    conns = [await db.connect(database_url) for _ in range(CLAIMERS + 1)]
    enqueuer, claimers = conns[0], conns[1:]
    lost: list[tuple[int, str]] = []
    try:
        await enqueuer.execute(
            "INSERT INTO tenantry.jobs (tenant_id, kind, priority)"
            " SELECT t, 'k', (g % 2)::smallint FROM unnest($1::uuid[]) t,"
            " generate_series(1, 1500 / $2) g",
            tenants,
            len(tenants),
        )

        async def enqueue() -> None:
            for _ in range(300):
                # Some rows due in the past: they sort before rows already queued.
                await enqueuer.execute(
                    "INSERT INTO tenantry.jobs (tenant_id, kind, priority, run_at)"
                    " VALUES ($1, 'k', $2, now() - $3 * interval '1 second')",
                    rnd.choice(tenants),
                    rnd.choice([0, 1]),
                    rnd.choice([0, 0, 100]),
                )

        async def claim(conn: asyncpg.Connection, name: str) -> None:
            cursor = None
            for i in range(CLAIMS_EACH):
                owner = f"{name}-{i}"
                rows = await conn.fetch(CLAIM, rnd.choice([1, 3, 10]), owner, cursor)
                cursor = rows.pop()["cursor_after"]
                for r in rows:
                    sql = PUT_BACK if rnd.random() < 0.3 else COMPLETE
                    if await conn.execute(sql, r["id"], owner) != (
                        "UPDATE 1" if sql is PUT_BACK else "DELETE 1"
                    ):
                        lost.append((r["id"], owner))

        await asyncio.gather(enqueue(), *(claim(c, f"claimer{k}") for k, c in enumerate(claimers)))
        # Then one claim at a time drains the rest: every row comes out, once.
        while True:
            rows = await claimers[0].fetch(CLAIM, 50, "drain", None)
            state = rows.pop()
            for r in rows:
                assert await claimers[0].execute(COMPLETE, r["id"], "drain") == "DELETE 1"
            if not rows:
                assert not state["more"]
                break
        assert not lost, f"rows another claim took over as well: {lost}"
        assert await enqueuer.fetchval("SELECT count(*) FROM tenantry.jobs") == 0
    finally:
        for c in conns:
            await c.close()
