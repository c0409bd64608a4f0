"""`/docs` in a real browser (Debian's Chromium driven by Playwright): the vendored
Swagger UI renders every operation of the document, under the page's self-only
Content-Security-Policy, without a request to any other origin and without an error."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestServer

pytest.importorskip(
    "playwright.async_api",
    reason="the Python package playwright is not installed (pip install -e '.[dev]')",
)

from playwright.async_api import ConsoleMessage, Request, async_playwright, expect

from tenantry.app import build
from tenantry.http import openapi
from tenantry.jobs.registry import Registry
from tests.helpers import service_settings

CHROMIUM = os.environ.get("TENANTRY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium, or set TENANTRY_CHROMIUM to"
        " a Chromium binary)",
        allow_module_level=True,
    )


@pytest.fixture
async def base_url(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[str]:
    """The app `tenantry run` builds, served (the page and the document need no
    component running)."""
    svc = build(
        service_settings(tmp_path),
        app_url,
        pool,
        worker_pool=worker_pool,
        claim_pool=worker_pool,
        registry=Registry(),
    )
    server = TestServer(svc.http.app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_docs_renders_every_operation_from_this_origin_only(
    base_url: str, tmp_path: Path
) -> None:
    document = openapi.document()
    operations = [
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    ]
    errors: list[str] = []
    elsewhere: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        # A CSP violation is logged as an error ("Refused to load ..."), as is a failed
        # load or a script error.
        if message.type == "error":
            errors.append(message.text)

    def on_request(request: Request) -> None:
        if not request.url.startswith(base_url + "/") and not request.url.startswith("data:"):
            elsewhere.append(request.url)

    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = await browser.new_page()
            page.on("console", on_console)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", on_request)
            await page.goto(base_url + "/docs")
            blocks = page.locator(".opblock")
            await expect(blocks).to_have_count(len(operations), timeout=20_000)
            await expect(page.locator(".info .title")).to_contain_text(
                f"Tenantry {document['info']['version']}"
            )
            shown = []
            for i in range(len(operations)):
                block = blocks.nth(i)
                method = await block.locator(".opblock-summary-method").inner_text()
                path = await block.locator(".opblock-summary-path").get_attribute("data-path")
                shown.append((method.strip().upper(), path))
            # Open one operation: its parameters and responses render too.
            create = page.locator("#operations-Webhooks-createWebhookEndpoint")
            await create.locator(".opblock-summary").click()
            await expect(create.locator(".responses-table")).to_be_visible()
            await expect(create.locator(".response[data-code='422']")).to_be_visible()
            await page.screenshot(path=str(tmp_path / "docs.png"), full_page=False)
        finally:
            await browser.close()
    assert sorted(shown) == sorted(operations)
    assert elsewhere == []
    assert errors == []
