"""Onboarding end to end in one process: accept, provision, status, events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg
import pytest

from tenantry import db
from tenantry.app import Service
from tenantry.db import Conn
from tenantry.jobs.model import Job
from tenantry.jobs.registry import DeadLetter
from tenantry.onboarding import machine
from tenantry.onboarding.mail import FileMailer
from tenantry.onboarding.model import STEPS, SignUp
from tenantry.onboarding.provision import COMPENSATE_KIND, Provisioner
from tenantry.onboarding.storage import LocalStorage
from tenantry.tenancy import tenant_context_mode, tenant_tx, tenant_tx_on
from tenantry.tenants import store as tenants
from tests import smtp
from tests.helpers import (
    Frame,
    background_service,
    eventually,
    service_settings,
    sse_frames,
    wait_lock_waiter,
)

SIGN_UP = {"email": "Ada@Example.com", "tenant_name": "Analytical Engines", "plan": "pro"}


@pytest.fixture
async def svc(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[Service]:
    async with background_service(service_settings(tmp_path), app_url, pool, worker_pool) as s:
        yield s


async def sign_up(
    http: aiohttp.ClientSession, body: Any = None, **headers: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post("/v1/onboardings", json=body or SIGN_UP, headers=headers) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


async def follow(
    http: aiohttp.ClientSession, url: str, *, last_event_id: str | None = None, timeout: float = 20
) -> list[Frame]:
    """Read a stream to its end (the server closes it after the terminal event)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    frames: list[Frame] = []
    with anyio.fail_after(timeout):
        async with http.get(url, headers=headers) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["Cache-Control"] == "no-cache"
            assert r.headers["X-Accel-Buffering"] == "no"
            async for f in sse_frames(r):
                frames.append(f)
    return frames


async def test_sign_up_is_provisioned_and_streamed_to_the_end(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    status, body, headers = await sign_up(http, **{"X-Request-ID": "req-7f3a"})
    assert status == 202, body
    oid, tid = uuid.UUID(body["id"]), uuid.UUID(body["tenant_id"])
    assert body["state"] == "accepted"
    assert headers["X-Request-ID"] == "req-7f3a"
    assert headers["Location"] == body["status_url"] == f"/v1/onboardings/{oid}"
    assert body["events_url"] == f"/v1/onboardings/{oid}/events?token={body['token']}"

    frames = await follow(http, body["events_url"])
    assert frames[0].retry is not None and 2000 <= frames[0].retry < 4000
    events = [f for f in frames if f.event]
    assert [f.id for f in events] == [str(v) for v in range(1, len(STEPS) + 2)]
    assert [f.event for f in events] == [
        "onboarding.accepted",
        *["onboarding.step_completed"] * (len(STEPS) - 1),
        "onboarding.completed",
    ]
    assert [f.data["step"] for f in events[1:]] == list(STEPS)
    assert events[-1].data["state"] == "completed"
    assert [f.data["version"] for f in events] == [int(f.id or 0) for f in events]
    assert all(f.data["type"] == f.event and f.data["at"] for f in events)
    # Every event the request led to names it, the tenant's first event too.
    assert [f.data.get("request_id") for f in events] == ["req-7f3a"] * len(events)
    provisioned = await admin_pool.fetchval(
        "SELECT payload FROM tenantry.outbox WHERE tenant_id = $1"
        " AND event_type = 'tenant.provisioned'",
        tid,
    )
    assert provisioned["request_id"] == "req-7f3a"

    # Exactly one of everything, in the tenant's rows.
    counts = await admin_pool.fetchrow(
        """
        SELECT (SELECT count(*) FROM tenantry.tenants WHERE id = $1 AND state = 'active')
                   AS tenants,
               (SELECT count(*) FROM tenantry.users WHERE tenant_id = $1) AS users,
               (SELECT count(*) FROM tenantry.roles WHERE tenant_id = $1) AS roles,
               (SELECT count(*) FROM tenantry.workspaces WHERE tenant_id = $1) AS workspaces,
               (SELECT count(*) FROM tenantry.memberships WHERE tenant_id = $1
                   AND role = 'owner') AS memberships,
               (SELECT count(*) FROM tenantry.outbox WHERE tenant_id = $1
                   AND event_type = 'tenant.provisioned') AS provisioned,
               (SELECT count(*) FROM tenantry.jobs WHERE tenant_id = $1) AS jobs
        """,
        tid,
    )
    assert counts is not None
    assert dict(counts) == {
        "tenants": 1,
        "users": 1,
        "roles": 3,
        "workspaces": 1,
        "memberships": 1,
        "provisioned": 1,
        "jobs": 0,
    }
    assert (tmp_path / "tenants" / str(tid)).is_dir()
    mails = list((tmp_path / "mail").glob("*.eml"))
    assert len(mails) == 1 and "To: Ada@Example.com" in mails[0].read_text()

    async with http.get(
        body["status_url"], headers={"Authorization": f"Bearer {body['token']}"}
    ) as r:
        assert r.status == 200
        st = await r.json()
    assert st["state"] == "completed" and st["failure_reason"] is None
    assert [s["step"] for s in st["steps"]] == list(STEPS)

    # Reconnecting after the end: 204 tells EventSource to stop.
    async with http.get(body["events_url"], headers={"Last-Event-ID": events[-1].id or ""}) as r:
        assert r.status == 204


async def test_a_replay_after_completion_answers_it_with_a_token_to_follow_it(
    svc: Service, http: aiohttp.ClientSession
) -> None:
    """A retried sign-up (the same key and body) after provisioning ended is told so:
    `completed`, and a token whose stream replays the onboarding to its end (the
    stored answer said `accepted`, whatever had happened since)."""
    key = str(uuid.uuid4())
    status, first, _ = await sign_up(http, **{"Idempotency-Key": key})
    assert status == 202 and first["state"] == "accepted"
    done = [f for f in await follow(http, first["events_url"]) if f.event]
    assert done[-1].event == "onboarding.completed"

    status, again, headers = await sign_up(http, **{"Idempotency-Key": key})
    assert status == 202 and headers["Idempotent-Replayed"] == "true"
    assert (again["id"], again["tenant_id"]) == (first["id"], first["tenant_id"])
    assert again["state"] == "completed"
    replayed = [f for f in await follow(http, again["events_url"]) if f.event]
    assert [(f.id, f.event) for f in replayed] == [(f.id, f.event) for f in done]
    async with http.get(again["status_url"], params={"token": again["token"]}) as r:
        assert r.status == 200 and (await r.json())["state"] == "completed"


async def test_a_refused_welcome_email_fails_the_onboarding_and_compensates(
    tmp_path: Path,
    app_url: str,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
    smtp_server: smtp.Server,
) -> None:
    settings = service_settings(tmp_path, smtp_url=smtp_server.url())
    async with (
        background_service(settings, app_url, pool, worker_pool) as s,
        aiohttp.ClientSession(f"http://127.0.0.1:{s.http.port}") as http,
    ):
        status, body, _ = await sign_up(http, {**SIGN_UP, "email": smtp.NO_SUCH_USER})
        assert status == 202, body
        frames = await follow(http, body["events_url"])
        async with http.get(body["status_url"], params={"token": body["token"]}) as r:
            st = await r.json()
    last = [f for f in frames if f.event][-1]
    assert last.event == "onboarding.failed" and last.data["state"] == "failed"
    assert "550" in last.data["reason"] and "no such user" in last.data["reason"]
    assert sorted(last.data["compensated"]) == ["storage", "tenant"]
    # For the person: what went wrong in plain words, which field to correct, which
    # step failed, and which of the steps done before it were undone.
    assert last.data["code"] == "email_rejected" and last.data["field"] == "email"
    assert last.data["message"] == (
        f"The mail server of example.test refused the address {smtp.NO_SUCH_USER}, so the"
        " welcome email could not be delivered. Check the address and try again."
    )
    assert "550" not in last.data["message"]
    assert last.data["failed_step"] == "welcome_email"
    assert last.data["undone"] == ["tenant", "owner", "roles", "workspace", "storage"]
    assert st["state"] == "failed" and st["failure_reason"] == last.data["reason"]
    tid = uuid.UUID(body["tenant_id"])
    # Nothing of the tenant is left: no rows, no directory; the onboarding stays, failed.
    for table, col in (
        ("tenants", "id"),
        ("users", "tenant_id"),
        ("workspaces", "tenant_id"),
        ("roles", "tenant_id"),
        ("memberships", "tenant_id"),
    ):
        assert (
            await admin_pool.fetchval(
                f"SELECT count(*) FROM tenantry.{table} WHERE {col} = $1", tid
            )
            == 0
        ), table
    # The directory goes with the compensation job, enqueued with the failure.
    await eventually(_no_jobs_left(admin_pool))
    assert not (tmp_path / "tenants" / str(tid)).exists()
    assert smtp_server.recorder.received == []
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.dead_jobs") == 0
    done = await admin_pool.fetch(
        "SELECT kind, sum(succeeded) AS n FROM tenantry.job_counters GROUP BY kind ORDER BY kind"
    )
    assert [(r["kind"], r["n"]) for r in done] == [
        ("onboarding.compensate", 1),
        ("onboarding.provision", 1),
    ]


def _no_jobs_left(admin_pool: asyncpg.Pool) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        left: int = await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs")
        return left == 0

    return check


async def test_a_welcome_email_goes_through_smtp_once(
    tmp_path: Path,
    app_url: str,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    smtp_server: smtp.Server,
) -> None:
    settings = service_settings(tmp_path, smtp_url=smtp_server.url())
    async with (
        background_service(settings, app_url, pool, worker_pool) as s,
        aiohttp.ClientSession(f"http://127.0.0.1:{s.http.port}") as http,
    ):
        _, body, _ = await sign_up(http)
        frames = await follow(http, body["events_url"])
    assert [f for f in frames if f.event][-1].event == "onboarding.completed"
    received = await smtp_server.recorder.one_message()
    assert received.rcpt_tos == [SIGN_UP["email"]]
    message = received.parsed()
    assert SIGN_UP["tenant_name"] in str(message["Subject"])
    assert not list((tmp_path / "mail").glob("*.eml"))


async def test_a_hundred_identical_requests_provision_one_tenant(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    key = str(uuid.uuid4())
    answers = await asyncio.gather(
        *(sign_up(http, None, **{"Idempotency-Key": key}) for _ in range(100))
    )
    assert {status for status, _, _ in answers} == {202}
    assert len({body["id"] for _, body, _ in answers}) == 1
    await follow(http, answers[0][1]["events_url"])
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.tenants") == 1
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.users") == 1


async def test_an_accept_is_one_statement_its_own_transaction(
    app_url: str, admin_pool: asyncpg.Pool
) -> None:
    """Issue 14: the accept cost five statements, each a round trip (BEGIN with the
    tenant, the key's setting, the key's claim, the insert, COMMIT), and the pool's
    reset.  Now one call writes the key, the onboarding, its first event and the job,
    sent alone it is its own transaction, and the release skips the reset: it left
    nothing in the session.  (In the set_local mode, for Citus, the tenant is named by
    SET LOCAL first: BEGIN, the call, COMMIT, and the reset.)"""
    sent: list[str] = []
    async with await db.create_pool(app_url, min_size=1, max_size=1) as one:
        async with one.acquire() as c:
            c.add_query_logger(lambda record: sent.append(record.query))
            reset_query = c.get_reset_query()
        sent.clear()
        accepted = await machine.accept(
            one,
            SignUp("ada@example.com", "One Trip", "free"),
            idempotency_key="one-trip",
            queue="default",
            request_id="r1",
        )
        statements = list(sent)
        again = await machine.accept(
            one, SignUp("ada@example.com", "One Trip", "free"), idempotency_key="one-trip",
            queue="default",
        )  # fmt: skip
    expected = [machine.Q["accept"]]
    if tenant_context_mode() == "set_local":
        begin = f"BEGIN; SET LOCAL app.tenant_id = '{accepted.tenant_id}'"
        expected = [begin, *expected, "COMMIT", reset_query]
    assert statements == expected
    assert again == machine.Accepted(
        accepted.onboarding_id, accepted.tenant_id, accepted.created_at, replayed=True
    )
    row = await admin_pool.fetchrow(
        """SELECT (SELECT count(*) FROM tenantry.onboardings WHERE id = $1) AS onboardings,
                  (SELECT array_agg(event_type || ':' || (payload->>'request_id'))
                     FROM tenantry.outbox WHERE aggregate_id = $1::text) AS events,
                  (SELECT array_agg(kind || ':' || queue || ':' || dedup_key)
                     FROM tenantry.jobs WHERE tenant_id = $2) AS jobs,
                  (SELECT array_agg(onboarding_id) FROM tenantry.idempotency_keys) AS keys""",
        accepted.onboarding_id,
        accepted.tenant_id,
    )
    assert row is not None
    assert row["onboardings"] == 1
    assert row["events"] == ["onboarding.accepted:r1"]
    assert row["jobs"] == [f"onboarding.provision:default:onboarding:{accepted.onboarding_id}"]
    assert row["keys"] == [accepted.onboarding_id]


async def test_the_accept_refuses_a_transaction_of_another_tenant(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """tenantry.accept_onboarding names its tenant itself: inside a transaction already
    in another tenant's context it refuses, rather than switch that transaction's
    tenant for the rest of it."""
    mine, other = uuid.uuid4(), uuid.uuid4()
    async with tenant_tx(pool, mine) as tx:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="tenant context"):
            await tx.fetchrow(
                machine.Q["accept"],
                *(other, uuid.uuid4(), "ada@example.com", "Elsewhere", "free", None),
                *(b"\x01" * 32, {}, {}, "default"),
            )
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.onboardings") == 0


async def test_sign_ups_with_one_name_get_distinct_slugs(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    answers = await asyncio.gather(*(sign_up(http) for _ in range(3)))
    for _, body, _ in answers:
        frames = await follow(http, body["events_url"])
        assert frames[-1].event == "onboarding.completed"
    slugs = sorted(r[0] for r in await admin_pool.fetch("SELECT slug FROM tenantry.tenants"))
    assert len(set(slugs)) == 3 and "analytical-engines" in slugs
    assert all(s.startswith("analytical-engines") for s in slugs)


async def test_a_poison_payload_reaches_its_stream_and_the_hub_goes_on(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    """A number no double can hold, from another service's emit: the hub never decodes
    it, so it neither crashes the process nor stops other streams."""
    # Provisioning held (an operator's pause) until the note is seen: a stream ends at
    # its onboarding's last event, which a fast provisioning could otherwise reach first.
    await _pause_default_queue(admin_pool, True)
    _, body, _ = await sign_up(http)
    tid = uuid.UUID(body["tenant_id"])
    async with http.get(body["events_url"]) as r:
        async with admin_pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tid))
            await conn.execute(
                "SELECT tenantry.emit($1, 'onboarding', $2, 'onboarding.note',"
                " '{\"n\": 1e400}'::jsonb, 1000)",
                tid,
                body["id"],
            )
        raw = b""
        with anyio.fail_after(20):
            async for line in r.content:
                raw += line
                if b"event: onboarding.note" in raw and raw.endswith(b"\n\n"):
                    break
    assert b'"n": 1' + b"0" * 400 in raw
    await _pause_default_queue(admin_pool, False)
    # Still serving: another sign-up completes.
    _, other, _ = await sign_up(http)
    assert (await follow(http, other["events_url"]))[-1].event == "onboarding.completed"


async def _pause_default_queue(admin_pool: asyncpg.Pool, paused: bool) -> None:
    await admin_pool.execute(
        "SELECT tenantry.set_queue_control('default', $1, NULL, false, 'test')", paused
    )


async def test_event_types_cannot_carry_line_breaks(admin_pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await admin_pool.execute(
            "SELECT tenantry.emit(gen_random_uuid(), 'onboarding', 'x',"
            " E'onboarding.step_completed\\nid: 999', '{}', 1)"
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await admin_pool.execute(
            "SELECT tenantry.emit(gen_random_uuid(), 'onboarding', 'x', 'e', '[1]', 1)"
        )


async def test_a_last_attempt_that_times_out_still_ends_the_onboarding(
    tmp_path: Path,
    app_url: str,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:
    """Regression: a last attempt that timed out (or whose worker died) buried the job
    without the failure path: the onboarding stayed `accepted` forever and its stream
    never ended.  The provisioning job's dead-letter hook now fails it, whatever killed
    the job."""
    accepted = await machine.accept(
        pool,
        SignUp("ada@example.com", "Stuck Systems", "free"),
        idempotency_key=None,
        queue="default",
    )
    tid, oid = accepted.tenant_id, accepted.onboarding_id
    await admin_pool.execute("UPDATE tenantry.jobs SET max_attempts = 1")
    holder = await admin_pool.acquire()
    try:
        # Hold the onboarding's row: the attempt's step waits on it until its time-out.
        tx = holder.transaction()
        await tx.start()
        await holder.execute(
            "SELECT 1 FROM tenantry.onboardings WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
            tid,
            oid,
        )
        settings = service_settings(tmp_path, job_timeout=0.5)
        async with background_service(settings, app_url, pool, worker_pool):
            await eventually(_dead_count(admin_pool, 1))
            await tx.rollback()  # the hook, a job of its own, can now take the lock
            await eventually(_state_is(admin_pool, oid, "failed"))
            await eventually(_no_jobs_left(admin_pool))
    finally:
        await admin_pool.release(holder)
    row = await admin_pool.fetchrow(
        "SELECT failure_reason, version FROM tenantry.onboardings WHERE id = $1", oid
    )
    assert row is not None
    assert row["failure_reason"].startswith("gave up after 1 attempts (exhausted)")
    assert "timed out after 0.5s" in row["failure_reason"]
    dead = await admin_pool.fetchrow("SELECT kind, reason FROM tenantry.dead_jobs")
    assert dead is not None and tuple(dead) == ("onboarding.provision", "exhausted")
    last = await admin_pool.fetchrow(
        "SELECT event_type, payload FROM tenantry.outbox WHERE aggregate_id = $1"
        " ORDER BY version DESC LIMIT 1",
        str(oid),
    )
    assert last is not None and last["event_type"] == "onboarding.failed"
    failed = last["payload"]
    assert (failed["code"], failed["field"], failed["failed_step"]) == ("gave_up", None, "tenant")
    assert failed["message"].startswith("Setting up your organisation did not finish in time.")
    assert failed["undone"] == [] and failed["compensated"] == []
    assert not (tmp_path / "tenants" / str(tid)).exists()


async def test_a_name_with_no_free_slug_fails_asking_for_another_name(
    tmp_path: Path,
    app_url: str,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:
    """Every slug the name can make is taken: the onboarding fails at once, and says the
    name is the field to change (code `name_unavailable`)."""
    accepted = await machine.accept(
        pool, SignUp("ada@example.com", "Taken Co", "free"), idempotency_key=None, queue="default"
    )
    tid, oid = accepted.tenant_id, accepted.onboarding_id
    for slug in ("taken-co", f"taken-co-{tid.hex[:6]}", f"taken-co-{tid.hex[:12]}"):
        await admin_pool.execute(
            "INSERT INTO tenantry.tenants (id, slug, name, plan, state)"
            " VALUES ($1, $2, 'Taken Co', 'free', 'active')",
            uuid.uuid4(),
            slug,
        )
    async with background_service(service_settings(tmp_path), app_url, pool, worker_pool):
        await eventually(_state_is(admin_pool, oid, "failed"))
        # The storage is made before the tenant's transaction (provision.STEP_GROUPS):
        # the compensation enqueued with the failure removes it (while the service runs).
        await eventually(_no_jobs_left(admin_pool))
    assert not (tmp_path / "tenants" / str(tid)).exists()
    last = await admin_pool.fetchrow(
        "SELECT payload FROM tenantry.outbox WHERE aggregate_id = $1 ORDER BY version DESC LIMIT 1",
        str(oid),
    )
    assert last is not None
    failed = last["payload"]
    assert (failed["code"], failed["field"], failed["failed_step"]) == (
        "name_unavailable",
        "tenant_name",
        "tenant",
    )
    assert failed["message"] == (
        "The organisation name \u201cTaken Co\u201d is not available. Choose another name"
        " and try again."
    )
    assert failed["reason"] == "no free slug for 'Taken Co'"
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.dead_jobs") == 0


@pytest.mark.parametrize("runner", ["lock", "run_steps"])
async def test_the_ledger_is_read_after_the_lock_is_granted(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool, runner: str
) -> None:
    """Regression: `lock` read the step ledger with the snapshot taken before it
    waited for the onboarding's row, so a second runner that waited for the first saw
    no step done, and failed on the ledger's key (on the last attempt, a wrongly
    failed onboarding)."""
    accepted = await machine.accept(
        pool, SignUp("grace@example.com", "Two Runners", "pro"), idempotency_key=None,
        queue="default",
    )  # fmt: skip
    tid, oid = accepted.tenant_id, accepted.onboarding_id
    first_locked, may_commit = anyio.Event(), anyio.Event()
    seen: list[frozenset[str]] = []
    args = machine.StepArgs(
        tenant_slugs=["two-runners"], owner_id=uuid.uuid4(), role_names=[], role_permissions=[],
        workspace_id=uuid.uuid4(),
    )  # fmt: skip

    async def first_runner() -> None:
        # Locks the onboarding and records a step, then holds its transaction open.
        async with tenant_tx(pool, tid) as tx:
            await tx.fetchrow(
                machine.Q["run_steps"], tid, oid, ["tenant"], list(STEPS), args.tenant_slugs,
                args.owner_id, [], [], args.workspace_id, None, None, None, None,
            )  # fmt: skip
            first_locked.set()
            await may_commit.wait()

    async def second_runner() -> None:
        if runner == "lock":  # the failure's path
            async with tenant_tx(pool, tid) as tx:
                seen.append((await machine.lock(tx, tid, oid)).done)
        else:  # the steps' path: it must not run the tenant step again
            o = await machine.run_steps(pool, tid, oid, ["tenant", "owner"], args, request_id=None)
            assert o.ran == ["owner"]
            seen.append(o.done - {"owner"})

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first_runner)
            await first_locked.wait()
            tg.start_soon(second_runner)
            await wait_lock_waiter(admin_pool)  # the second waits for the first's row...
            may_commit.set()  # ...which commits its step
    assert seen == [frozenset({"tenant"})]


def _dead_count(admin_pool: asyncpg.Pool, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        got: int = await admin_pool.fetchval("SELECT count(*) FROM tenantry.dead_jobs")
        return got >= n

    return check


def _state_is(
    admin_pool: asyncpg.Pool, oid: uuid.UUID, state: str
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        got = await admin_pool.fetchval("SELECT state FROM tenantry.onboardings WHERE id = $1", oid)
        return bool(got == state)

    return check


class _HeldStorage(LocalStorage):
    """Local storage whose `ensure` says it was entered, then waits to be let go."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = anyio.Event()
        self.go = anyio.Event()

    async def ensure(self, tenant_id: uuid.UUID) -> str:
        self.entered.set()
        await self.go.wait()
        return await super().ensure(tenant_id)


async def _leased(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool, tid: uuid.UUID, owner: str, kind: str
) -> Job:
    """The tenant's job of `kind` as a worker holding its lease as `owner` runs it (a
    rescue hands the lease on: the previous holder's run may still be going)."""
    row = await admin_pool.fetchrow(
        "UPDATE tenantry.jobs SET state = 'running', lease_owner = $2, attempts = attempts + 1,"
        " lease_expires_at = now() + interval '1 hour'"
        " WHERE tenant_id = $1 AND kind = $3 RETURNING *",
        tid,
        owner,
        kind,
    )
    assert row is not None
    return Job(
        id=row["id"], tenant_id=tid, queue=row["queue"], kind=row["kind"],
        payload=row["payload"], attempt=row["attempts"], max_attempts=row["max_attempts"],
        priority=row["priority"], created_at=row["created_at"], _pool=pool, _lease_owner=owner,
    )  # fmt: skip


async def test_storage_made_by_a_rescued_run_after_the_failure_is_removed(
    tmp_path: Path, pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """A run whose job was rescued goes on: it makes the storage (outside the database,
    before its group's transaction) while the job's next run fails the onboarding and
    its compensation removes the storage there is, none yet.  Regression: the late
    storage stayed, a directory of a tenant that does not exist; under the lock, the
    late run now finds the onboarding failed and enqueues a compensation of its own."""
    accepted = await machine.accept(
        pool, SignUp("ada@example.com", "Late Storage", "free"), idempotency_key=None,
        queue="default",
    )  # fmt: skip
    tid, oid = accepted.tenant_id, accepted.onboarding_id
    storage = _HeldStorage(tmp_path / "tenants")
    provisioner = Provisioner(storage, FileMailer(tmp_path / "mail", "noreply@example.test"))
    stale = await _leased(pool, admin_pool, tid, "stale", machine.PROVISION_KIND)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(provisioner.run, stale)
            await storage.entered.wait()  # its first group committed; storage under way
            # The rescued job's last run died: its dead-letter hook fails the onboarding
            # (here run on the job itself) and enqueues the compensation, which runs.
            rescued = await _leased(pool, admin_pool, tid, "rescuer", machine.PROVISION_KIND)
            dead = DeadLetter(
                job_id=rescued.id, tenant_id=tid, kind=rescued.kind, payload=rescued.payload,
                reason="exhausted", error="the worker stopped", attempts=rescued.attempt,
                created_at="2026-12-01T00:00:00Z",
            )  # fmt: skip
            await provisioner.gave_up(rescued, dead)
            first = await _leased(pool, admin_pool, tid, "w", COMPENSATE_KIND)
            await provisioner.compensate(first)  # no storage yet: nothing removed
            await admin_pool.execute("DELETE FROM tenantry.jobs WHERE id = $1", first.id)
            storage.go.set()
    assert (tmp_path / "tenants" / str(tid)).is_dir()  # made late...
    late = await admin_pool.fetch(
        "SELECT tenant_id, payload FROM tenantry.jobs WHERE kind = $1", COMPENSATE_KIND
    )
    # ...and its removal enqueued by the run that made it.
    assert [(r["tenant_id"], r["payload"]) for r in late] == [(tid, {"onboarding_id": str(oid)})]
    await provisioner.compensate(await _leased(pool, admin_pool, tid, "w", COMPENSATE_KIND))
    assert not (tmp_path / "tenants" / str(tid)).exists()


async def test_a_job_enqueued_without_the_slug_base_reads_the_name_and_provisions(
    tmp_path: Path, pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """A provisioning job enqueued before the accept put `slug_base` in its payload (an
    upgrade with jobs queued) reads the onboarding's name for the slug, and ends with
    the same tenant a new one would."""
    accepted = await machine.accept(
        pool, SignUp("ada@example.com", "Before The Upgrade", "free"), idempotency_key=None,
        queue="default",
    )  # fmt: skip
    tid, oid = accepted.tenant_id, accepted.onboarding_id
    payload = await admin_pool.fetchval(
        "UPDATE tenantry.jobs SET payload = payload - 'slug_base' WHERE tenant_id = $1"
        " RETURNING payload",
        tid,
    )
    assert payload == {"onboarding_id": str(oid)}
    provisioner = Provisioner(
        LocalStorage(tmp_path / "tenants"), FileMailer(tmp_path / "mail", "noreply@example.test")
    )
    await provisioner.run(await _leased(pool, admin_pool, tid, "w", machine.PROVISION_KIND))
    row = await admin_pool.fetchrow(
        "SELECT o.state, t.slug, t.state AS tenant_state FROM tenantry.onboardings o"
        " JOIN tenantry.tenants t ON t.id = o.tenant_id WHERE o.id = $1",
        oid,
    )
    assert row is not None
    assert tuple(row) == ("completed", "before-the-upgrade", "active")
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0


@pytest.mark.parametrize(
    ("durable_steps", "waits"),
    [(None, False), ("off", False), ("0", False), ("on", True), ("t", True), ("bogus", True)],
)
async def test_the_first_steps_commit_without_waiting_for_the_disk_unless_told_to(
    pool: asyncpg.Pool, durable_steps: str | None, waits: bool
) -> None:
    """Issue 14: the first group of steps commits asynchronously (its WAL flush was a good
    part of a sign-up's PostgreSQL time); a call that runs no step, the group that ends
    the onboarding and the accept still wait, and `tenantry.durable_steps` makes the
    first group wait too (any value but a false one: a typo errs on the safe side).  The
    setting is the transaction's alone: the connection's next transaction waits again."""
    accepted = await machine.accept(
        pool, SignUp("lin@example.com", "Async Steps", "free"), idempotency_key=None,
        queue="default",
    )  # fmt: skip
    tid, oid = accepted.tenant_id, accepted.onboarding_id
    names, permissions = tenants.default_roles()
    args = machine.StepArgs(
        tenant_slugs=["async-steps"], owner_id=uuid.uuid4(), role_names=names,
        role_permissions=permissions, workspace_id=uuid.uuid4(),
    )  # fmt: skip

    async def commit_of(conn: Conn, todo: list[str]) -> str:
        async with tenant_tx_on(conn, tid) as tx:
            await tx.fetchrow(
                machine.Q["run_steps"], tid, oid, todo, list(STEPS), args.tenant_slugs,
                args.owner_id, args.role_names, args.role_permissions, args.workspace_id,
                None, None, None, None,
            )  # fmt: skip
            setting: str = await tx.fetchval("SELECT current_setting('synchronous_commit')")
        return setting

    async with pool.acquire() as conn:
        # (The test servers may run without waiting for the disk: wait here, as a
        # deployment does.)
        await conn.execute("SET synchronous_commit = on")
        if durable_steps is not None:
            await conn.execute(f"SET tenantry.durable_steps = '{durable_steps}'")
        try:
            assert await commit_of(conn, ["tenant"]) == ("on" if waits else "off")
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
            assert await commit_of(conn, ["tenant"]) == "on"  # done already: nothing ran
            assert await commit_of(conn, list(STEPS)) == "on"  # the end waits
        finally:
            await conn.execute("RESET synchronous_commit; RESET tenantry.durable_steps")
    assert (await machine.get(pool, tid, oid)).state == "completed"
