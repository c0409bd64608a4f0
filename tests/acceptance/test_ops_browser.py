"""The operations dashboard in a real browser (Debian's Chromium driven by Playwright):
sign-in required, each view, a live update without a reload, pause and resume of a
queue stopping and restarting the claims of a second, real `tenantry run` process, and
a bulk retry with its preview.  Set TENANTRY_SCREENSHOTS to a folder to keep a
screenshot of each view."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from playwright.async_api import Browser, Page, ViewportSize, expect

from tenantry.app import Service
from tenantry.jobs import queue as jobs
from tenantry.ops import operators as ops
from tenantry.tenants import store
from tests.acceptance.process import ServiceProcess
from tests.acceptance.test_browser import browser, shot  # noqa: F401 - the fixture
from tests.helpers import TENANT_A, background_service, eventually, service_settings

WIDE: ViewportSize = {"width": 1366, "height": 768}
PHONE: ViewportSize = {"width": 390, "height": 844}


@pytest.fixture
async def dashboard(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[Service]:
    """An HTTP-only process (it claims nothing): the queues are worked elsewhere."""
    settings = service_settings(tmp_path, run_worker=False)
    async with background_service(settings, app_url, pool, worker_pool) as svc:
        yield svc


@pytest.fixture
async def worker_process(database_url: str) -> AsyncIterator[ServiceProcess]:
    """A second process, the real `tenantry run`, working the default queue."""
    proc = await ServiceProcess.start(
        database_url,
        TENANTRY_QUEUES="default=4",
        TENANTRY_HANDLERS="tests.acceptance.handlers:registry",
    )
    try:
        await proc.started()
        yield proc
    finally:
        await proc.kill()


async def signed_in_page(chromium: Browser, base: str, worker_pool: asyncpg.Pool) -> Page:
    await ops.add(worker_pool, "root", "admin")
    token = await ops.link(worker_pool, "root")
    context = await chromium.new_context(viewport=WIDE)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    await page.goto(f"{base}/ops/sign-in?link={token}")
    await page.click("#use-link")
    await expect(page.locator("h1")).to_have_text("Overview")
    page.set_default_timeout(15_000)
    setattr(page, "errors_seen", errors)  # noqa: B010 - read back by the test
    return page


async def test_the_dashboard_is_never_open(browser: Browser, dashboard: Service) -> None:  # noqa: F811
    base = f"http://127.0.0.1:{dashboard.http.port}"
    context = await browser.new_context(viewport=WIDE)
    page = await context.new_page()
    await page.goto(f"{base}/ops/dead")
    assert page.url.startswith(f"{base}/ops/sign-in?next=")
    await expect(page.locator("h1")).to_have_text("Sign in")
    await page.fill("#key", "tok_not-a-key")
    await page.click("button[type=submit]")
    await expect(page.locator(".problem")).to_contain_text("does not sign anyone in")
    await shot(page, "ops-sign-in")
    await context.close()


async def test_each_view_live_update_pause_resume_and_bulk_retry(
    browser: Browser,  # noqa: F811
    dashboard: Service,
    worker_process: ServiceProcess,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:
    base = f"http://127.0.0.1:{dashboard.http.port}"
    # Something to look at: a tenant signed up (provisioned by the other process), a
    # webhook endpoint of it, jobs and dead jobs.
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/v1/onboardings",
            json={"email": "ops@example.com", "tenant_name": "Ops Test", "plan": "free"},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        ) as r,
    ):
        assert r.status == 202
        accepted = await r.json()
    tenant_id = uuid.UUID(accepted["tenant_id"])
    await eventually(lambda: _onboarding_state(admin_pool, tenant_id, "completed"), timeout=30)
    key = await store.create_key(pool, tenant_id)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/v1/webhook-endpoints",
            json={"url": "http://127.0.0.1:9/hook", "description": "ops test"},
            headers={"Authorization": f"Bearer {key.secret}"},
        ) as r,
    ):
        assert r.status == 201, await r.text()

    page = await signed_in_page(browser, base, worker_pool)

    # A live update: a job of a queue nobody works appears without a reload.
    updated = await page.evaluate("document.body.dataset.updated || ''")
    await jobs.enqueue(
        pool, tenant_id=TENANT_A, kind="report", payload={"invoice": 42}, queue="reports"
    )
    await expect(page.locator('tr[data-queue="reports"]')).to_be_visible()
    assert await page.evaluate("document.body.dataset.updated || ''") != updated
    await shot(page, "ops-overview")

    # Pause the default queue here; the other process stops claiming it.
    row = page.locator('tr[data-queue="default"]')
    await row.get_by_role("button", name="Pause").click()
    await expect(row.locator(".badge")).to_have_text("paused")
    await worker_process.wait_log(
        "queue_controls_applied", lambda x: x.get("queue") == "default" and x.get("paused") is True
    )
    ids = [
        await jobs.enqueue(pool, tenant_id=TENANT_A, kind="sleep", payload={"seconds": 0})
        for _ in range(3)
    ]
    await page.goto(f"{base}/ops/jobs?queue=default")
    await expect(page.locator("tbody tr")).to_have_count(3)
    await shot(page, "ops-jobs")
    await page.click(f'a[href="/ops/jobs/{TENANT_A}/{ids[0]}"]')
    await expect(page.locator("h1")).to_contain_text(f"Job {ids[0]}")
    await shot(page, "ops-job")
    states = await admin_pool.fetch(
        "SELECT state FROM tenantry.jobs WHERE id = ANY($1::bigint[])", ids
    )
    assert [r["state"] for r in states] == ["queued"] * 3
    await page.goto(f"{base}/ops")
    await row.get_by_role("button", name="Resume").click()
    await expect(row.locator(".badge")).to_have_text("running")
    await eventually(lambda: _gone(admin_pool, ids))

    # A bulk retry: the count first, then the action; the other process runs them.
    dead = await _dead_jobs(admin_pool, 3)
    await page.goto(f"{base}/ops/dead?kind=sleep")
    await expect(page.locator("tbody tr")).to_have_count(3)
    await shot(page, "ops-dead")
    await page.click("#bulk-retry")
    await expect(page.locator("#preview-count")).to_have_attribute("data-count", "3")
    await shot(page, "ops-dead-preview")
    await page.click("#confirm")
    await expect(page.locator(".notice")).to_contain_text("3 dead job(s) retried")
    await eventually(lambda: _gone(admin_pool, dead))

    for path, name in (
        ("/ops/webhooks", "ops-webhooks"),
        ("/ops/tenants", "ops-tenants"),
        (f"/ops/tenants/{tenant_id}", "ops-tenant"),
        ("/ops/periodic", "ops-periodic"),
        ("/ops/audit", "ops-audit"),
    ):
        await page.goto(base + path)
        await expect(page.locator("h1")).to_be_visible()
        await shot(page, name)
    await page.goto(f"{base}/ops/tenants/{tenant_id}")
    await expect(page.locator("section.onboarding .badge")).to_have_text("completed")
    await page.goto(f"{base}/ops/audit")
    for action in ("queue_paused", "queue_resumed", "dead_jobs_retry"):
        await expect(page.locator("td", has_text=action).first).to_be_visible()
    await page.goto(f"{base}/ops/webhooks")
    await expect(page.locator("td.url")).to_contain_text("http://127.0.0.1:9/hook")

    # On a phone: the same overview, scrollable tables, nothing cut off.
    await page.set_viewport_size(PHONE)
    await page.goto(f"{base}/ops")
    await expect(page.locator('tr[data-queue="default"]')).to_be_attached()
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    await shot(page, "ops-overview-phone")
    assert getattr(page, "errors_seen") == []  # noqa: B009


async def _onboarding_state(admin: asyncpg.Pool, tenant_id: uuid.UUID, state: str) -> bool:
    found: str | None = await admin.fetchval(
        "SELECT state FROM tenantry.onboardings WHERE tenant_id = $1", tenant_id
    )
    return found == state


async def _gone(admin: asyncpg.Pool, ids: list[int]) -> bool:
    left = await admin.fetchval(
        "SELECT count(*) FROM tenantry.jobs WHERE id = ANY($1::bigint[])", ids
    )
    return bool(left == 0)


async def _dead_jobs(admin: asyncpg.Pool, n: int) -> list[int]:
    return [
        await admin.fetchval(
            "INSERT INTO tenantry.dead_jobs (tenant_id, id, queue, kind, payload, priority,"
            " attempts, errors, last_error, reason, created_at)"
            " VALUES ($1, nextval(pg_get_serial_sequence('tenantry.jobs', 'id')), 'default',"
            " 'sleep', $2, 0, 3, $3, 'boom', 'exhausted', now()) RETURNING id",
            TENANT_A,
            {"seconds": 0},
            [{"attempt": 3, "error": "boom", "traceback": "Traceback ...\nValueError: boom"}],
        )
        for _ in range(n)
    ]
