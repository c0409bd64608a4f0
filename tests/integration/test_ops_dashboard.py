"""The operations dashboard over real HTTP: never open, sign-in by key or one-time
link, CSRF and roles on every action, bulk actions that show their count first, keyset
paging, escaping of whatever tenants wrote, the audit trail, and the live stream."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg
import pytest
from yarl import URL

from tenantry.app import Service
from tenantry.jobs import queue as jobs
from tenantry.jobs.registry import Registry
from tenantry.ops import operators as ops
from tenantry.ops.web import DASHBOARD
from tests.helpers import TENANT_A, TENANT_B, sse_frames
from tests.integration.test_webhooks import new_tenant, service

GET_PAGES = [
    "/ops",
    "/ops/jobs",
    "/ops/jobs/aaaaaaaa-0000-0000-0000-000000000001/1",
    "/ops/dead",
    "/ops/dead/preview?action=retry",
    "/ops/webhooks",
    "/ops/webhooks/deliveries/preview?action=replay",
    f"/ops/webhooks/deliveries/{uuid.uuid4()}",
    "/ops/tenants",
    f"/ops/tenants/{TENANT_A}",
    "/ops/periodic",
    "/ops/audit",
    "/ops/events",
]
POST_ACTIONS = [
    "/ops/queues",
    "/ops/dead/bulk",
    f"/ops/dead/{TENANT_A}/1",
    "/ops/webhooks/deliveries",
]


@pytest.fixture
async def svc(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[Service]:
    async with service(tmp_path, app_url, pool, worker_pool) as s:
        yield s


def base(svc: Service) -> str:
    return f"http://127.0.0.1:{svc.http.port}"


class Browser:
    """A cookie-keeping client, as a browser is (IP hosts allowed)."""

    def __init__(self, svc: Service) -> None:
        self.base = base(svc)
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.http.close()

    async def get(self, path: str, **kw: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.get(self.base + path, allow_redirects=False, **kw) as r:
            return r.status, await r.text(), r

    async def post(
        self, path: str, data: dict[str, str], **kw: Any
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.post(self.base + path, data=data, allow_redirects=False, **kw) as r:
            return r.status, await r.text(), r

    async def csrf(self) -> str:
        _, text, _ = await self.get("/ops")
        found = re.search(r'name="csrf" value="([^"]+)"', text)
        assert found, text[:500]
        return found[1]


@pytest.fixture
async def browser(svc: Service) -> AsyncIterator[Browser]:
    b = Browser(svc)
    try:
        yield b
    finally:
        await b.close()


async def sign_in(b: Browser, worker_pool: asyncpg.Pool, name: str, role: str) -> str:
    key = await ops.add(worker_pool, name, role)
    status, _, r = await b.post("/ops/sign-in", {"key": key, "next": "/ops"})
    assert status == 303 and r.headers["Location"] == "/ops"
    return key


async def test_every_page_and_action_needs_a_session(browser: Browser) -> None:
    for path in GET_PAGES:
        status, _, r = await browser.get(path)
        assert status == 303, path
        assert r.headers["Location"].startswith("/ops/sign-in?next="), path
    for path in POST_ACTIONS:
        status, text, _ = await browser.post(path, {"action": "pause", "csrf": "x"})
        assert status == 401, path
        assert "sign in again" in text
    status, text, r = await browser.get("/ops/sign-in")
    assert status == 200 and "Operator key" in text
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Referrer-Policy"] == "same-origin"


async def test_a_key_signs_in_and_sets_a_strict_cookie(
    browser: Browser, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    key = await ops.add(worker_pool, "alice", "read")
    status, text, _ = await browser.post("/ops/sign-in", {"key": "tok_wrong"})
    assert status == 401 and "does not sign anyone in" in text
    assert not browser.http.cookie_jar.filter_cookies(URL(browser.base + "/ops"))
    status, _, r = await browser.post(
        "/ops/sign-in", {"key": key, "next": "/ops/jobs"}, headers={"X-Forwarded-Proto": "https"}
    )
    assert status == 303 and r.headers["Location"] == "/ops/jobs"
    cookie = r.cookies["tenantry_ops"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/ops"
    assert cookie["secure"]  # served over HTTPS (behind a proxy that says so)
    # The database keeps only the hash of the session's secret.
    stored = await admin_pool.fetch("SELECT token_hash FROM tenantry.operator_sessions")
    assert [r["token_hash"] for r in stored] == [ops.digest(cookie.value)]
    # A Secure cookie does not travel over plain HTTP: sign in again without the proxy.
    status, _, r = await browser.post("/ops/sign-in", {"key": key})
    assert status == 303 and not r.cookies["tenantry_ops"]["secure"]
    status, text, _ = await browser.get("/ops")
    assert status == 200 and "alice" in text


async def test_a_link_signs_in_once_and_expires(
    browser: Browser, worker_pool: asyncpg.Pool
) -> None:
    await ops.add(worker_pool, "bob", "admin")
    token = await ops.link(worker_pool, "bob")
    status, text, _ = await browser.get(f"/ops/sign-in?link={token}")
    assert status == 200 and 'id="use-link"' in text  # a GET alone signs nobody in
    assert (
        await worker_pool.fetchval(
            "SELECT sessions FROM tenantry.operators_list() WHERE name = 'bob'"
        )
        == 0
    )
    status, _, _ = await browser.post("/ops/sign-in", {"link": token})
    assert status == 303
    other = Browser.__new__(Browser)
    other.base, other.http = browser.base, aiohttp.ClientSession()
    try:
        status, _, _ = await other.post("/ops/sign-in", {"link": token})
        assert status == 401  # used
        stale = await ops.link(worker_pool, "bob", ttl_seconds=0)
        status, _, _ = await other.post("/ops/sign-in", {"link": stale})
        assert status == 401  # expired
    finally:
        await other.http.close()


async def test_disabling_an_operator_ends_its_sessions(
    browser: Browser, worker_pool: asyncpg.Pool
) -> None:
    await sign_in(browser, worker_pool, "carol", "admin")
    assert (await browser.get("/ops"))[0] == 200
    await ops.update(worker_pool, "carol", disabled=True)
    assert (await browser.get("/ops"))[0] == 303


async def test_sign_in_never_redirects_elsewhere(
    browser: Browser, worker_pool: asyncpg.Pool
) -> None:
    key = await ops.add(worker_pool, "dave", "read")
    for target in ("https://evil.example/", "//evil.example/ops", "/\\evil.example", "/v1/x"):
        status, _, r = await browser.post("/ops/sign-in", {"key": key, "next": target})
        assert status == 303 and r.headers["Location"] == "/ops", target


async def test_actions_need_an_admin_a_csrf_token_and_this_origin(
    browser: Browser, worker_pool: asyncpg.Pool, svc: Service
) -> None:
    await sign_in(browser, worker_pool, "reader", "read")
    csrf = await browser.csrf()
    status, text, _ = await browser.post(
        "/ops/queues", {"action": "pause", "queue": "default", "csrf": csrf}
    )
    assert status == 403 and "Only an admin" in text
    browser.http.cookie_jar.clear()
    await sign_in(browser, worker_pool, "admin1", "admin")
    csrf = await browser.csrf()
    for form, headers in (
        ({"action": "pause", "queue": "default"}, {}),
        ({"action": "pause", "queue": "default", "csrf": "forged"}, {}),
        ({"action": "pause", "queue": "default", "csrf": csrf}, {"Origin": "https://evil.example"}),
        ({"action": "pause", "queue": "default", "csrf": csrf}, {"Origin": "null"}),
    ):
        status, _, _ = await browser.post("/ops/queues", form, headers=headers)
        assert status == 403, form
    assert not any(c.paused for c in await jobs.queue_controls(worker_pool))
    status, _, _ = await browser.post(
        "/ops/queues",
        {"action": "pause", "queue": "default", "csrf": csrf},
        headers={"Origin": base(svc)},
    )
    assert status == 303
    controls = {c.queue: c for c in await jobs.queue_controls(worker_pool)}
    assert controls["default"].paused and controls["default"].updated_by == "admin1"
    status, text, _ = await browser.post(
        "/ops/queues",
        {"action": "concurrency", "queue": "default", "concurrency": "abc", "csrf": csrf},
    )
    assert status == 422 and "concurrency" in text
    # Audited: the event in the system tenant's outbox, and on the audit page.
    events = await worker_pool.fetch(
        "SELECT operator, action, detail, affected FROM tenantry.operator_audit_page(NULL, 10)"
    )
    assert [(e["operator"], e["action"], e["affected"]) for e in events] == [
        ("admin1", "queue_paused", 1)
    ]
    assert events[0]["detail"] == {"queue": "default"}
    status, text, _ = await browser.get("/ops/audit")
    assert status == 200 and "queue_paused" in text and "admin1" in text


async def _dead_jobs(admin_pool: asyncpg.Pool, n: int, kind: str = "sync") -> list[int]:
    ids = []
    for i in range(n):
        ids.append(
            await admin_pool.fetchval(
                "INSERT INTO tenantry.dead_jobs (tenant_id, id, queue, kind, payload, priority,"
                " attempts, errors, reason, created_at)"
                " VALUES ($1, nextval(pg_get_serial_sequence('tenantry.jobs', 'id')), 'default',"
                " $2, $3, 0, 3, '[]', 'exhausted', now()) RETURNING id",
                TENANT_A if i % 2 else TENANT_B,
                kind,
                {"n": i},
            )
        )
    return ids


async def test_a_bulk_retry_shows_its_count_first_and_refuses_a_stale_one(
    browser: Browser, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    await _dead_jobs(admin_pool, 3, "sync")
    await _dead_jobs(admin_pool, 2, "other")
    await sign_in(browser, worker_pool, "admin2", "admin")
    csrf = await browser.csrf()
    status, text, _ = await browser.get("/ops/dead/preview?action=retry&kind=sync")
    assert status == 200 and 'data-count="3"' in text
    form = {"action": "retry", "kind": "sync", "tenant": "", "reason": "", "csrf": csrf}
    # The set changed since the count was shown: refused, nothing retried.
    await _dead_jobs(admin_pool, 1, "sync")
    status, text, _ = await browser.post("/ops/dead/bulk", {**form, "expected": "retry:3"})
    assert status == 409 and "4 dead jobs match now" in text
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 0
    status, text, _ = await browser.post("/ops/dead/bulk", {**form, "expected": "retry:4"})
    assert status == 200 and "4 dead job(s) retried" in text
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs WHERE kind = 'sync'") == 4
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.dead_jobs") == 2
    events = await worker_pool.fetch(
        "SELECT action, detail, affected FROM tenantry.operator_audit_page(NULL, 10)"
    )
    assert events[0]["action"] == "dead_jobs_retry" and events[0]["affected"] == 4


async def test_jobs_are_paged_by_key_and_searched_by_payload(
    browser: Browser, worker_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    ids = set()
    for i in range(130):
        ids.add(
            await jobs.enqueue(
                pool,
                tenant_id=TENANT_A if i % 3 else TENANT_B,
                kind="invoice",
                payload={"invoice": i, "customer": {"id": f"c-{i % 7}"}},
                queue="paused",  # no worker claims it: the rows stay put
            )
        )
    await sign_in(browser, worker_pool, "reader2", "read")
    seen: list[int] = []
    path = "/ops/jobs?queue=paused"
    pages = 0
    while path:
        status, text, _ = await browser.get(path)
        assert status == 200
        pages += 1
        seen += [int(x) for x in re.findall(r'href="/ops/jobs/[0-9a-f-]+/(\d+)"', text)]
        nxt = re.search(r'rel="next" href="([^"]+)"', text)
        path = nxt[1].replace("&amp;", "&") if nxt else ""
    assert pages == 3 and sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    status, text, _ = await browser.get("/ops/jobs?payload=invoice:42")
    assert len(re.findall(r'href="/ops/jobs/[0-9a-f-]+/(\d+)"', text)) == 1
    status, text, _ = await browser.get("/ops/jobs?payload=customer.id:c-3")
    assert len(re.findall(r'href="/ops/jobs/[0-9a-f-]+/(\d+)"', text)) == len(
        [i for i in range(130) if i % 7 == 3]
    )
    status, text, _ = await browser.get("/ops/jobs?payload=nocolon")
    assert status == 422 and "payload" in text
    # A read is bounded: a filter that matches only the last row reads the table a
    # stretch per page, and the pages still reach it.
    last = max(ids)
    after = None
    found: list[int] = []
    for _ in range(200):
        page = await jobs.jobs_search(
            worker_pool, jobs.JobSearch(job_id=last), after, limit=10, scan_cap=25
        )
        found += [r["id"] for r in page.rows]
        if page.next_key is None:
            break
        after = page.next_key
    assert found == [last]


async def test_pages_escape_what_tenants_wrote(
    browser: Browser, worker_pool: asyncpg.Pool, pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    evil = "<script>alert(1)</script>"
    huge = "x" * 500_000
    job_id = await jobs.enqueue(
        pool,
        tenant_id=TENANT_A,
        kind=evil,
        payload={"note": "</pre><img src=x onerror=alert(1)>", "big": huge, "u": "\u2028é"},
        queue="paused",
    )
    await admin_pool.execute(
        "UPDATE tenantry.jobs SET last_error = $1, errors = $2 WHERE id = $3",
        evil,
        [{"attempt": 1, "error": evil, "traceback": evil}],
        job_id,
    )
    await sign_in(browser, worker_pool, "reader3", "read")
    for path in ("/ops/jobs?queue=paused", f"/ops/jobs/{TENANT_A}/{job_id}"):
        status, text, _ = await browser.get(path)
        assert status == 200, path
        assert evil not in text and "<img src=x" not in text, path
        assert "&lt;script&gt;" in text, path
        assert len(text) < 200_000, path  # the payload is cut, not sent whole


async def test_the_overview_shows_queues_and_the_stream_says_when_something_changed(
    browser: Browser, worker_pool: asyncpg.Pool, pool: asyncpg.Pool, svc: Service
) -> None:
    await sign_in(browser, worker_pool, "watcher", "read")
    await jobs.set_queue_control(worker_pool, "reports", "ops", paused=True)
    status, text, _ = await browser.get("/ops")
    assert status == 200 and 'data-queue="reports"' in text and "paused" in text
    async with browser.http.get(browser.base + "/ops/events") as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        frames = sse_frames(r)
        first = await anext(frames)
        assert first.retry == 3000
        await jobs.enqueue(pool, tenant_id=TENANT_A, kind="k", queue="elsewhere")
        with anyio.fail_after(10):
            async for frame in frames:
                if frame.event == "changed":
                    break


async def test_a_head_request_on_the_live_stream_gets_headers_and_no_body(
    browser: Browser, worker_pool: asyncpg.Pool
) -> None:
    """aiohttp answers HEAD on every GET route: the live stream wrote its retry line and
    keepalives after the HEAD's headers and held the connection, so the next request
    on it read them as its answer."""
    await sign_in(browser, worker_pool, "header", "read")
    with anyio.fail_after(10):
        async with browser.http.head(browser.base + "/ops/events") as r:
            assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        status, text, _ = await browser.get("/ops")
    assert status == 200 and "Overview" in text


# --- What an adversarial review found ----------------------------------------------------

BAD_PAGES = [
    "/ops/dead?tenant=zz",
    "/ops/dead?reason=nope",
    "/ops/dead?before=x",
    "/ops/dead?before=0001-01-01T00:00:00%2B14:00~1",
    "/ops/dead?before=9999-12-31T23:59:59-14:00~1",
    "/ops/dead?before=2024-01-01T00:00:00%2B00:00~99999999999999999999",
    "/ops/jobs?id=99999999999999999999",
    "/ops/jobs?id=%C2%B2",
    f"/ops/jobs?after={TENANT_A}:99999999999999999999",
    "/ops/jobs?queue=%00",
    "/ops/jobs?kind=a%00b",
    "/ops/jobs?payload=" + ".".join(["a"] * 300) + ":1",
    '/ops/jobs?payload=a:"%5Cu0000"',
    "/ops/audit?before=99999999999999999999",
    "/ops/audit?before=%C2%B2",
    f"/ops/jobs/{TENANT_A}/99999999999999999999",
    "/ops/dead/preview?action=bad",
    "/ops/dead/preview?action=retry&kind=%00",
    "/ops/webhooks?event_type=%00",
    "/ops/webhooks/deliveries/preview?action=x",
    "/ops/webhooks/deliveries/preview?action=replay&event_type=%00",
]


async def test_bad_input_is_a_clear_4xx_never_a_500(
    browser: Browser, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    await sign_in(browser, worker_pool, "fuzzer", "admin")
    for path in BAD_PAGES:
        status, text, _ = await browser.get(path)
        assert 400 <= status < 500, (path, status, text[:300])
    csrf = await browser.csrf()
    for path, form in (
        ("/ops/queues", {"action": "pause", "queue": "z\x00z"}),
        ("/ops/queues", {"action": "concurrency", "queue": "q", "concurrency": "²"}),
        ("/ops/dead/bulk", {"action": "retry", "kind": "a\x00", "expected": "retry:0"}),
        (f"/ops/dead/{TENANT_A}/99999999999999999999", {"action": "retry"}),
        ("/ops/webhooks/deliveries", {}),
    ):
        status, text, _ = await browser.post(path, {**form, "csrf": csrf})
        assert 400 <= status < 500, (path, form, status, text[:300])
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.queue_controls") == 0


async def test_an_action_needs_its_action_and_the_count_shown_for_it(
    browser: Browser, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    """Regression: a POST without `action` discarded (the else branch), and a count
    shown for a retry confirmed a discard."""
    ids = await _dead_jobs(admin_pool, 2, "boom")
    await sign_in(browser, worker_pool, "admin3", "admin")
    csrf = await browser.csrf()
    status, _, _ = await browser.post(f"/ops/dead/{TENANT_B}/{ids[0]}", {"csrf": csrf})
    assert status == 422
    status, _, _ = await browser.post("/ops/dead/bulk", {"csrf": csrf, "expected": "retry:2"})
    assert status == 422
    status, text, _ = await browser.get("/ops/dead/preview?action=retry&kind=boom")
    assert 'value="retry:2"' in text
    status, _, _ = await browser.post(
        "/ops/dead/bulk", {"csrf": csrf, "action": "discard", "kind": "boom", "expected": "retry:2"}
    )
    assert status == 409
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.dead_jobs") == 2
    events = await worker_pool.fetch("SELECT action FROM tenantry.operator_audit_page(NULL, 10)")
    assert events == []


async def test_a_forged_sign_out_is_refused_and_the_session_lives(
    browser: Browser, worker_pool: asyncpg.Pool
) -> None:
    await sign_in(browser, worker_pool, "eve", "read")
    status, _, _ = await browser.post(
        "/ops/sign-out", {}, headers={"Origin": "http://evil.example"}
    )
    assert status == 403
    assert (await browser.get("/ops/audit"))[0] == 200
    csrf = await browser.csrf()
    status, _, _ = await browser.post("/ops/sign-out", {"csrf": csrf})
    assert status == 303
    assert (await browser.get("/ops/audit"))[0] == 303


async def test_the_origin_must_be_this_sites_scheme_and_host(
    browser: Browser, worker_pool: asyncpg.Pool, svc: Service
) -> None:
    await sign_in(browser, worker_pool, "admin4", "admin")
    csrf = await browser.csrf()
    form = {"action": "pause", "queue": "q", "csrf": csrf}
    host = f"127.0.0.1:{svc.http.port}"
    status, _, _ = await browser.post("/ops/queues", form, headers={"Origin": f"https://{host}"})
    assert status == 403  # the right host, the wrong scheme
    # Behind a proxy that rewrites Host and says what the browser asked for.
    status, _, _ = await browser.post(
        "/ops/queues",
        form,
        headers={
            "Origin": "https://ops.example",
            "X-Forwarded-Host": "ops.example",
            "X-Forwarded-Proto": "https",
        },
    )
    assert status == 303


async def test_replay_all_without_a_state_means_the_dead_deliveries(
    browser: Browser,
    worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
    pool: asyncpg.Pool,
    svc: Service,
) -> None:
    """Regression: "Replay all matching..." with no state picked re-sent every
    delivered webhook."""
    acme = await new_tenant(pool, svc)
    endpoint = await acme.endpoint("http://127.0.0.1:9/hook")
    for event_id, state in enumerate(("delivered", "delivered", "dead"), start=1):
        await admin_pool.execute(
            "INSERT INTO tenantry.webhook_deliveries (tenant_id, endpoint_id, event_id,"
            " event_type, body, state) VALUES ($1, $2, $3, 'x', '{}', $4)",
            acme.id,
            uuid.UUID(endpoint["id"]),
            event_id,
            state,
        )
    await sign_in(browser, worker_pool, "admin5", "admin")
    status, text, _ = await browser.get("/ops/webhooks/deliveries/preview?action=replay")
    assert status == 200 and 'data-count="1"' in text and "state <b>dead</b>" in text


async def test_dashboard_pages_do_not_wait_for_the_workers_connections(
    browser: Browser, worker_pool: asyncpg.Pool, svc: Service
) -> None:
    """Regression: pages took the worker's pool (3 connections), so a few slow pages
    held up its polls, rescues and readings (a resume took 14.6 s to reach a job)."""
    await sign_in(browser, worker_pool, "reader5", "read")
    held = [await svc.worker_pool.acquire() for _ in range(svc.worker_pool.get_max_size())]
    try:
        with anyio.fail_after(5):
            status, _, _ = await browser.get("/ops/audit")
        assert status == 200
    finally:
        for conn in held:
            await svc.worker_pool.release(conn)


async def test_a_live_stream_ends_with_its_session_and_streams_are_capped(
    browser: Browser, worker_pool: asyncpg.Pool, svc: Service
) -> None:
    """Regression: streams outlived a disabled operator's session, and any number
    could be opened."""
    dash = svc.http._app[DASHBOARD]
    dash.session_check_every = 0.2
    dash.max_streams = 1
    await sign_in(browser, worker_pool, "viewer", "read")
    async with browser.http.get(browser.base + "/ops/events") as r:
        assert r.status == 200
        status, text, _ = await browser.get("/ops/events")
        assert status == 503 and "Too many live pages" in text
        await ops.update(worker_pool, "viewer", disabled=True)
        with anyio.fail_after(10):
            async for _ in sse_frames(r):
                pass  # ends when the server closes it
    assert dash.streams == 0


async def test_the_periodic_page_shows_each_schedule_its_last_period_and_the_next(
    browser: Browser, worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool, svc: Service
) -> None:
    reg = Registry()

    async def nightly(_job: Any) -> None:
        return None

    reg.add("reports.nightly", nightly, cron="0 3 * * *")
    reg.add("cache.sweep", nightly, every=timedelta(minutes=5))
    svc.http._app[DASHBOARD].periodic = reg.periodic()
    await admin_pool.execute(
        "INSERT INTO tenantry.periodic_runs (name, last_period) VALUES ($1, $2)",
        "reports.nightly",
        datetime(2026, 12, 6, 3, 0, tzinfo=UTC),
    )
    await sign_in(browser, worker_pool, "reader6", "read")
    status, text, _ = await browser.get("/ops/periodic")
    assert status == 200
    assert "reports.nightly" in text and "0 3 * * *" in text and "2026-12-06 03:00:00" in text
    assert "cache.sweep" in text and "every 0:05:00" in text
    # The next run of the nightly job: 03:00 UTC of today or tomorrow.
    now = datetime.now(UTC)
    upcoming = now.replace(hour=3, minute=0, second=0, microsecond=0)
    if upcoming <= now:
        upcoming += timedelta(days=1)
    assert upcoming.strftime("%Y-%m-%d %H:%M:%S") in text
