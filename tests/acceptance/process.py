"""Drive the real `tenantry` process as an operator would: env, signals, stdout logs."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson

from tenantry import roles

ROOT = Path(__file__).resolve().parents[2]


def service_env(database_url: str | None, **extra: str) -> dict[str, str]:
    """The process's environment as a deployment would set it: `database_url` (a
    superuser's) migrates, the service logs in as its own unprivileged role.  None: no
    database URL at all, so the process runs its embedded PostgreSQL (TENANTRY_DATA_DIR)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("TENANTRY_") and k != "DATABASE_URL"
    }
    if database_url is not None:
        env["DATABASE_URL"] = roles.with_login(database_url, roles.DEFAULT_LOGIN)
        env["TENANTRY_ADMIN_URL"] = database_url
    env.update(
        {
            "TENANTRY_HANDLERS": "tests.acceptance.handlers:registry",
            "TENANTRY_LOG_LEVEL": "debug",
            "TENANTRY_PORT": "0",
            "TENANTRY_POLL_INTERVAL": "0.2",
            **extra,
        }
    )
    return env


class ServiceProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(cls, database_url: str, *args: str, **env: str) -> ServiceProcess:
        """`python -m tenantry run *args` from the checkout."""
        return await cls.start_command(
            [sys.executable, "-m", "tenantry"], ROOT, database_url, *args, **env
        )

    @classmethod
    async def start_command(
        cls, program: Sequence[str], cwd: Path, database_url: str | None, *args: str, **env: str
    ) -> ServiceProcess:
        """`program run *args` in `cwd`."""
        proc = await asyncio.create_subprocess_exec(
            *program,
            "run",
            *args,
            cwd=cwd,
            env=service_env(database_url, **env),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            text = line.decode(errors="replace").rstrip()
            self.raw.append(text)
            try:
                obj = orjson.loads(text)
            except orjson.JSONDecodeError:
                obj = {"event": "<non-json>", "text": text}
            if isinstance(obj, dict):
                self.lines.append(obj)
            self._changed.set()
        self._changed.set()

    def find(self, event: str) -> list[dict[str, Any]]:
        return [x for x in self.lines if x.get("event") == event]

    async def wait_log(
        self,
        event: str,
        where: Callable[[dict[str, Any]], bool] = lambda _: True,
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            while True:
                for x in self.lines:
                    if x.get("event") == event and where(x):
                        return x
                if self._reader.done():
                    raise AssertionError(
                        f"process ended before {event!r}:\n" + "\n".join(self.raw[-30:])
                    )
                self._changed.clear()
                await self._changed.wait()

    async def started(self) -> int:
        """Wait for the service to be up; return its HTTP port."""
        line = await self.wait_log("started")
        return int(line["port"])

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        with anyio.fail_after(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._reader


async def run_cli(
    *args: str, database_url: str | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """`python -m tenantry *args` from the checkout; without `database_url`, with no
    database URL at all (the embedded PostgreSQL of TENANTRY_DATA_DIR)."""
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith("TENANTRY_") and k != "DATABASE_URL"
    }
    if database_url is not None:
        full_env["DATABASE_URL"] = roles.with_login(database_url, roles.DEFAULT_LOGIN)
        full_env["TENANTRY_ADMIN_URL"] = database_url
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tenantry",
        *args,
        cwd=ROOT,
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
