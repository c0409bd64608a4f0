"""The listener: one dedicated connection (never from the pool) that LISTENs.

It reconnects with backoff, notices a dead connection (TCP keepalives both ways plus a
periodic self-ping with a timeout), and after every (re)connect tells each consumer to
resync, because notifications sent while it was away are gone for good.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus

from . import db
from . import logging as log
from .clock import Random, system_random
from .safetext import safe_text

Callback = Callable[[str], None]


class Listener:
    def __init__(
        self,
        dsn: str,
        channels: Mapping[str, Callback],
        on_connect: list[Callable[[], None]],
        *,
        ping_interval: float = 5.0,
        ping_timeout: float = 3.0,
        rnd: Random | None = None,
    ) -> None:
        self._dsn = dsn
        self._channels = dict(channels)
        self._on_connect = on_connect
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._rnd = rnd or system_random()
        self.connected = False
        self.connections = 0  # successful connects so far (tests wait on it)
        self.backend_pid: int | None = None
        self._changed = anyio.Event()
        self._log = log.get("listener")

    async def wait_connections(self, n: int) -> None:
        while self.connections < n:
            self._changed = anyio.Event()
            await self._changed.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect and listen, forever.  Started at once, connected or not: a database
        that is not there yet must not hold up the start (or a SIGTERM meanwhile);
        consumers poll until the first connect, and `connected` tells readiness."""
        task_status.started()
        backoff = 0.05
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await db.connect(
                    self._dsn,
                    timeout=10,
                    server_settings={"application_name": "tenantry-listener"},
                )
                lost = anyio.Event()
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                for channel, callback in self._channels.items():
                    await conn.add_listener(channel, _adapter(callback))
                self.backend_pid = conn.get_server_pid()
                self.connected = True
                self.connections += 1
                self._changed.set()
                self._log.info(
                    "listener_connected",
                    channels=sorted(self._channels),
                    reconnects=self.connections - 1,
                )
                for resync in self._on_connect:
                    resync()
                backoff = 0.05
                await self._watch(conn, lost)
            except Exception as exc:
                # Whatever the connection raised: the database away, a terminated
                # backend, a timeout, or an error asyncpg did not classify.
                self._log.warning(
                    "listener_lost",
                    error=safe_text(str(exc)) or type(exc).__name__,
                    retry_in_s=round(backoff, 3),
                )
            finally:
                self.connected = False
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await anyio.sleep(backoff * (0.5 + self._rnd.random()))
            backoff = min(backoff * 2, 5.0)

    async def _watch(self, conn: asyncpg.Connection, lost: anyio.Event) -> None:
        while True:
            with anyio.move_on_after(self._ping_interval):
                await lost.wait()
            if lost.is_set():
                raise ConnectionError("listener connection closed")
            with anyio.fail_after(self._ping_timeout):
                await conn.fetchval("SELECT 1")


def _adapter(callback: Callback) -> Callable[[Any, int, str, object], None]:
    def on_notify(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
        callback(str(payload))

    return on_notify
