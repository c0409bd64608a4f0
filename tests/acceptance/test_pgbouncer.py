"""`tenantry run` through PgBouncer in transaction mode, as managed deployments run it:
the service's and the worker's logins through the pooler (TENANTRY_DB_POOLER=
transaction), the listener direct (TENANTRY_LISTEN_URL).  A sign-up completes end to
end, woken by notifications alone.  Skipped where the pgbouncer binary is missing
(.ci/run installs Debian's when it can)."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aiohttp
import anyio
import asyncpg
import pytest

from tenantry import roles
from tenantry.onboarding.model import STEPS
from tests.acceptance.process import ServiceProcess, run_cli
from tests.helpers import TEST_TOKEN_SECRET, sse_frames

PGBOUNCER = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _server_of(url: str) -> tuple[str, int]:
    """Host (or socket folder) and port of the server behind a test database URL."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    port = int(query.get("port", [str(parts.port or 5432)])[0])
    return host, port


def _socket_owner(host: str) -> str:
    if not host.startswith("/"):
        return "nobody"
    return pwd.getpwuid(Path(host).stat().st_uid).pw_name


def _through(url: str, port: int) -> str:
    """`url` (its database and login) by way of the pooler on loopback `port`."""
    parts = urlsplit(url)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{port}", query=""))


def _write_config(host: str, port: int, listen: int, logins: list[str]) -> Path:
    """The configuration, in a folder of its own that anyone can read: PgBouncer
    refuses to run as root, so as root it runs as another user (see below).  Fewer
    server connections per login than the service opens client connections, so that
    clients really do share them."""
    folder = Path(tempfile.mkdtemp(prefix="tenantry-pgbouncer-"))
    folder.chmod(0o755)
    users = folder / "users.txt"
    users.write_text("".join(f'"{login}" ""\n' for login in logins))
    ini = folder / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n* = host={host} port={port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {users}\n"
        "pool_mode = transaction\ndefault_pool_size = 3\nmax_client_conn = 200\n"
    )
    for f in (users, ini):
        f.chmod(0o644)
    return ini


@asynccontextmanager
async def running_pgbouncer(
    database_url: str, logins: list[str]
) -> AsyncIterator[tuple[int, list[str]]]:
    """PgBouncer in transaction mode in front of the test's server: its port, and its
    log lines as they come."""
    assert PGBOUNCER is not None
    host, port = _server_of(database_url)
    listen = _free_port()
    ini = _write_config(host, port, listen, logins)
    # As root: the user that may reach the server's socket (the socket folder's owner:
    # the embedded server's system user), or nobody for a server on TCP.
    as_root = ["-u", _socket_owner(host)] if os.geteuid() == 0 else []
    proc = await asyncio.create_subprocess_exec(
        PGBOUNCER,
        *as_root,
        str(ini),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[str] = []
    listening = asyncio.Event()

    async def read() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            if "listening on" in line:
                listening.set()
        listening.set()  # it ended: the check below says so

    reader = asyncio.create_task(read())
    try:
        with anyio.fail_after(10):
            await listening.wait()
        assert proc.returncode is None, "\n".join(lines)
        yield listen, lines
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # a fast shutdown
            try:
                with anyio.fail_after(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await reader
        shutil.rmtree(ini.parent, ignore_errors=True)


@pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer not installed (apt-get install pgbouncer)")
@pytest.mark.timeout(90)
async def test_a_sign_up_completes_through_pgbouncer_in_transaction_mode(
    database_url: str, admin_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    service_login = roles.DEFAULT_LOGIN
    worker_login = roles.DEFAULT_LOGIN + roles.WORKER_SUFFIX
    direct = roles.with_login(database_url, service_login)
    async with running_pgbouncer(database_url, [service_login, worker_login]) as (port, log):
        svc = await ServiceProcess.start(
            database_url,
            "--no-migrate",
            DATABASE_URL=_through(direct, port),
            TENANTRY_DB_POOLER="transaction",
            TENANTRY_LISTEN_URL=direct,
            # Polls far apart: what moves the jobs and the stream within the test's
            # time is the listener's wake-ups.
            TENANTRY_POLL_INTERVAL="60",
            TENANTRY_DATA_DIR=str(tmp_path),
            TENANTRY_TOKEN_SECRET=TEST_TOKEN_SECRET,
            TENANTRY_LOG_LEVEL="info",
        )
        try:
            http_port = await svc.started()
            await svc.wait_log("listener_connected")
            base = f"http://127.0.0.1:{http_port}"
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{base}/v1/onboardings",
                    json={"email": "pool@example.com", "tenant_name": "Pooled Inc", "plan": "pro"},
                ) as r:
                    assert r.status == 202, await r.text()
                    answer = await r.json()
                with anyio.fail_after(20):
                    async with http.get(f"{base}{answer['events_url']}") as r:
                        assert r.status == 200
                        frames = [f async for f in sse_frames(r) if f.event]
            svc.signal(signal.SIGTERM)
            assert await svc.wait_exit() == 0
        finally:
            await svc.kill()
    assert [f.id for f in frames] == [str(v) for v in range(1, len(STEPS) + 2)]
    assert frames[-1].event == "onboarding.completed"
    state = await admin_pool.fetchval("SELECT state FROM tenantry.onboardings")
    assert state == "completed"
    # Both logins came through the pooler, and asked it nothing it refuses.
    assert any(f"user={service_login} " in line for line in log), log
    assert any(f"user={worker_login} " in line for line in log), log
    assert not any("unsupported startup parameter" in line for line in log), log
    assert not svc.find("component_crashed"), svc.raw[-20:]


async def test_a_transaction_pooler_without_a_direct_listen_url_is_refused(
    database_url: str,
) -> None:
    """LISTEN through a transaction-mode pooler would be lost without a word: refused
    at start, naming the variable (exit 2)."""
    code, _, err = await run_cli(
        "run", database_url=database_url, env={"TENANTRY_DB_POOLER": "transaction"}
    )
    assert code == 2
    assert "TENANTRY_LISTEN_URL" in err, err
    code, _, err = await run_cli(
        "run", database_url=database_url, env={"TENANTRY_DB_POOLER": "statement"}
    )
    assert code == 2
    assert "TENANTRY_DB_POOLER" in err, err
