"""The OpenAPI document against the code: valid OpenAPI 3.1, the package's version, and
exactly the routes of the app `tenantry run` builds (a route added without being
documented, or documented without existing, fails here); served as it is, and its
viewer under a self-only Content-Security-Policy."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openapi_spec_validator import validate

import tenantry
from tenantry.app import build
from tenantry.errors import Invalid
from tenantry.http import openapi
from tenantry.http.app import DOCS_CSP
from tenantry.jobs.registry import Registry
from tenantry.webhooks import secrets
from tests.helpers import service_settings

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@dataclass(frozen=True)
class Excluded:
    """Routes deliberately outside the public contract: `path` and every path under it
    when `subtree`; every method unless `method` names one."""

    path: str
    why: str
    subtree: bool = False
    method: str | None = None

    def covers(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.subtree:
            return path == self.path or path.startswith(self.path.rstrip("/") + "/")
        return path == self.path


# The one list of what the app serves but the document leaves out, each with why.
NOT_IN_CONTRACT = frozenset(
    {
        Excluded("/", "the sign-up page: HTML for people, not an API"),
        Excluded("/favicon.svg", "the page's icon"),
        Excluded("/favicon.ico", "the page's icon, for clients that ask for this name"),
        Excluded("/docs", "the document's viewer and its script and styles", subtree=True),
        # Every /ops/... route the dashboard adds is covered without a change here.
        Excluded("/ops", "the operations dashboard: pages for operators", subtree=True),
        Excluded(
            "/",
            "CORS preflights: the browser's protocol around the documented operations,"
            " answered only where TENANTRY_CORS_ORIGINS is set",
            subtree=True,
            method="OPTIONS",
        ),
    }
)


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, canonical path) of every route, but those NOT_IN_CONTRACT, and the HEAD
    aiohttp adds to every GET (HEAD is GET without its body; the document says once
    that every GET answers it)."""
    routes: set[tuple[str, str]] = set()
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        routes.add((route.method, resource.canonical))
    gets = {path for method, path in routes if method == "GET"}
    return {
        (method, path)
        for method, path in routes
        if not (method == "HEAD" and path in gets)
        and not any(x.covers(method, path) for x in NOT_IN_CONTRACT)
    }


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


def contract_gaps(app: web.Application, document: dict[str, Any]) -> list[str]:
    served, documented = served_routes(app), documented_routes(document)
    return [f"served but not documented: {m} {p}" for m, p in sorted(served - documented)] + [
        f"documented but not served: {m} {p}" for m, p in sorted(documented - served)
    ]


async def run_app(
    settings_dir: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool, **over: Any
) -> web.Application:
    """The HTTP app of the service as `tenantry run` composes it (every component)."""
    svc = build(
        service_settings(settings_dir, **over),
        app_url,
        pool,
        worker_pool=worker_pool,
        claim_pool=worker_pool,  # only stored: nothing here claims
        registry=Registry(),
    )
    return svc.http.app


def test_the_document_is_valid_openapi_3_1_of_this_version() -> None:
    document = openapi.document()
    validate(document)  # raises, naming what is wrong
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["version"] == tenantry.__version__


def test_every_operation_documents_its_errors_as_problems() -> None:
    document = openapi.document()
    for path, item in document["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            assert "500" in responses, (method, path)
            assert any(s.startswith("2") for s in responses), (method, path)
            for status, given in responses.items():
                ref = given.get("$ref", "")
                shared = document["components"]["responses"]
                response = shared[ref.rsplit("/", 1)[1]] if ref else given
                assert "X-Request-ID" in response["headers"], (method, path, status)
                if int(status) >= 400 and path != "/readyz":
                    assert list(response["content"]) == ["application/problem+json"]


async def test_the_document_names_exactly_the_routes_tenantry_run_serves(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    app = await run_app(tmp_path, app_url, pool, worker_pool)
    gaps = contract_gaps(app, openapi.document())
    assert not gaps, (
        "the routes and service/tenantry/http/openapi.py disagree (document the route, or"
        " add it to NOT_IN_CONTRACT in this file with the reason):\n" + "\n".join(gaps)
    )
    # With CORS on, the preflights come in, and are left out as browser plumbing.
    cors = await run_app(tmp_path, app_url, pool, worker_pool, cors_origins=("http://app.example",))
    assert any(r.method == "OPTIONS" for r in cors.router.routes())
    assert contract_gaps(cors, openapi.document()) == []


async def test_the_comparison_catches_a_route_either_way(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    async def handler(_: web.Request) -> web.Response:
        return web.Response()

    app = await run_app(tmp_path, app_url, pool, worker_pool)
    app.router.add_post("/v1/tenant", handler)  # a new method on a documented path
    app.router.add_get("/v1/widgets/{id}", handler)
    # The dashboard's routes, now and later: never part of the contract.
    app.router.add_get("/ops", handler)
    app.router.add_get("/ops/queues/{name}", handler)
    document = orjson.loads(openapi.document_json())
    document["paths"]["/v1/gadgets"] = {"get": document["paths"]["/healthz"]["get"]}
    del document["paths"]["/metrics"]
    assert contract_gaps(app, document) == [
        "served but not documented: GET /metrics",
        "served but not documented: GET /v1/widgets/{id}",
        "served but not documented: POST /v1/tenant",
        "documented but not served: GET /v1/gadgets",
    ]


@pytest.fixture
async def served(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[aiohttp.ClientSession]:
    server = TestServer(await run_app(tmp_path, app_url, pool, worker_pool), port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession(str(server.make_url("/"))) as session:
            yield session
    finally:
        await server.close()


async def test_the_document_is_served_at_openapi_json(served: aiohttp.ClientSession) -> None:
    async with served.get("/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == orjson.loads(orjson.dumps(openapi.document()))


async def test_docs_is_a_self_contained_page_under_a_self_only_policy(
    served: aiohttp.ClientSession,
) -> None:
    async with served.get("/docs") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert resp.headers["Content-Security-Policy"] == DOCS_CSP
        page = await resp.text()
    # Every directive allows this origin at most: no host, scheme or 'unsafe-*' source;
    # images may also be data: URIs (the icons the viewer's stylesheet embeds).
    for directive in DOCS_CSP.split(";"):
        name, *sources = directive.split()
        allowed = {"'self'", "'none'"} | ({"data:"} if name == "img-src" else set())
        assert set(sources) <= allowed, name
    assert "<script>" not in page and "style=" not in page  # nothing inline
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert referenced == [
        "docs/swagger-ui.css",
        "favicon.svg",
        "docs/swagger-ui-bundle.js",
        "docs/docs.js",
    ]
    for ref in referenced:
        async with served.get("/" + ref) as asset:
            assert asset.status == 200, ref
            assert asset.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("size", range(secrets.MIN_BYTES - 3, secrets.MAX_BYTES + 4))
def test_the_secret_pattern_is_exactly_what_the_service_accepts(size: int) -> None:
    pattern = re.compile(openapi.document()["components"]["schemas"]["WebhookSecret"]["pattern"])
    secret = secrets.PREFIX + base64.b64encode(bytes(range(size))).decode()
    try:
        secrets.key_bytes(secret)
        accepted = True
    except Invalid:
        accepted = False
    assert bool(pattern.search(secret)) == accepted


def test_the_whitespace_the_patterns_spell_out_is_pythons() -> None:
    """The handlers strip and split on Python's whitespace; the document's patterns
    name the same characters (ECMA-262's `\\s`, which a pattern would otherwise mean,
    differs)."""
    spelled = re.compile(f"[{openapi.WHITESPACE}]")
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        assert bool(spelled.fullmatch(char)) == char.isspace(), hex(code)


def _patterns(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        return own + [p for value in node.values() for p in _patterns(value)]
    if isinstance(node, list):
        return [p for value in node for p in _patterns(value)]
    return []


def test_every_pattern_is_an_ecma_262_regex() -> None:
    """JSON Schema's patterns are ECMA-262 regular expressions: every one the document
    states compiles in JavaScript (with the `u` flag, the strictest), as it does in
    Python's `re`, which the handlers and Schemathesis use."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node on this machine to compile the patterns with")
    patterns = sorted(set(_patterns(openapi.document())))
    assert len(patterns) > 10
    for pattern in patterns:
        re.compile(pattern)
    script = (
        "const bad = JSON.parse(process.argv[1]).filter(p => {"
        " try { new RegExp(p, 'u'); return false } catch (e) { return true } });"
        " process.stdout.write(JSON.stringify(bad))"
    )
    out = subprocess.run(
        [node, "-e", script, orjson.dumps(patterns).decode()],
        capture_output=True,
        check=True,
        text=True,
        timeout=30,
    )
    assert orjson.loads(out.stdout) == []
