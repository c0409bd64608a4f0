"""The sign-up page in a real browser (Debian's Chromium driven by Playwright) against the
whole service in this process: the form, the server's field errors, the live step list
over EventSource, and a failure shown as a failure."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

pytest.importorskip(
    "playwright.async_api",
    reason="the Python package playwright is not installed (pip install -e '.[dev]')",
)

from playwright.async_api import (
    Browser,
    Locator,
    Page,
    Request,
    Route,
    async_playwright,
    expect,
)

from tenantry.config import Settings
from tenantry.onboarding.model import STEPS
from tests import smtp
from tests.helpers import background_service, service_settings

CHROMIUM = os.environ.get("TENANTRY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium, or set TENANTRY_CHROMIUM to"
        " a Chromium binary)",
        allow_module_level=True,
    )

# Provisioning runs seven jobs' worth of transactions; generous, but far below the
# per-test timeout.
PROVISIONED_WITHIN_MS = 15_000
REJECTED = smtp.NO_SUCH_USER  # the test SMTP server refuses it (550)


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield b
        finally:
            await b.close()


@dataclass
class Tab:
    """A page plus what it did: the sign-up requests it sent and any script errors."""

    page: Page
    posts: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "404 http://..." of each error answer

    def on_request(self, request: Request) -> None:
        if request.method == "POST" and request.url.endswith("/v1/onboardings"):
            self.posts.append(request)

    def body(self, n: int) -> Any:
        return orjson.loads(self.posts[n].post_data or b"null")


@pytest.fixture
async def tab(browser: Browser) -> AsyncIterator[Tab]:
    context = await browser.new_context()
    page = await context.new_page()
    t = Tab(page)
    page.on("request", t.on_request)
    page.on("pageerror", lambda exc: t.errors.append(str(exc)))
    page.on(
        "response", lambda r: t.refused.append(f"{r.status} {r.url}") if r.status >= 400 else None
    )
    try:
        yield t
    finally:
        await context.close()
    assert t.errors == [], "the page raised script errors"


@asynccontextmanager
async def site(
    settings: Settings, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[str]:
    async with background_service(settings, app_url, pool, worker_pool) as svc:
        yield f"http://127.0.0.1:{svc.http.port}/"


@pytest.fixture
async def url(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[str]:
    async with site(service_settings(tmp_path), app_url, pool, worker_pool) as u:
        yield u


@pytest.fixture
async def url_with_smtp(
    tmp_path: Path,
    app_url: str,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    smtp_server: smtp.Server,
) -> AsyncIterator[str]:
    settings = service_settings(tmp_path, smtp_url=smtp_server.url())
    async with site(settings, app_url, pool, worker_pool) as u:
        yield u


async def fill(page: Page, email: str, tenant_name: str, plan: str = "free") -> None:
    await page.get_by_test_id("email").fill(email)
    await page.get_by_test_id("tenant_name").fill(tenant_name)
    await page.get_by_test_id(f"plan-{plan}").check()


async def shot(page: Page, name: str) -> None:
    """A screenshot of a state, for a person to look at: only where
    TENANTRY_SCREENSHOTS names a folder."""
    folder = os.environ.get("TENANTRY_SCREENSHOTS")
    if folder:
        await page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def step(page: Page, name: str) -> Locator:
    return page.locator(f'[data-testid="step"][data-step="{name}"]')


async def test_sign_up_shows_each_step_then_ready(tab: Tab, url: str) -> None:
    page = tab.page
    await page.goto(url)
    await fill(page, "ada@example.com", "Analytical Engines", "pro")
    await page.get_by_test_id("submit").click()

    for name in STEPS:
        await expect(step(page, name)).to_have_attribute(
            "data-state", "done", timeout=PROVISIONED_WITHIN_MS
        )
    status = page.get_by_test_id("status")
    await expect(status).to_have_attribute("data-state", "completed")
    # What happens next, with the address the welcome email goes to.
    await expect(status).to_contain_text("Analytical Engines is ready, and you are its owner.")
    await expect(page.get_by_test_id("next")).to_have_text(
        "A welcome email is on its way to ada@example.com."
    )
    await expect(page.get_by_test_id("step")).to_have_count(len(STEPS))
    await expect(step(page, "tenant")).to_contain_text("Creating your organisation")
    await expect(step(page, "provisioned")).to_contain_text("Done")
    # Each step shows when it was done (a <time> with the server's timestamp).
    await expect(step(page, "welcome_email").locator("time")).to_have_attribute(
        "datetime", re.compile(r"^\d{4}-\d\d-\d\dT")
    )
    await expect(page.get_by_test_id("progress-text")).to_have_text("7 of 7 steps")
    await expect(page.get_by_test_id("progress")).to_have_attribute("value", "7")
    await expect(page.get_by_test_id("reconnecting")).to_be_hidden()
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()
    await expect(page.get_by_test_id("submit")).to_be_disabled()
    # Its icon loaded, and nothing the page asked for was refused (the console showed
    # a 404 for /favicon.ico).
    icon = await page.evaluate(
        "fetch(document.querySelector('link[rel=icon]').href)"
        ".then(r => `${r.status} ${r.headers.get('content-type')}`)"
    )
    assert icon == "200 image/svg+xml"
    assert tab.refused == []

    assert len(tab.posts) == 1
    post = tab.posts[0]
    assert tab.body(0) == {
        "email": "ada@example.com",
        "tenant_name": "Analytical Engines",
        "plan": "pro",
    }
    headers = await post.all_headers()
    assert headers["content-type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f-]{36}", headers["idempotency-key"])


async def test_server_field_errors_show_next_to_the_fields(tab: Tab, url: str) -> None:
    page = tab.page
    # Hold the first sign-up request until the page has been checked while it is in flight.
    release = asyncio.Event()
    held: list[Route] = []

    async def hold(route: Route) -> None:
        held.append(route)
        if len(held) == 1:
            await release.wait()
        await route.continue_()

    await page.route("**/v1/onboardings", hold)
    await page.goto(url)
    # Both invalid in ways the browser itself would have stopped (type=email, minlength):
    # the form is novalidate, so the server's answer is what the user sees.
    await fill(page, "not-an-email", "ab")
    await page.get_by_test_id("submit").click()
    await expect(page.get_by_test_id("submit")).to_be_disabled()
    await page.get_by_test_id("tenant_name").press("Enter")  # a second try while in flight
    release.set()

    email_error = page.get_by_test_id("email-error")
    name_error = page.get_by_test_id("tenant_name-error")
    await expect(email_error).to_have_text("This is not an email address.")
    await expect(name_error).to_have_text("Must be 3 to 50 characters.")
    await expect(page.get_by_test_id("plan-error")).to_be_hidden()
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()
    # Next to its field: in the same block, and announced with it.
    for name in ("email", "tenant_name"):
        field_ = page.locator(".field").filter(has=page.get_by_test_id(name))
        await expect(field_.get_by_test_id(f"{name}-error")).to_be_visible()
        await expect(page.get_by_test_id(name)).to_have_attribute("aria-invalid", "true")
        await expect(page.get_by_test_id(name)).to_have_attribute(
            "aria-describedby", re.compile(rf"\b{name}-error\b")
        )
    await expect(page.get_by_test_id("submit")).to_be_enabled()
    await expect(page.locator("#tracker")).to_be_hidden()
    await shot(page, "field-errors")
    assert len(tab.posts) == 1, "one submission, one request"

    # Corrected, it is a new submission (a new key) and goes through.
    await fill(page, "ada@example.com", "Analytical Engines")
    await page.get_by_test_id("submit").click()
    await expect(page.get_by_test_id("status")).to_have_attribute(
        "data-state", "completed", timeout=PROVISIONED_WITHIN_MS
    )
    await expect(email_error).to_be_hidden()
    await expect(name_error).to_be_hidden()
    assert len(tab.posts) == 2
    keys = [(await p.all_headers())["idempotency-key"] for p in tab.posts]
    assert keys[0] != keys[1]


async def test_a_failed_onboarding_is_shown_as_a_failure(tab: Tab, url_with_smtp: str) -> None:
    page = tab.page
    await page.goto(url_with_smtp)
    await fill(page, REJECTED, "Ghost Company")
    await page.get_by_test_id("submit").click()

    status = page.get_by_test_id("status")
    await expect(status).to_have_attribute("data-state", "failed", timeout=PROVISIONED_WITHIN_MS)
    await expect(status).to_be_visible()
    await expect(status).to_have_class(re.compile(r"\berror\b"))
    # In plain words, with what to do; the server's raw reply is for operators.
    await expect(status).to_contain_text(
        f"The mail server of example.test refused the address {REJECTED}, so the welcome"
        " email could not be delivered. Check the address and try again."
    )
    await expect(status).not_to_contain_text("550")
    await expect(status).not_to_contain_text("ready")
    await expect(page.get_by_test_id("ref")).to_have_text(
        re.compile(r"^Reference for support: [0-9a-f-]{36}$")
    )
    # The steps done before the mail were undone; the mail failed; the end never came.
    for name in STEPS[: STEPS.index("welcome_email")]:
        await expect(step(page, name)).to_have_attribute("data-state", "undone")
        await expect(step(page, name).locator("time")).to_have_text("undone")
    await expect(step(page, "welcome_email")).to_have_attribute("data-state", "failed")
    await expect(step(page, "provisioned")).to_have_attribute("data-state", "pending")
    await expect(page.get_by_test_id("progress-text")).to_have_text("0 of 7 steps kept")
    await shot(page, "failed")
    await expect(page.get_by_test_id("reconnecting")).to_be_hidden()

    # The form is open again, the field at fault marked: correct it and try again.
    await expect(page.get_by_test_id("email-error")).to_have_text(
        "The mail server refused this address."
    )
    await expect(page.get_by_test_id("email")).to_have_attribute("aria-invalid", "true")
    await expect(page.get_by_test_id("email")).to_be_focused()
    await expect(page.get_by_test_id("tenant_name")).to_have_value("Ghost Company")
    submit = page.get_by_test_id("submit")
    await expect(submit).to_be_enabled()
    await expect(submit).to_have_text("Try again")
    await page.get_by_test_id("email").fill("ada@example.com")
    await submit.click()
    await expect(status).to_have_attribute("data-state", "completed", timeout=PROVISIONED_WITHIN_MS)
    await expect(page.get_by_test_id("email-error")).to_be_hidden()
    for name in STEPS:
        await expect(step(page, name)).to_have_attribute("data-state", "done")
    assert len(tab.posts) == 2
    keys = [(await p.all_headers())["idempotency-key"] for p in tab.posts]
    assert keys[0] != keys[1], "a try after a failure is a new submission"
    assert tab.body(1)["email"] == "ada@example.com"
    assert tab.body(1)["tenant_name"] == "Ghost Company"


async def test_a_reload_resumes_the_sign_up_where_it_is(
    tab: Tab, url: str, admin_pool: asyncpg.Pool
) -> None:
    """Regression: after a reload the form was empty and the status token gone, although
    the page said "Reload the page to see how far it got"."""
    page = tab.page
    status = page.get_by_test_id("status")
    await page.goto(url)
    async with admin_pool.acquire() as conn:
        # Provisioning waits at its first step (it creates the tenant) while this holds.
        held = conn.transaction()
        await held.start()
        try:
            await conn.execute("LOCK TABLE tenantry.tenants IN EXCLUSIVE MODE")
            await fill(page, "ada@example.com", "Analytical Engines", "pro")
            await page.get_by_test_id("submit").click()
            await expect(status).to_have_attribute("data-state", "accepted")
            await page.reload()
            # Resumed: what was sent, locked, and its steps followed again.
            await expect(status).to_have_attribute("data-state", "accepted")
            await expect(page.get_by_test_id("email")).to_have_value("ada@example.com")
            await expect(page.get_by_test_id("tenant_name")).to_have_value("Analytical Engines")
            await expect(page.get_by_test_id("plan-pro")).to_be_checked()
            await expect(page.get_by_test_id("email")).to_be_disabled()
            await expect(page.get_by_test_id("submit")).to_be_disabled()
            await expect(step(page, "tenant")).to_have_attribute("data-state", "pending")
            await shot(page, "resumed-in-flight")
        finally:
            await held.rollback()
    await expect(status).to_have_attribute("data-state", "completed", timeout=PROVISIONED_WITHIN_MS)
    await page.reload()  # after the end too: the whole story again, not an empty form
    await expect(status).to_have_attribute("data-state", "completed")
    for name in STEPS:
        await expect(step(page, name)).to_have_attribute("data-state", "done")
    await expect(page.get_by_test_id("next")).to_have_text(
        "A welcome email is on its way to ada@example.com."
    )
    await shot(page, "completed")
    assert len(tab.posts) == 1, "a reload never signs up again"

    # Another organisation: a fresh form, which a reload keeps fresh.
    await page.get_by_test_id("start-over").click()
    await expect(page.get_by_test_id("email")).to_have_value("")
    await expect(page.get_by_test_id("email")).to_be_enabled()
    await expect(page.get_by_test_id("submit")).to_have_text("Create organisation")
    await expect(page.locator("#tracker")).to_be_hidden()
    await page.reload()
    await expect(page.get_by_test_id("email")).to_have_value("")
    await expect(page.locator("#tracker")).to_be_hidden()
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()


async def test_a_sign_up_that_can_no_longer_be_followed_is_said_so(tab: Tab, url: str) -> None:
    """A tab whose saved status token the server refuses (expired, or from another
    deployment's secret) says so and offers the form again, filled in."""
    page = tab.page
    await page.goto(url)
    oid = "0b0e9c39-6f0a-4c8e-9a51-1f4c39a5c7d2"
    await page.evaluate(
        """(oid) => sessionStorage.setItem("tenantry.signup", JSON.stringify({
            id: oid, status_url: `/v1/onboardings/${oid}`,
            events_url: `/v1/onboardings/${oid}/events?token=stale`, token: "stale",
            email: "ada@example.com", tenant_name: "Analytical Engines", plan: "pro"}))""",
        oid,
    )
    await page.reload()
    await expect(page.get_by_test_id("error-banner")).to_have_text(
        re.compile(
            r"^The sign-up started earlier in this tab can no longer be followed \(.+\)\."
            r" You can sign up again\.$"
        )
    )
    await expect(page.get_by_test_id("submit")).to_be_enabled()
    await expect(page.get_by_test_id("email")).to_have_value("ada@example.com")
    await expect(page.locator("#tracker")).to_be_hidden()
    assert tab.refused == [f"401 {url}v1/onboardings/{oid}"]
    tab.refused.clear()
    await page.reload()  # forgotten: the next load is a plain form
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()
    await expect(page.get_by_test_id("email")).to_have_value("")


async def test_a_reload_while_the_database_is_away_keeps_the_sign_up(tab: Tab, url: str) -> None:
    """Regression (review): a reload during a database restart got 503 from the status
    route, and the page forgot the sign-up for good ("can no longer be followed")."""
    page = tab.page
    status = page.get_by_test_id("status")
    await page.goto(url)
    await fill(page, "ada@example.com", "Analytical Engines")
    await page.get_by_test_id("submit").click()
    await expect(status).to_have_attribute("data-state", "completed", timeout=PROVISIONED_WITHIN_MS)

    refused: list[str] = []

    async def away_once(route: Route) -> None:
        if not refused:
            refused.append(route.request.url)
            await route.fulfill(
                status=503,
                headers={"Content-Type": "application/problem+json", "Retry-After": "1"},
                body=orjson.dumps({"status": 503, "detail": "the database is unavailable"}),
            )
        else:
            await route.continue_()

    await page.route(re.compile(r".*/v1/onboardings/[0-9a-f-]{36}$"), away_once)
    await page.reload()
    banner = page.get_by_test_id("error-banner")
    await expect(banner).to_have_text(
        "Could not reach the server to resume your sign-up; trying again in 1 second."
    )
    await expect(page.get_by_test_id("submit")).to_be_disabled()
    await expect(status).to_have_attribute("data-state", "completed")
    await expect(banner).to_be_hidden()
    for name in STEPS:
        await expect(step(page, name)).to_have_attribute("data-state", "done")
    assert len(refused) == 1
    tab.refused.clear()  # the 503 was ours


async def test_a_reload_before_the_answer_sends_the_same_submission_again(
    tab: Tab, url: str, admin_pool: asyncpg.Pool
) -> None:
    """Regression (review): a reload while the sign-up's answer was on its way lost it
    (the key and the onboarding were kept only once answered), and submitting again
    made a second organisation."""
    page = tab.page
    answered = asyncio.Event()
    held: list[Route] = []

    async def hold_first_answer(route: Route) -> None:
        if not held:
            held.append(route)
            await route.fetch()  # the server has it; the page never hears back
            answered.set()
        else:
            await route.continue_()

    await page.route("**/v1/onboardings", hold_first_answer)
    await page.goto(url)
    await fill(page, "ada@example.com", "Reload Race Co")
    await page.get_by_test_id("submit").click()
    await answered.wait()
    await page.reload()
    await expect(page.get_by_test_id("status")).to_have_attribute(
        "data-state", "completed", timeout=PROVISIONED_WITHIN_MS
    )
    await expect(page.get_by_test_id("tenant_name")).to_have_value("Reload Race Co")
    assert len(tab.posts) == 2
    keys = [(await p.all_headers())["idempotency-key"] for p in tab.posts]
    assert keys[0] == keys[1], "the same submission, sent again"
    assert (
        await admin_pool.fetchval(
            "SELECT count(*) FROM tenantry.onboardings WHERE tenant_name = 'Reload Race Co'"
        )
        == 1
    )


async def test_a_dropped_stream_shows_reconnecting_then_resumes(tab: Tab, url: str) -> None:
    page = tab.page
    streams: list[str] = []

    async def drop_first(route: Route) -> None:
        streams.append(route.request.url)
        if len(streams) == 1:
            # A stream that opens and ends at once: EventSource reconnects after `retry`,
            # long enough for the note to be seen.
            await route.fulfill(
                status=200, headers={"Content-Type": "text/event-stream"}, body="retry: 2000\n\n"
            )
        else:
            await route.continue_()

    await page.route("**/v1/onboardings/*/events?*", drop_first)
    await page.goto(url)
    await fill(page, "ada@example.com", "Analytical Engines")
    await page.get_by_test_id("submit").click()

    reconnecting = page.get_by_test_id("reconnecting")
    await expect(reconnecting).to_be_visible()
    await expect(page.get_by_test_id("status")).to_have_attribute(
        "data-state", "completed", timeout=PROVISIONED_WITHIN_MS
    )
    await expect(reconnecting).to_be_hidden()
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()
    assert len(streams) == 2 and streams[0] == streams[1]


async def test_a_rate_limited_sign_up_says_so_in_a_sentence(
    tab: Tab, tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    """Regression: the page showed "too many sign-up requests from this client; retry
    later Please try again in 1 seconds."."""
    settings = service_settings(tmp_path, signup_rate=0.01, signup_burst=1)
    async with site(settings, app_url, pool, worker_pool) as url:
        async with aiohttp.ClientSession() as http:  # this address's one sign-up
            body = {"email": "first@example.com", "tenant_name": "First Co", "plan": "free"}
            async with http.post(url + "v1/onboardings", json=body) as r:
                assert r.status == 202
        page = tab.page
        await page.goto(url)
        await fill(page, "ada@example.com", "Analytical Engines")
        await page.get_by_test_id("submit").click()
        await expect(page.get_by_test_id("error-banner")).to_have_text(
            re.compile(
                r"^Too many sign-up requests from this address\."
                r" Please try again in \d+ seconds?\.$"
            )
        )
        await expect(page.get_by_test_id("submit")).to_be_enabled()


CROSS_ORIGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>frontend</title>
<p id="result">pending</p>
<script>
const api = new URLSearchParams(location.search).get("api");
fetch(api + "/v1/onboardings", {
  method: "POST",
  headers: {"Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID()},
  body: JSON.stringify({email: "eve@example.com", tenant_name: "Other Origin", plan: "free"}),
}).then(async (r) => {
  const body = await r.json();
  const status = await fetch(api + body.status_url,
                             {headers: {"Authorization": "Bearer " + body.token}});
  document.getElementById("result").textContent =
    `${r.status} ${r.headers.get("Location") ? "location" : "no-location"} ${status.status}`;
}).catch((e) => { document.getElementById("result").textContent = "blocked"; });
</script>"""


@asynccontextmanager
async def frontend_origin() -> AsyncIterator[str]:
    """A page served from another origin (another port), as a frontend app would be."""

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=CROSS_ORIGIN_PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site_ = web.TCPSite(runner, "127.0.0.1", 0)
    await site_.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("allowed", [True, False])
async def test_a_frontend_on_another_origin_signs_up_when_allowed(
    tab: Tab,
    tmp_path: Path,
    app_url: str,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    allowed: bool,
) -> None:
    """TENANTRY_CORS_ORIGINS: a frontend on another origin can sign up and read the
    status (the preflight answered, Location exposed); any other origin is refused by
    the browser."""
    async with frontend_origin() as origin:
        listed = (origin,) if allowed else ("http://elsewhere.example",)
        settings = service_settings(tmp_path, cors_origins=listed)
        async with site(settings, app_url, pool, worker_pool) as url:
            await tab.page.goto(f"{origin}/?api={url.rstrip('/')}")
            want = "202 location 200" if allowed else "blocked"
            await expect(tab.page.locator("#result")).to_have_text(want)
    tab.errors.clear()  # the refused fetch is the page's own (caught) failure
