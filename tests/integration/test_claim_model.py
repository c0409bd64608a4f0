"""A model-based test of the claim (hypothesis stateful): random tenants, delays,
priorities, caps, retries and completions against the real `tenantry.claim_jobs`, with
a model of which rows are runnable, checked after every claim:

- only runnable rows are claimed, and at most once at a time;
- caps hold: no tenant ever runs more than its cap;
- priority is global: no row is left runnable, for a tenant with room, at a higher
  priority than a row that was claimed;
- the claim never halts: a claim that returns fewer rows than asked leaves no
  runnable row for a tenant with room, and says so (`more` is false);
- fairness: among the tenants that still have rows of the claim's lowest priority
  left, none got two rows fewer than another in that claim; and a tenant with rows
  at the top priority and room is served within as many claims as there are tenants.

Some claims run while another transaction holds some runnable rows (locked, as a
concurrent claim holds the rows it chose): those rows are neither claimed nor counted
as left behind, and the claim must still fill its slots from the rest (the lone
tenant's range scan and the walk's first candidates both meet held rows).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tenantry import db
from tenantry.tenancy import SYSTEM_TENANT

# The system tenant (first of all), some in between, and the last possible id: the
# walk's wrap-around is exercised at both ends.
TENANTS = [
    SYSTEM_TENANT,
    uuid.UUID(int=1),
    uuid.UUID("55555555-0000-0000-0000-000000000000"),
    uuid.UUID("aaaaaaaa-0000-0000-0000-000000000000"),
    uuid.UUID("cccccccc-0000-0000-0000-000000000000"),
    uuid.UUID("ffffffff-ffff-ffff-ffff-fffffffffffe"),
    uuid.UUID("ffffffff-ffff-ffff-ffff-ffffffffffff"),
]
OWNER = "model"
NOW_SQL = "clock_timestamp()"


class SyncDb:
    """One superuser connection on an event loop of its own (hypothesis drives the
    machine synchronously, in a thread)."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        # Thousands of small transactions: none need wait for a disk flush (on a server
        # with fsync on, they made the test ten times slower).
        self.conn: asyncpg.Connection = self.loop.run_until_complete(
            db.connect(url, server_settings={"synchronous_commit": "off"})
        )

    def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = self.loop.run_until_complete(self.conn.fetch(sql, *args))
        return rows

    def execute(self, sql: str, *args: object) -> None:
        self.loop.run_until_complete(self.conn.execute(sql, *args))

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


@dataclass
class ModelJob:
    id: int
    tenant: uuid.UUID
    priority: int
    state: str  # "runnable", "later" (due in the future), "running"


def outcomes(
    *,
    done: list[ModelJob] = (),  # type: ignore[assignment]
    retry: list[tuple[ModelJob, datetime]] = (),  # type: ignore[assignment]
) -> tuple[Any, ...]:
    """record_job_outcomes' arguments for some completions and retries."""
    return (
        OWNER,
        [j.tenant for j in done],
        [j.id for j in done],
        [j.tenant for j, _ in retry],
        [j.id for j, _ in retry],
        [at for _, at in retry],
        ["boom"] * len(retry),
        [{"error": "boom"}] * len(retry),
        [False] * len(retry),
        [False] * len(retry),
        [], [], [], [], [], [], [],
        [], [],
    )  # fmt: skip


RECORD = (
    "SELECT tenantry.record_job_outcomes($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
    " $11, $12, $13, $14, $15, $16, $17, $18, $19)"
)


class ClaimMachine(RuleBasedStateMachine):
    conn: SyncDb  # set by the test before the machine runs
    other: SyncDb  # a second connection: the concurrent claim that holds rows

    def __init__(self) -> None:
        super().__init__()
        self.conn.execute("TRUNCATE tenantry.jobs, tenantry.job_counters, tenantry.dead_jobs")
        self.jobs: dict[int, ModelJob] = {}
        self.cap: int | None = None
        self.cursor: uuid.UUID | None = None
        self.starving: Counter[uuid.UUID] = Counter()

    @initialize(cap=st.sampled_from([None, None, 1, 2]))
    def choose_cap(self, cap: int | None) -> None:
        self.cap = cap

    # --- the model -------------------------------------------------------------------

    def running(self, tenant: uuid.UUID) -> int:
        return sum(1 for j in self.jobs.values() if j.tenant == tenant and j.state == "running")

    def has_room(self, tenant: uuid.UUID) -> bool:
        return self.cap is None or self.running(tenant) < self.cap

    def runnable(self, held: frozenset[int] = frozenset()) -> list[ModelJob]:
        """Runnable rows, but those another transaction holds."""
        return [j for j in self.jobs.values() if j.state == "runnable" and j.id not in held]

    def eligible(self, held: frozenset[int] = frozenset()) -> list[ModelJob]:
        """Runnable rows of tenants with room, but those another transaction holds."""
        return [j for j in self.runnable(held) if self.has_room(j.tenant)]

    # --- rules -----------------------------------------------------------------------

    @rule(
        tenant=st.sampled_from(TENANTS),
        priority=st.sampled_from([0, 0, 0, 1, 5]),
        later=st.booleans(),
        count=st.integers(1, 4),
    )
    def enqueue(self, tenant: uuid.UUID, priority: int, later: bool, count: int) -> None:
        run_at = f"{NOW_SQL} + interval '1 hour'" if later else NOW_SQL
        rows = self.conn.fetch(
            "INSERT INTO tenantry.jobs (tenant_id, kind, priority, run_at)"
            f" SELECT $1, 'k', $2, {run_at} FROM generate_series(1, $3)"
            " RETURNING id, state::text",
            tenant,
            priority,
            count,
        )
        for r in rows:
            assert r["state"] == ("scheduled" if later else "queued")
            self.jobs[r["id"]] = ModelJob(
                r["id"], tenant, priority, "later" if later else "runnable"
            )

    @precondition(lambda self: any(j.state == "later" for j in self.jobs.values()))
    @rule(data=st.data())
    def fall_due(self, data: st.DataObject) -> None:
        """Time passes for one scheduled row: it is due, and the next claim stages it."""
        later = sorted(j.id for j in self.jobs.values() if j.state == "later")
        job = self.jobs[data.draw(st.sampled_from(later))]
        self.conn.execute(
            "UPDATE tenantry.jobs SET run_at = now() - interval '1 second' WHERE id = $1", job.id
        )
        job.state = "runnable"

    @rule(n=st.integers(1, 12))
    def claim(self, n: int) -> None:
        self.check_claim(n, frozenset())

    # Only without a cap: with one, the claims of a queue take turns (an advisory lock),
    # so none meets rows another claim holds.
    @precondition(
        lambda self: self.cap is None and any(j.state == "runnable" for j in self.jobs.values())
    )
    @rule(n=st.integers(1, 12), data=st.data())
    def claim_while_rows_are_held(self, n: int, data: st.DataObject) -> None:
        """A claim while another transaction holds some runnable rows (a concurrent
        claim that chose them and has not committed yet)."""
        runnable = sorted(j.id for j in self.runnable())
        held = frozenset(data.draw(st.lists(st.sampled_from(runnable), min_size=1, unique=True)))
        self.other.execute("BEGIN")
        try:
            self.other.execute(
                "SELECT 1 FROM tenantry.jobs WHERE id = ANY($1::bigint[]) FOR UPDATE", sorted(held)
            )
            self.check_claim(n, held)
        finally:
            self.other.execute("ROLLBACK")

    def check_claim(self, n: int, held: frozenset[int]) -> None:
        before = self.eligible(held)
        top = max((j.priority for j in before), default=None)
        at_top = {j.tenant for j in before if j.priority == top}
        rows = self.conn.fetch(
            "SELECT * FROM tenantry.claim_jobs('default', $1, $2, 30, $3, $4)",
            n,
            OWNER,
            self.cursor,
            self.cap,
        )
        state = rows.pop()
        assert state["id"] is None  # the claim's state comes last
        self.cursor = state["cursor_after"]
        claimed = [self.jobs[r["id"]] for r in rows]
        # Only runnable rows, each once.
        assert len({j.id for j in claimed}) == len(claimed)
        for j in claimed:
            assert j.state == "runnable", f"claimed {j} which is not runnable"
            assert j.id not in held, f"claimed {j} which another transaction holds"
            j.state = "running"
        # Caps.
        if self.cap is not None:
            for t in TENANTS:
                assert self.running(t) <= self.cap, f"{t} runs {self.running(t)} > {self.cap}"
        left = self.eligible(held)
        # Global priority.
        if claimed:
            lowest = min(j.priority for j in claimed)
            higher = [j for j in left if j.priority > lowest]
            assert not higher, f"left {higher} behind while claiming priority {lowest}"
        # Never halts: short means nothing was left for a tenant with room.
        assert len(claimed) <= n
        if len(claimed) < n and not held:
            assert not left, f"claimed {len(claimed)} of {n} but left {left}"
            assert not state["more"], "said more while nothing was left"
        # With rows held, a round that chose them comes back short, but then says
        # more: the caller claims again at once.
        if not state["more"]:
            assert not left, f"said no more, but left {left}"
        # Capped: says so whenever a runnable row waits only for its tenant's cap (the
        # worker then claims again as jobs finish, not at its next poll).  It may say so
        # needlessly (a tenant that took its last row just as it reached the cap).
        held_back = [j for j in self.runnable(held) if not self.has_room(j.tenant)]
        if not state["more"] and held_back:
            assert state["capped"], f"not capped while {held_back} wait for their cap"
        if self.cap is None:
            assert not state["capped"]
        if held:
            # A tenant whose chosen rows another claim holds gets fewer this time.
            return
        # Fairness within the claim, at its lowest priority.
        if claimed:
            lowest = min(j.priority for j in claimed)
            got = Counter(j.tenant for j in claimed if j.priority == lowest)
            unsatisfied = {j.tenant for j in left if j.priority == lowest}
            for t in unsatisfied:
                most = max(got.values())
                assert got[t] >= most - 1, f"{t} got {got[t]} while another got {most}"
        # Fairness across claims: served within as many claims as there are tenants.
        served = {j.tenant for j in claimed}
        for t in TENANTS:
            if t in at_top and t not in served:
                self.starving[t] += 1
            else:
                self.starving[t] = 0
            assert self.starving[t] <= len(TENANTS), f"{t} starved for {self.starving[t]} claims"

    @precondition(lambda self: any(j.state == "running" for j in self.jobs.values()))
    @rule(data=st.data(), how=st.sampled_from(["complete", "retry_now", "retry_later"]))
    def finish(self, data: st.DataObject, how: str) -> None:
        running = sorted(j.id for j in self.jobs.values() if j.state == "running")
        picked = data.draw(st.lists(st.sampled_from(running), min_size=1, unique=True))
        jobs = [self.jobs[i] for i in picked]
        if how == "complete":
            self.conn.execute(RECORD, *outcomes(done=jobs))
            for j in jobs:
                del self.jobs[j.id]
            return
        now = datetime.now(UTC)
        at = now + timedelta(hours=1) if how == "retry_later" else now - timedelta(seconds=1)
        self.conn.execute(RECORD, *outcomes(retry=[(j, at) for j in jobs]))
        for j in jobs:
            j.state = "later" if how == "retry_later" else "runnable"

    @invariant()
    def database_agrees(self) -> None:
        rows = self.conn.fetch("SELECT id, state::text FROM tenantry.jobs")
        assert {r["id"] for r in rows} == set(self.jobs)
        for r in rows:
            model = self.jobs[r["id"]].state
            # A due row may still be `scheduled` until a claim stages it.
            allowed = {"runnable": {"queued", "scheduled"}, "later": {"scheduled"}}.get(
                model, {"running"}
            )
            assert r["state"] in allowed, (r["id"], r["state"], model)


async def test_the_claim_against_its_model(database_url: str) -> None:
    def run() -> None:
        conn = SyncDb(database_url)
        other = SyncDb(database_url)
        try:
            ClaimMachine.conn = conn
            ClaimMachine.other = other
            run_state_machine_as_test(
                ClaimMachine,
                settings=settings(
                    max_examples=150,
                    stateful_step_count=50,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )
        finally:
            other.close()
            conn.close()

    await anyio.to_thread.run_sync(run)
