"""Test databases: DATABASE_URL when set, otherwise one embedded PostgreSQL per run.

A template database is migrated once; every test that needs a database gets its own
clone of it, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tenantry import db, migrate, roles, tenancy
from tenantry import logging as log
from tenantry.embedded import EmbeddedPostgres
from tests.helpers import TEST_TENANT_CONTEXT, memory_backed_dir
from tests.smtp import smtp_server  # noqa: F401 - a fixture, for every test module

log.configure(os.environ.get("TENANTRY_TEST_LOG_LEVEL", "warning"))
tenancy.use_tenant_context(TEST_TENANT_CONTEXT)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
def memory_tmp_path(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path`, but in memory where the system has a folder for it: for a test that
    creates a PostgreSQL cluster of its own (initdb writes ~1,000 files, ~2 s on this
    disk, ~1 s in memory).  Removed after the test; `tmp_path` itself where there is no
    such folder."""
    parent = memory_backed_dir()
    if parent is None:
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="tenantry-test-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A URL of the server's maintenance database (`postgres`)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield with_database(url, "postgres")
        return
    tmp = Path(tempfile.mkdtemp(prefix="tenantry-test-", dir=memory_backed_dir()))
    server = EmbeddedPostgres(
        tmp,
        ephemeral=True,
        # Durability buys nothing in a throwaway test cluster; speed does.
        settings={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
    )
    started = server.start()
    try:
        yield with_database(started, "postgres")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
async def template_db(server_url: str) -> AsyncIterator[str]:
    name = f"tenantry_tpl_{os.getpid()}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.execute(f"CREATE DATABASE {name}")
        conn = await db.connect(with_database(server_url, name))
        try:
            await migrate.migrate(conn)
            service = roles.Login(roles.DEFAULT_LOGIN, None)
            await roles.ensure_login(conn, service, roles.SERVICE_ROLES)
            worker = roles.Login(roles.DEFAULT_LOGIN + roles.WORKER_SUFFIX, None)
            await roles.ensure_login(conn, worker, roles.WORKER_ROLES)
        finally:
            await conn.close()
        yield name
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture
async def database_url(server_url: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(server_url)
    try:
        # WAL_LOG, not FILE_COPY: FILE_COPY takes two checkpoints, which on a server that
        # syncs to disk (CI's PostgreSQL 15 leg) cost ~1.4 s per test against ~0.9 s, and
        # its DROP ~0.3 s against ~0.07 s (measured interleaved under the same load); in
        # the embedded cluster, in memory, both take ~0.01 s.
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_db} STRATEGY WAL_LOG")
        yield with_database(server_url, name)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture
async def empty_database_url(server_url: str) -> AsyncIterator[str]:
    """A database with no schema at all (migration tests)."""
    name = f"e_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield with_database(server_url, name)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture
def app_url(database_url: str) -> str:
    """The test database as the service's own login (NOSUPERUSER, NOBYPASSRLS, not the
    owner): what the service runs as, so row-level security applies."""
    return roles.with_login(database_url, roles.DEFAULT_LOGIN)


@pytest.fixture
async def pool(app_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The service's pool, logged in as the service role."""
    async with await db.create_pool(app_url, min_size=1, max_size=10) as p:
        yield p


@pytest.fixture
def worker_url(app_url: str) -> str:
    """The worker's login (the cross-tenant functions), as the service derives it."""
    return roles.worker_url_for(app_url)


@pytest.fixture
async def worker_pool(worker_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The worker's pool: outcomes, rescue, statistics, the dead-letter commands."""
    async with await db.create_pool(worker_url, min_size=1, max_size=4) as p:
        yield p


@pytest.fixture
async def admin_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A superuser's pool (bypasses row-level security): for setting up and inspecting
    rows across tenants, never for the code under test."""
    async with await db.create_pool(database_url, min_size=1, max_size=4) as p:
        yield p


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await db.connect(database_url)
    try:
        yield c
    finally:
        await c.close()
