"""Tenants, API keys and Bearer authentication over real HTTP on loopback."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tenantry import db
from tenantry.errors import Conflict, Invalid, NotFound, Unauthorized
from tenantry.http.app import Readiness, build_app
from tenantry.tenants import store


async def _ready() -> dict[str, bool]:
    return {"database": True}


@pytest.fixture
async def base_url(pool: asyncpg.Pool) -> AsyncIterator[str]:
    """The service's HTTP app on a loopback port of its own."""
    runner = web.AppRunner(build_app(Readiness(_ready), pool))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def get(url: str, key: str | None = None) -> tuple[int, str, dict[str, object]]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.json(content_type=None)


async def test_key_resolves_to_its_tenant_and_nothing_else(
    pool: asyncpg.Pool, admin_pool: asyncpg.Pool, base_url: str
) -> None:
    acme = await store.create_tenant(pool, name="Acme Inc")
    other = await store.create_tenant(pool, name="Other")
    key = await store.create_key(pool, acme.id, name="ci")
    assert acme.slug == "acme-inc"

    status, _, body = await get(f"{base_url}/v1/tenant", key.secret)
    assert status == 200
    assert (body["id"], body["slug"], body["plan"]) == (str(acme.id), "acme-inc", "free")

    # The database holds only the secret's hash.
    secret = key.secret[len("tnt_") + 32 + 1 :]  # the secret may contain "_"
    stored = await admin_pool.fetchval("SELECT secret_hash FROM tenantry.api_keys")
    assert stored == hashlib.sha256(secret.encode()).digest()
    dump = await admin_pool.fetchval("SELECT string_agg(t::text, '') FROM tenantry.api_keys t")
    assert secret not in dump

    # The same secret presented as the other tenant's key is not a key at all.
    forged = f"tnt_{other.id.hex}_{secret}"
    assert (await get(f"{base_url}/v1/tenant", forged))[0] == 401

    await store.revoke_key(pool, acme.id, key.id)
    status, ctype, body = await get(f"{base_url}/v1/tenant", key.secret)
    assert (status, ctype) == (401, "application/problem+json")
    assert body["detail"] == "invalid API key"


@pytest.mark.parametrize(
    "header",
    [None, "Basic dXNlcjpwdw==", "Bearer", "Bearer nonsense", "Bearer tnt_zz_zz"],
)
async def test_missing_or_malformed_credentials_get_401_problem(
    base_url: str, header: str | None
) -> None:
    headers = {} if header is None else {"Authorization": header}
    async with aiohttp.ClientSession() as s, s.get(f"{base_url}/v1/tenant", headers=headers) as r:
        assert r.status == 401
        assert r.headers["Content-Type"] == "application/problem+json"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        body = await r.json(content_type=None)
    assert body["status"] == 401 and body["title"] == "Unauthorized"


async def test_store_validates_and_reports_conflicts(pool: asyncpg.Pool) -> None:
    await store.create_tenant(pool, name="Acme", slug="acme")
    with pytest.raises(Conflict, match="taken"):
        await store.create_tenant(pool, name="Acme again", slug="acme")
    for kwargs, field in [
        ({"name": ""}, "name"),
        ({"name": "x" * 51}, "name"),
        ({"name": "x"}, "name"),  # 3 to 50 characters, as the sign-up form
        ({"name": "okay", "slug": "Not A Slug"}, "slug"),
        ({"name": "!!!"}, "name"),  # no letter or digit: no slug either
        ({"name": "okay", "plan": "gold"}, "plan"),
    ]:
        with pytest.raises(Invalid) as err:
            await store.create_tenant(pool, **kwargs)  # type: ignore[arg-type]
        assert err.value.field == field
    with pytest.raises(NotFound):
        await store.create_key(pool, uuid.uuid4())
    with pytest.raises(NotFound):
        await store.revoke_key(pool, uuid.uuid4(), 1)
    with pytest.raises(Unauthorized):
        await store.authenticate(pool, "tnt_" + "0" * 32 + "_" + "a" * 43)


async def _serve_once(pool: asyncpg.Pool) -> tuple[int, str, dict[str, object], dict[str, str]]:
    """One authenticated request to an app on `pool`: status, content type, body and
    headers."""
    runner = web.AppRunner(build_app(Readiness(_ready), pool))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        key = f"tnt_{uuid.uuid4().hex}_{'a' * 43}"
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"http://127.0.0.1:{port}/v1/tenant", headers={"Authorization": f"Bearer {key}"}
            ) as r,
        ):
            return r.status, r.content_type, await r.json(content_type=None), dict(r.headers)
    finally:
        await runner.cleanup()


async def test_an_unavailable_database_is_a_503_problem_with_retry_after(app_url: str) -> None:
    gone = await db.create_pool(app_url, min_size=1, max_size=1)
    await gone.close()  # the database "went away": every acquire fails
    status, ctype, body, headers = await _serve_once(gone)
    assert status == 503 and ctype == "application/problem+json"
    assert body["status"] == 503 and "Traceback" not in str(body)
    assert int(headers["Retry-After"]) >= 1


async def test_an_unexpected_error_is_a_500_problem_without_a_traceback(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def bug(*_args: object) -> uuid.UUID:
        raise RuntimeError("a bug, not the database")

    monkeypatch.setattr(store, "authenticate", bug)
    status, ctype, body, _ = await _serve_once(pool)
    assert status == 500 and ctype == "application/problem+json"
    assert body["status"] == 500 and "Traceback" not in str(body) and "bug" not in str(body)
