"""Property: however the runs of one provisioning job crash (inside a group's call, at
any step, after the call, around an effect outside the database), the steps commit a
whole group at a time,
in order; the onboarding's versions are contiguous, one event per step in the ledger's
order with the ledger's `done_at`; and a last clean run ends it with exactly one of
everything."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantry.jobs.model import Job
from tenantry.onboarding import machine
from tenantry.onboarding.mail import FileMailer
from tenantry.onboarding.model import STEPS, Onboarding, SignUp
from tenantry.onboarding.provision import STEP_GROUPS, Provisioner
from tenantry.onboarding.storage import LocalStorage
from tenantry.timefmt import utc_text


class Crash(Exception):
    """A run dying at the chosen point (its transaction rolls back, as on kill -9)."""


# A group's steps run in one call of tenantry.onboarding_run_steps.  A death inside it
# (at one step's ledger row, after that step's rows) is made by the database itself: a
# trigger on the ledger raises for the (onboarding, step) named in a table of the test.
CRASH_TRIGGER = """
CREATE TABLE IF NOT EXISTS public.crash_points (onboarding_id uuid PRIMARY KEY, step text);
CREATE OR REPLACE FUNCTION public.crash_at_step() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM public.crash_points c
                WHERE c.onboarding_id = NEW.onboarding_id AND c.step = NEW.step) THEN
        RAISE EXCEPTION 'crash at step %', NEW.step USING ERRCODE = 'TZ999';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER crash_at_step BEFORE INSERT ON tenantry.onboarding_steps
    FOR EACH ROW EXECUTE FUNCTION public.crash_at_step();
"""

AHEAD = tuple(Provisioner._ahead)
EXTERNAL = (*AHEAD, *Provisioner._after_commit)
POINTS = (
    [("in_call", s) for s in STEPS]
    + [("after_call", g[-1]) for g in STEP_GROUPS]
    + [("before_external", s) for s in EXTERNAL]
    + [("after_external", s) for s in EXTERNAL]
)


class CrashingProvisioner(Provisioner):
    """Raises Crash at `self.point` (a (where, step) pair), once per run; `in_call`
    points are the trigger's (set by the test before the run)."""

    point: tuple[str, str] | None = None

    def _wrap(
        self, step: str, fn: Callable[..., Awaitable[None]], before: str, after: str
    ) -> Callable[..., Awaitable[None]]:
        async def wrapped(this: Provisioner, *args: Any) -> None:
            if self.point == (before, step):
                raise Crash(before, step)
            await fn(this, *args)
            if self.point == (after, step):
                raise Crash(after, step)

        return wrapped

    def __init__(self, root: Path) -> None:
        super().__init__(
            LocalStorage(root / "tenants"), FileMailer(root / "mail", "t@example.test")
        )
        self._ahead = {
            s: self._wrap(s, f, "before_external", "after_external")
            for s, f in Provisioner._ahead.items()
        }
        self._after_commit = {
            s: self._wrap(s, f, "before_external", "after_external")
            for s, f in Provisioner._after_commit.items()
        }

    async def _run_steps(
        self, job: Job, onboarding_id: uuid.UUID, todo: list[str], *args: Any, **kw: Any
    ) -> machine.StepsRun:
        o = await super()._run_steps(job, onboarding_id, todo, *args, **kw)
        if self.point == ("after_call", STEP_GROUPS[group_of(todo[0])][-1]):
            raise Crash("after_call", todo[-1])
        return o


def group_of(step: str) -> int:
    return next(i for i, g in enumerate(STEP_GROUPS) if step in g)


async def check(admin: asyncpg.Pool, tid: uuid.UUID, oid: uuid.UUID, done: list[str]) -> None:
    ledger = await admin.fetch(
        "SELECT step, done_at FROM tenantry.onboarding_steps WHERE onboarding_id = $1"
        " ORDER BY done_at, step",
        oid,
    )
    assert [r["step"] for r in ledger] == done
    events = await admin.fetch(
        "SELECT version, event_type, payload FROM tenantry.outbox"
        " WHERE aggregate_type = 'onboarding' AND aggregate_id = $1 ORDER BY version",
        str(oid),
    )
    assert [e["version"] for e in events] == list(range(1, len(done) + 2))
    assert [e["payload"]["step"] for e in events[1:]] == done
    assert [e["payload"]["done_at"] for e in events[1:]] == [utc_text(r["done_at"]) for r in ledger]
    assert [e["payload"]["steps_done"] for e in events[1:]] == list(range(1, len(done) + 1))
    row = await admin.fetchrow(
        "SELECT o.version, o.state,"
        " (SELECT count(*) FROM tenantry.tenants t WHERE t.id = $1) AS tenants,"
        " (SELECT count(*) FROM tenantry.users u WHERE u.tenant_id = $1) AS users,"
        " (SELECT count(*) FROM tenantry.workspaces w WHERE w.tenant_id = $1) AS workspaces"
        " FROM tenantry.onboardings o WHERE o.id = $2",
        tid,
        oid,
    )
    assert row is not None
    assert row["version"] == len(done) + 1
    assert row["state"] == (
        "completed" if len(done) == len(STEPS) else "provisioning" if done else "accepted"
    )
    assert (row["tenants"], row["users"], row["workspaces"]) == (
        int("tenant" in done),
        int("owner" in done),
        int("workspace" in done),
    )


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(crashes=st.lists(st.sampled_from(POINTS), max_size=6))
@pytest.mark.timeout(300)
async def test_crashed_runs_commit_whole_groups_in_order_and_a_clean_run_ends_it(
    crashes: list[tuple[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
    pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:
    root = tmp_path_factory.mktemp("crash")
    accepted = await machine.accept(
        pool, SignUp("ada@example.com", f"Crash {uuid.uuid4().hex[:8]}", "pro"),
        idempotency_key=None, queue="default",
    )  # fmt: skip
    tid, oid = accepted.tenant_id, accepted.onboarding_id
    row = await admin_pool.fetchrow(
        "UPDATE tenantry.jobs SET state = 'running', lease_owner = 'model', attempts = 1,"
        " lease_expires_at = now() + interval '1 hour' WHERE tenant_id = $1 RETURNING *",
        tid,
    )
    assert row is not None
    job = Job(
        id=row["id"], tenant_id=tid, queue=row["queue"], kind=row["kind"],
        payload=row["payload"], attempt=1, max_attempts=20, priority=row["priority"],
        created_at=row["created_at"], _pool=pool, _lease_owner="model",
    )  # fmt: skip
    provisioner = CrashingProvisioner(root)
    await admin_pool.execute(CRASH_TRIGGER)
    done: list[str] = []
    for point in [*crashes, None]:
        provisioner.point = point
        await admin_pool.execute("DELETE FROM public.crash_points WHERE onboarding_id = $1", oid)
        if point is not None and point[0] == "in_call":
            await admin_pool.execute(
                "INSERT INTO public.crash_points VALUES ($1, $2)", oid, point[1]
            )
        if point is None:
            await provisioner.run(job)
            done = list(STEPS)
        else:
            crash_group = group_of(point[1])
            first = group_of(next(s for s in STEPS if s not in done))
            # The first group's effects ahead of its call, and the call itself, run on
            # every run: the ledger is read under the lock in that call.
            always = crash_group == 0 and (
                point[0] == "after_call" or (point[0].endswith("_external") and point[1] in AHEAD)
            )
            if crash_group < first and not always:
                # Its group is committed: the crash point is not reached.
                await provisioner.run(job)
                done = list(STEPS)
            else:
                with pytest.raises((Crash, asyncpg.PostgresError)) as crashed:
                    await provisioner.run(job)
                if isinstance(crashed.value, asyncpg.PostgresError):
                    assert crashed.value.sqlstate == "TZ999", crashed.value
                if crash_group >= first:
                    # A crash after a group's call leaves that group committed.
                    committed = crash_group + int(point[0] == "after_call")
                    done = [s for g in STEP_GROUPS[:committed] for s in g]
        await check(admin_pool, tid, oid, done)
        if point is None or done == list(STEPS):
            break
    assert (root / "tenants" / str(tid)).is_dir()
    assert len(list((root / "mail").glob("*.eml"))) == 1
    assert (
        await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs WHERE tenant_id = $1", tid)
        == 0
    )
    current: Onboarding = await machine.get(pool, tid, oid)
    assert [s.step for s in current.steps] == list(STEPS)
