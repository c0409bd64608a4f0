"""ATKPROV FINDINGS: adversarial tests of provisioning's one-call groups
(tenantry.onboarding_run_steps).  Each test here failed on branch `prov` (5c076c6) when
it was written; the docstring says what it shows."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest

from tenantry.onboarding import machine
from tenantry.onboarding.mail import FileMailer
from tenantry.onboarding.model import STEPS, SignUp, derived_id
from tenantry.onboarding.provision import Provisioner
from tenantry.onboarding.storage import LocalStorage
from tenantry.tenancy import tenant_tx_on
from tenantry.tenants import store as tenants
from tests.integration.test_onboarding import _leased
from tests.integration.test_onboarding_crash_model import check


async def _accepted(pool: asyncpg.Pool, name: str) -> tuple[uuid.UUID, uuid.UUID]:
    a = await machine.accept(
        pool, SignUp("ada@example.com", name, "pro"), idempotency_key=None, queue="default"
    )
    return a.tenant_id, a.onboarding_id


def _args(
    tid: uuid.UUID, oid: uuid.UUID
) -> tuple[list[str], uuid.UUID, list[str], list[str], uuid.UUID]:
    names, permissions = tenants.default_roles()
    return (
        [f"atk-{tid.hex[:12]}"],
        derived_id(oid, "owner"),
        names,
        permissions,
        derived_id(oid, "workspace"),
    )


async def _state(admin: asyncpg.Pool, oid: uuid.UUID) -> tuple[str, int, int]:
    row = await admin.fetchrow(
        "SELECT o.state, o.version,"
        " (SELECT count(*) FROM tenantry.onboarding_steps s WHERE s.onboarding_id = o.id) AS n"
        " FROM tenantry.onboardings o WHERE o.id = $1",
        oid,
    )
    assert row is not None
    return row["state"], row["version"], row["n"]


@pytest.mark.parametrize(
    ("todo", "all_steps"),
    [
        (["welcome_email", "storage"], list(STEPS)),  # out of order: nothing before them
        (["provisioned"], list(STEPS)),  # the end, before the tenant exists
        (list(STEPS), None),  # no list of all the steps: never `completed`
        (list(STEPS), ["tenant"]),  # a list that ends elsewhere: `completed` too early
        (["no_such_step"], list(STEPS)),
    ],
    ids=["out-of-order", "end-first", "null-all-steps", "short-all-steps", "unknown"],
)
async def test_atkprov_finding_run_steps_records_only_the_steps_in_order(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool, todo: list[str], all_steps: list[str] | None
) -> None:
    """ATKPROV FINDING (low): tenantry.onboarding_run_steps, granted to the service
    login, takes the order and the end of the steps from its caller (`todo`,
    `all_steps`) without checking them against the ledger.  Called with steps out of
    order it records `welcome_email` and `storage` as done on a fresh onboarding (the
    ledger then says the email went out while no tenant exists; a later run skips
    them, so the email is never sent); with `all_steps` NULL or another list it
    records all seven steps and leaves the onboarding `provisioning` for ever (its
    provisioning job, given with `completes_job`, completes in the same call), and the
    next run of the Python side finds no group left (StopIteration).  Expected: the
    call refuses (an error, nothing written) rather than write a ledger the state
    machine cannot reach."""
    tid, oid = await _accepted(pool, f"Order {uuid.uuid4().hex[:6]}")
    before = await _state(admin_pool, oid)
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError):
            await conn.fetchrow(
                machine.Q["run_steps"], tid, oid, todo, all_steps, *_args(tid, oid),
                None, None, None, None,
            )  # fmt: skip
    assert await _state(admin_pool, oid) == before


async def test_atkprov_finding_the_tenant_check_compares_uuids_not_their_spelling(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """ATKPROV FINDING (low): the "transaction of another tenant" check of
    tenantry.onboarding_run_steps (and of tenantry.accept_onboarding) compares
    app.tenant_id as text with the tenant's canonical spelling, while row-level
    security casts it to uuid.  A caller whose transaction names the same tenant in
    another spelling of its UUID (upper case, as some clients print them) is refused
    with 42501 ("in tenant context X, not X") though every policy treats it as that
    tenant.  Fails closed, so no leak; the refusal is wrong."""
    tid, oid = await _accepted(pool, f"Spelling {uuid.uuid4().hex[:6]}")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tid).upper())
        # Row-level security sees the tenant's rows under that spelling...
        assert (
            await conn.fetchval("SELECT count(*) FROM tenantry.onboardings WHERE id = $1", oid) == 1
        )
        # ...and the function should run for it as well.
        row = await conn.fetchrow(
            machine.Q["run_steps"], tid, oid, ["tenant"], list(STEPS), *_args(tid, oid),
            None, None, None, None,
        )  # fmt: skip
    assert row is not None and list(row["ran"]) == ["tenant"]
    # The accept's check is the same comparison.
    mine = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(mine).upper())
        accepted = await conn.fetchrow(
            machine.Q["accept"],
            *(mine, uuid.uuid4(), "ada@example.com", "Same Tenant", "free", None),
            *(b"\x01" * 32, {}, {}, "default"),
        )
    assert accepted is not None and accepted["outcome"] == "accepted"


async def test_atkprov_rls_the_new_functions_write_no_other_tenants_rows(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """ATKPROV (passes): in tenant A's transaction, and with no tenant at all, none of
    the new functions writes a row of tenant B."""
    ta, _ = await _accepted(pool, "Tenant Aaa")
    tb, ob = await _accepted(pool, "Tenant Bbb")
    names, permissions = tenants.default_roles()
    job_b = await admin_pool.fetchval("SELECT id FROM tenantry.jobs WHERE tenant_id = $1", tb)
    writes = [
        ("SELECT tenantry.tenant_create_with_free_slug($1, ARRAY['bbb-x'], 'B', 'pro')", (tb,)),
        ("SELECT tenantry.tenant_add_user($1, $2, 'e@example.com', 'e')", (tb, uuid.uuid4())),
        ("SELECT tenantry.tenant_add_roles($1, $2, $3)", (tb, names, permissions)),
        (
            "SELECT tenantry.tenant_add_workspace_with_member($1, $2, 'default', 'D', $3, 'owner')",
            (tb, uuid.uuid4(), uuid.uuid4()),
        ),
        (
            "SELECT tenantry.emit_many($1, ARRAY['onboarding'], ARRAY[$2::text], ARRAY[2],"
            " ARRAY['x.y'], ARRAY['{}'::jsonb])",
            (tb, str(ob)),
        ),
    ]
    for sql, args in writes:
        for in_a in (True, False):
            async with pool.acquire() as conn:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    if in_a:
                        async with tenant_tx_on(conn, ta):
                            await conn.fetch(sql, *args)
                    else:
                        await conn.fetch(sql, *args)
    async with pool.acquire() as conn:
        async with tenant_tx_on(conn, ta):
            changed = await conn.fetchval("SELECT tenantry.tenant_set_state($1, 'active')", tb)
            assert changed is False
            assert (
                await conn.fetchval("SELECT tenantry.complete_job($1, $2, 'x')", tb, job_b) is False
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="tenant context"):
            async with tenant_tx_on(conn, ta):
                await conn.fetchrow(
                    machine.Q["run_steps"], tb, ob, ["tenant"], list(STEPS), *_args(tb, ob),
                    None, None, None, None,
                )  # fmt: skip
    counts = await admin_pool.fetchrow(
        "SELECT (SELECT count(*) FROM tenantry.tenants WHERE id = $1) AS t,"
        " (SELECT count(*) FROM tenantry.users WHERE tenant_id = $1) AS u,"
        " (SELECT count(*) FROM tenantry.roles WHERE tenant_id = $1) AS r,"
        " (SELECT count(*) FROM tenantry.outbox WHERE tenant_id = $1) AS e,"
        " (SELECT count(*) FROM tenantry.jobs WHERE tenant_id = $1) AS j",
        tb,
    )
    assert counts is not None
    assert dict(counts) == {"t": 0, "u": 0, "r": 0, "e": 1, "j": 1}


# The step's record as the code before one-call groups wrote it (main's queries.sql,
# step_done): one statement per step, its own transaction with the step's rows.
OLD_STEP_DONE = """
WITH step AS (
    INSERT INTO tenantry.onboarding_steps (tenant_id, onboarding_id, step, done_at)
    VALUES ($1::uuid, $2::uuid, $3::text, clock_timestamp())
    RETURNING done_at
), moved AS (
    UPDATE tenantry.onboardings o
       SET state = $5::text, version = $4::integer + 1, failure_reason = NULL,
           updated_at = now()
     WHERE o.tenant_id = $1::uuid AND o.id = $2::uuid AND o.version = $4::integer
    RETURNING o.version
)
SELECT m.version,
       tenantry.emit($1::uuid, 'onboarding', $2::text, 'onboarding.step_completed',
                     $6::jsonb || jsonb_build_object(
                         'done_at',
                         to_char(s.done_at AT TIME ZONE 'UTC',
                                 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
                     m.version) AS event_id
  FROM step s CROSS JOIN moved m
"""


@pytest.mark.parametrize("old_done", range(len(STEPS)))
async def test_atkprov_a_job_of_the_old_code_finishes_an_onboarding_it_began(
    tmp_path: Path, pool: asyncpg.Pool, admin_pool: asyncpg.Pool, old_done: int
) -> None:
    """ATKPROV (passes; no test covered a payload without `slug_base`): a provisioning
    job enqueued by the code before this change (no `slug_base`), whose onboarding
    that code provisioned a step at a time up to `old_done` steps (a group only partly
    done), is finished by the new code with exactly one of everything, contiguous
    versions, and the ledger's order the events' order."""
    name = f"Old Code {old_done}"
    tid, oid = await _accepted(pool, name)
    slugs, owner, names, permissions, workspace = _args(tid, oid)
    effects: dict[str, tuple[str, tuple[object, ...]]] = {
        "tenant": (
            "SELECT tenantry.tenant_create_with_free_slug($1, $2, $3, 'pro')",
            (tid, slugs, name),
        ),
        "owner": (
            "SELECT tenantry.tenant_add_user($1, $2, 'ada@example.com', 'ada')",
            (tid, owner),
        ),
        "roles": ("SELECT tenantry.tenant_add_roles($1, $2, $3)", (tid, names, permissions)),
        "workspace": (
            "SELECT tenantry.tenant_add_workspace_with_member($1, $2, 'default', 'Default',"
            " $3, 'owner')",
            (tid, workspace, owner),
        ),
    }
    storage = LocalStorage(tmp_path / "tenants")
    for i, step in enumerate(STEPS[:old_done]):
        if step == "storage":
            await storage.ensure(tid)
        async with pool.acquire() as conn, tenant_tx_on(conn, tid):
            if step in effects:
                sql, args = effects[step]
                await conn.execute(sql, *args)
            payload = {"state": "provisioning", "step": step, "steps_done": i + 1}
            await conn.fetchval(
                OLD_STEP_DONE, tid, oid, step, i + 1, "provisioning",
                payload | {"steps_total": len(STEPS)},
            )  # fmt: skip
    await admin_pool.execute(
        "UPDATE tenantry.jobs SET payload = payload - 'slug_base' WHERE tenant_id = $1", tid
    )
    job = await _leased(pool, admin_pool, tid, "new-code", machine.PROVISION_KIND)
    assert "slug_base" not in job.payload
    provisioner = Provisioner(storage, FileMailer(tmp_path / "mail", "noreply@example.test"))
    await provisioner.run(job)
    await check(admin_pool, tid, oid, list(STEPS))
    assert job.completed_in_tx
    row = await admin_pool.fetchrow(
        "SELECT (SELECT slug FROM tenantry.tenants WHERE id = $1) AS slug,"
        " (SELECT count(*) FROM tenantry.jobs WHERE tenant_id = $1) AS jobs,"
        " (SELECT count(*) FROM tenantry.roles WHERE tenant_id = $1) AS roles,"
        " (SELECT count(*) FROM tenantry.memberships WHERE tenant_id = $1) AS members",
        tid,
    )
    assert row is not None
    # The tenant step, when the old code had not done it, took the slug from the name
    # (read from the onboarding, the payload having no `slug_base`).
    slug = slugs[0] if old_done else tenants.slug_base(name)
    assert dict(row) == {"slug": slug, "jobs": 0, "roles": 3, "members": 1}
    # The old code sent no email for these (welcome_email never done before the last):
    # the new code sends exactly one, unless the old code had done that step.
    sent = len(list((tmp_path / "mail").glob("*.eml")))
    assert sent == (0 if "welcome_email" in STEPS[:old_done] else 1)
