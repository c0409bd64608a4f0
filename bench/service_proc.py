"""A real `tenantry run` process for the benchmarks that need one (bench.onboarding,
bench.sse), their load processes, and what they measure from outside: ports, open-files
limits, RSS, open descriptors, CPU time of the service, PostgreSQL, the load and the
machine, and the report lines for latency summaries and CPU windows.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import anyio
import anyio.abc
import asyncpg
import orjson
from anyio.streams.buffered import BufferedByteReceiveStream

from tenantry import roles

from .common import Result, fmt_ms

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The longest line a load process may print (bench.sse's receipts come as one line).
MAX_LINE = 256 * 1024 * 1024


# --- this host's processes --------------------------------------------------------------


def free_port() -> int:
    """A port free right now on loopback (the service binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-files limit (children inherit it) to `wanted`, or to
    the hard limit when that is as far as an unprivileged process may go; the soft limit
    in effect afterwards."""
    import resource  # noqa: PLC0415 - POSIX only, only here

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted > hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    target = min(max(soft, wanted), hard)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_files_limit(pid: int) -> int:
    """A process's soft RLIMIT_NOFILE (/proc/<pid>/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError(f"no open-files limit for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def own_cpu_seconds() -> float:
    import resource  # noqa: PLC0415 - POSIX only, only here

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores; /proc/stat)."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in first[:8]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / CLK_TCK


def parent_of(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return None


def children_of(pid: int) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and parent_of(int(e)) == pid]


async def postmaster_pid(url: str) -> int | None:
    """The server's postmaster, when it runs on this host (a backend's parent)."""
    conn = await asyncpg.connect(url)
    try:
        # Read while the backend is alive: it exits with the connection.
        return parent_of(int(await conn.fetchval("SELECT pg_backend_pid()")))
    finally:
        await conn.close()


@dataclass
class CpuWindow:
    """CPU used over a window by the service, PostgreSQL, extra processes, the rest
    ("other") and the machine, as cores (CPU seconds per wall second)."""

    service_pid: int
    postmaster: int | None
    extra: dict[str, int] = field(default_factory=dict)
    _start: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0

    def _postgres(self) -> float:
        if self.postmaster is None:
            return 0.0
        return cpu_seconds(self.postmaster) + sum(
            cpu_seconds(p) for p in children_of(self.postmaster)
        )

    def _sample(self) -> dict[str, float]:
        s = {"service": cpu_seconds(self.service_pid), "machine": machine_busy_seconds()}
        if self.postmaster is not None:
            s["postgres"] = self._postgres()
        for name, pid in self.extra.items():
            s[name] = cpu_seconds(pid)
        return s

    def start(self) -> None:
        self._start = self._sample()
        self._t0 = time.monotonic()

    def stop(self, **reported: float) -> Result:
        """The window's figures; `reported`: CPU seconds of processes that ended within
        the window and measured themselves."""
        end = self._sample()
        wall = time.monotonic() - self._t0
        used = {k: end[k] - self._start.get(k, 0.0) for k in end} | reported
        # Whatever else ran on the machine meanwhile (the box may be shared).
        used["other"] = max(
            0.0, used["machine"] - sum(v for k, v in used.items() if k != "machine")
        )
        return {
            "window_s": round(wall, 2),
            "cpu_seconds": {k: round(v, 2) for k, v in used.items()},
            "cores": {k: round(v / wall, 2) for k, v in used.items()} if wall > 0 else {},
            "machine_cores": os.cpu_count(),
        }


# --- the service process ---------------------------------------------------------------


@dataclass
class ServiceProcess:
    proc: anyio.abc.Process
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def service_env(database_url: str, data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    """As tests/acceptance/process.py: the superuser migrates, the service logs in as
    its own login; no TENANTRY_* variable of the caller's leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTRY_")}
    env.update(
        {
            "DATABASE_URL": roles.with_login(database_url, roles.DEFAULT_LOGIN),
            "TENANTRY_ADMIN_URL": database_url,
            "TENANTRY_HOST": "127.0.0.1",
            "TENANTRY_PORT": str(port),
            "TENANTRY_DATA_DIR": str(data_dir),
            "TENANTRY_LOG_LEVEL": "warning",
            "TENANTRY_SIGNUP_RATE": "1000000",
            "TENANTRY_SIGNUP_BURST": "1000000",
            "TENANTRY_SHUTDOWN_GRACE": "2",
            **extra,
        }
    )
    return env


async def _wait_ready(svc: ServiceProcess) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    async with aiohttp.ClientSession(svc.base_url) as http:
        while time.monotonic() < deadline:
            if svc.proc.returncode is not None:
                break
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get("/readyz") as resp:
                    if resp.status == 200:
                        return
            await anyio.sleep(0.1)
    raise RuntimeError(
        f"tenantry run did not become ready (exit {svc.proc.returncode}):\n{svc.log_tail()}"
    )


@asynccontextmanager
async def tenantry_service(
    database_url: str, data_dir: Path, **extra: str
) -> AsyncIterator[ServiceProcess]:
    """`python -m tenantry run` against `database_url` (a superuser's), ready; SIGTERM
    (then SIGKILL) at the end.  Its output goes to data_dir/service.log."""
    port = free_port()
    log_path = data_dir / "service.log"
    env = service_env(database_url, data_dir, port, **extra)
    with log_path.open("wb") as log_file:
        proc = await anyio.open_process(
            [sys.executable, "-m", "tenantry", "run"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    svc = ServiceProcess(proc, port, log_path)
    try:
        await _wait_ready(svc)
        yield svc
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with anyio.move_on_after(20):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await proc.aclose()


# --- load processes ----------------------------------------------------------------------


async def run_load(module: str, argv: Sequence[str]) -> Result:
    """Run `python -m <module> --load ...` to its end; its stdout is one JSON object."""
    proc = await anyio.run_process(
        [sys.executable, "-m", module, "--load", *argv], cwd=ROOT, check=False, stderr=None
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load process {argv[:1]} exited {proc.returncode}")
    try:
        out: Result = orjson.loads(proc.stdout)
    except orjson.JSONDecodeError as exc:
        # Seen once (exit 0, the JSON cut short after 438,528 bytes): say so plainly.
        raise RuntimeError(
            f"load process {argv[:1]} exited 0 but its output ({len(proc.stdout):,} bytes)"
            f" is not one JSON object: {exc}"
        ) from exc
    return out


class LoadProcess:
    """The parent's side of a long-lived `python -m <module> --load ...`: commands go
    to its stdin and answers come back on its stdout, one line each (JSON, with an
    `event`); its stderr is this process's."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        self._out = BufferedByteReceiveStream(proc.stdout)
        self._in = proc.stdin

    @classmethod
    async def start(cls, module: str, argv: Sequence[str]) -> LoadProcess:
        proc = await anyio.open_process(
            [sys.executable, "-m", module, "--load", *argv], cwd=ROOT, stderr=None
        )
        return cls(proc)

    async def send(self, command: str) -> None:
        await self._in.send(command.encode() + b"\n")

    async def receive(self, event: str) -> Result:
        line = await self._out.receive_until(b"\n", MAX_LINE)
        msg: Result = orjson.loads(line)
        if msg.get("event") != event:
            raise RuntimeError(f"load process: expected {event!r}, got {msg.get('event')!r}")
        return msg

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            if self.proc.returncode is None:
                with anyio.move_on_after(30):
                    await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            await self.proc.aclose()


def emit_line(out: Result) -> None:
    """The load process's side: one answer line on stdout."""
    sys.stdout.buffer.write(orjson.dumps(out) + b"\n")
    sys.stdout.flush()


async def read_command() -> str:
    """The load process's side: the next command line on stdin."""
    line = await anyio.to_thread.run_sync(sys.stdin.readline)
    return str(line).strip()


# --- report lines -----------------------------------------------------------------------


def latency_line(label: str, s: dict[str, float], width: int = 30) -> str:
    """One latency summary (common.latency_summary_ms) on a line."""
    if not s.get("n"):
        return f"  {label:<{width}} no samples"
    return (
        f"  {label:<{width}} p50 {fmt_ms(s['p50']):>7}  p90 {fmt_ms(s['p90']):>7}"
        f"  p99 {fmt_ms(s['p99']):>7}  max {fmt_ms(s['max']):>8} ms  (n={s['n']:,})"
    )


def cores_line(cpu: Result) -> str:
    """A CpuWindow's cores: the processes measured, then `other` and the machine."""
    c = cpu["cores"]
    keys = [k for k in c if k not in ("other", "machine")] + ["other", "machine"]
    cores = ", ".join(f"{k} {c[k]:.2f}" for k in keys if k in c)
    return f"  CPU, cores used over {cpu['window_s']:g} s: {cores} (of {cpu['machine_cores']})"
