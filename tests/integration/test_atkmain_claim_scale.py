"""ATKMAIN (pass): the fair claim (claim_jobs) over thousands of tenants with a cap,
delayed rows falling due, a paused queue and priorities, checked claim by claim: no row
twice, no tenant past its cap, and a claim short of its slots leaves no runnable row of
a tenant with room (and says more = false)."""

from __future__ import annotations

import random
import uuid

import pytest

from tenantry import db

TENANTS = 3000
CAP = 2
CLAIM = "SELECT * FROM tenantry.claim_jobs('bulk', $1, 'atk', 30, $2, $3)"
RUNNABLE_WITH_ROOM = """
SELECT count(*) FROM tenantry.jobs j
 WHERE j.queue = 'bulk' AND (j.state = 'queued' OR (j.state = 'scheduled' AND j.run_at <= now()))
   AND ($1::integer IS NULL OR (SELECT count(*) FROM tenantry.jobs r WHERE r.queue = 'bulk'
         AND r.tenant_id = j.tenant_id AND r.state = 'running') < $1)
"""


@pytest.mark.parametrize("cap", [CAP, None])
@pytest.mark.timeout(600)
async def test_atkmain_claims_over_thousands_of_tenants(database_url: str, cap: int | None) -> None:
    rnd = random.Random(cap)
    conn = await db.connect(database_url)
    try:
        tenants = sorted(uuid.UUID(int=rnd.getrandbits(128)) for _ in range(TENANTS))
        await conn.execute(
            "INSERT INTO tenantry.jobs (tenant_id, kind, queue, priority, state, run_at)"
            " SELECT t, 'k', 'bulk', (g % 3)::smallint,"
            "        (CASE WHEN g % 4 = 0 THEN 'scheduled' ELSE 'queued' END)::tenantry.job_state,"
            "        now() - (g % 4) * interval '1 second'"
            "   FROM unnest($1::uuid[]) t, generate_series(1, 1 + (hashtext(t::text) & 3)) g",
            tenants,
        )
        await conn.execute("ANALYZE tenantry.jobs")
        cursor: uuid.UUID | None = None
        seen: set[int] = set()
        for i in range(400):
            if i == 50:
                await conn.execute(
                    "INSERT INTO tenantry.queue_controls (queue, paused, updated_by)"
                    " VALUES ('bulk', true, 'atk')"
                )
                rows = await conn.fetch(CLAIM, 40, cursor, cap)
                assert [r["id"] for r in rows if r["id"] is not None] == []
                await conn.execute("DELETE FROM tenantry.queue_controls WHERE queue = 'bulk'")
            n = rnd.choice([1, 7, 40, 250])
            rows = await conn.fetch(CLAIM, n, cursor, cap)
            got = [r for r in rows if r["id"] is not None]
            state = rows[-1]
            assert state["id"] is None
            ids = {r["id"] for r in got}
            assert len(ids) == len(got) and not ids & seen, "a row claimed twice"
            seen |= ids
            if cap is not None:
                worst = await conn.fetchval(
                    "SELECT max(c) FROM (SELECT count(*) c FROM tenantry.jobs WHERE queue = 'bulk'"
                    " AND state = 'running' GROUP BY tenant_id) x"
                )
                assert worst is None or worst <= cap
            if state["more"] is False:
                left = await conn.fetchval(RUNNABLE_WITH_ROOM, cap)
                assert left == 0, (i, n, len(got), left)
            cursor = state["cursor_after"]
            # Finish some running rows (their tenants get room again).
            if rnd.random() < 0.5:
                await conn.execute(
                    "DELETE FROM tenantry.jobs WHERE id IN (SELECT id FROM tenantry.jobs"
                    " WHERE queue = 'bulk' AND state = 'running' ORDER BY random() LIMIT $1)",
                    rnd.randint(1, 300),
                )
        remaining = await conn.fetchval("SELECT count(*) FROM tenantry.jobs WHERE queue = 'bulk'")
        assert remaining >= 0
    finally:
        await conn.close()
