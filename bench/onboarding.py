"""POST /v1/onboardings under a fixed open-loop rate, and accept -> completed, against
one real `tenantry run` process with the whole pipeline running.

The service.  `python -m service run` in a process of its own, set up as a deployment
would be (the same environment as tests/acceptance/process.py): DATABASE_URL the
service's login, TENANTRY_ADMIN_URL the superuser (it migrates and creates the logins),
a temporary data folder (mail goes to files, tenant storage to folders), the sign-up rate
limit raised out of the way (TENANTRY_SIGNUP_RATE / _BURST 1,000,000), log level warning,
queue concurrency --concurrency (20) and a pool of --pool-size connections
(concurrency + 10: running jobs hold one each and leave the rest to the HTTP handlers).
Its port is picked here (free at the time); it is ready when /readyz answers 200.

The load comes from another process (`python -m bench.onboarding --load ...`), so the
client's CPU is not the service's; both share the machine's cores with PostgreSQL.

(a) open loop.  Request i is due at start + i / --rate; a scheduler sends each one at
    its due time whatever the earlier ones are doing (aiohttp, no connection limit), and
    its latency runs from the DUE time to the end of the response: a stalled service
    cannot slow the arrivals down and hide its queueing (no coordinated omission).  The
    first --warmup seconds run on the same schedule and are not counted.  `send lag`
    (actual send - due) is the load generator's own lateness, included in the latency.
    Errors: any answer other than 202, and exceptions (timeouts, resets).  Every
    accepted sign-up is provisioned (7 steps, one job) by the same process meanwhile:
    how many completed by the end of the load, and the backlog then, are reported.
(b) accept -> completed, no external latency.  --follow sign-ups at --follow-rate/s
    (20: a latency probe, not a load); each opens its events stream right after the 202
    and the time runs from just before the POST to the receipt of
    `onboarding.completed`.  Split: the POST itself; the server-side time from the
    accepted event to the completed event (their `at`); the completed event's `at` to
    its receipt.  (b) runs first, on the idle service, then (a).

Figures include CPU: the service process, PostgreSQL (the server's processes, when it
runs on this host), the load process, and the machine, in cores used over the window.

Goal (DESIGN.md): p99 <= 10 ms at 500 req/s, no errors, the offered rate achieved.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import asyncpg
import orjson

from service import db, roles

from . import common
from .common import Result, fmt_ms, fmt_rate, progress

NAME = "onboarding"
GOAL_P99_MS = 10.0
# The achieved rate may fall this far short of the offered one and still count.
RATE_SHORTFALL = 0.05
ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the service process (bench.sse uses these too) ------------------------------------


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
    """`python -m service run` against `database_url` (a superuser's), ready; SIGTERM
    (then SIGKILL) at the end.  Its output goes to data_dir/service.log."""
    port = free_port()
    log_path = data_dir / "service.log"
    env = service_env(database_url, data_dir, port, **extra)
    with log_path.open("wb") as log_file:
        proc = await anyio.open_process(
            [sys.executable, "-m", "service", "run"],
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


async def run_load(argv: Sequence[str], module: str = "bench.onboarding") -> Result:
    """Run `python -m <module> --load ...` to its end; its stdout is one JSON object."""
    proc = await anyio.run_process(
        [sys.executable, "-m", module, "--load", *argv], cwd=ROOT, check=False, stderr=None
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load process {argv[:1]} exited {proc.returncode}")
    out: Result = orjson.loads(proc.stdout)
    return out


# --- the load process -------------------------------------------------------------------


def _body(tag: str, i: int) -> bytes:
    return orjson.dumps(
        {"email": f"{tag}-{i}@example.com", "tenant_name": f"Bench {tag} {i}", "plan": "free"}
    )


_JSON = {"Content-Type": "application/json"}


async def load_open(base_url: str, rate: float, seconds: float, warmup: float, tag: str) -> Result:
    """(a): requests due at fixed times, whatever the earlier ones do."""
    n_warm = round(rate * warmup)
    n = n_warm + round(rate * seconds)
    interval = 1.0 / rate
    latency: list[float | None] = [None] * n
    lag: list[float] = [0.0] * n
    done_at: list[float] = [0.0] * n
    outcomes: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as http:

        async def one(i: int, due: float) -> None:
            lag[i] = time.perf_counter() - due
            try:
                async with http.post("/v1/onboardings", data=_body(tag, i), headers=_JSON) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if i >= n_warm:
                    outcomes[type(exc).__name__] += 1
                return
            end = time.perf_counter()
            if i >= n_warm:
                outcomes[str(status)] += 1
            if status == 202:
                latency[i] = end - due
                done_at[i] = end

        async with anyio.create_task_group() as tg:
            start = time.perf_counter() + 0.05
            for i in range(n):
                due = start + i * interval
                delay = due - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(one, i, due)
    measured_start = start + n_warm * interval
    ok = [x for x in latency[n_warm:] if x is not None]
    last = max(done_at[n_warm:], default=measured_start)
    return {
        "sent": n - n_warm,
        "warmup_sent": n_warm,
        "outcomes": dict(outcomes),
        "latency_s": ok,
        "send_lag_s": lag[n_warm:],
        "window_s": last - measured_start,
    }


def _frame_fields(frame: bytes) -> tuple[str, Any]:
    event, data = "", None
    for line in frame.split(b"\n"):
        if line.startswith(b"event: "):
            event = line[7:].decode()
        elif line.startswith(b"data: "):
            data = orjson.loads(line[6:])
    return event, data


def _ts(at: Any) -> float:
    return datetime.fromisoformat(str(at)).timestamp()


async def load_follow(base_url: str, count: int, rate: float, tag: str) -> Result:
    """(b): sign up, follow the stream to `onboarding.completed`."""
    total: list[float] = []
    post: list[float] = []
    server_side: list[float] = []
    to_client: list[float] = []
    outcomes: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=120, sock_read=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as http:

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                async with http.post("/v1/onboardings", data=_body(tag, i), headers=_JSON) as r:
                    body = await r.read()
                    if r.status != 202:
                        outcomes[f"POST {r.status}"] += 1
                        return
                t_accept = time.perf_counter()
                accepted_at: float | None = None
                async with http.get(orjson.loads(body)["events_url"]) as stream:
                    if stream.status != 200:
                        outcomes[f"GET {stream.status}"] += 1
                        return
                    while True:
                        frame = await stream.content.readuntil(b"\n\n")
                        now_wall, now = time.time(), time.perf_counter()
                        if not frame:
                            outcomes["stream ended early"] += 1
                            return
                        event, data = _frame_fields(frame)
                        if event == "onboarding.accepted":
                            accepted_at = _ts(data["at"])
                        elif event == "onboarding.failed":
                            outcomes["failed"] += 1
                            return
                        elif event == "onboarding.completed":
                            total.append(now - t0)
                            post.append(t_accept - t0)
                            done = _ts(data["at"])
                            to_client.append(now_wall - done)
                            if accepted_at is not None:
                                server_side.append(done - accepted_at)
                            outcomes["completed"] += 1
                            return
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                outcomes[type(exc).__name__] += 1

        async with anyio.create_task_group() as tg:
            start = time.perf_counter()
            for i in range(count):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(one, i)
    return {
        "outcomes": dict(outcomes),
        "total_s": total,
        "post_s": post,
        "server_side_s": server_side,
        "completed_at_to_client_s": to_client,
    }


def load_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.onboarding --load")
    p.add_argument("mode", choices=("open", "follow"))
    p.add_argument("--base-url", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--tag", required=True)
    a = p.parse_args(argv)
    if a.mode == "open":
        out = common.run_async(load_open, a.base_url, a.rate, a.seconds, a.warmup, a.tag)
    else:
        out = common.run_async(load_follow, a.base_url, a.count, a.rate, a.tag)
    out["cpu_s"] = own_cpu_seconds()
    sys.stdout.buffer.write(orjson.dumps(out))
    sys.stdout.flush()
    return 0


# --- the benchmark ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=500.0, help="(a) requests per second (500)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="(a) measured seconds (30; quick 5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="(a) seconds on schedule first, not counted (2)"
    )
    parser.add_argument(
        "--follow",
        type=int,
        default=None,
        help="(b) sign-ups followed to completion (200; quick 40)",
    )
    parser.add_argument(
        "--follow-rate", type=float, default=20.0, help="(b) sign-ups per second (20)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=20, help="the service's queue concurrency (20)"
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help="the service's TENANTRY_POOL_SIZE (default: concurrency + 10, so that running"
        " jobs leave connections to the HTTP handlers)",
    )
    parser.add_argument(
        "--accept-only",
        action="store_true",
        help="diagnostic: the worker serves another queue, so nothing is provisioned and (a)"
        " measures the accept path alone ((b) is skipped)",
    )
    parser.add_argument("--skip-open", action="store_true", help="skip (a)")
    parser.add_argument("--skip-follow", action="store_true", help="skip (b)")


async def onboarding_counts(conn: asyncpg.Connection, tag: str) -> Result:
    row = await conn.fetchrow(
        "SELECT count(*) AS total,"
        "       count(*) FILTER (WHERE state = 'completed') AS completed,"
        "       count(*) FILTER (WHERE state = 'failed') AS failed"
        "  FROM tenantry.onboardings WHERE email LIKE $1",
        f"{tag}-%",
    )
    assert row is not None
    queued, running = await common.queue_depth(conn)
    return {
        "accepted": int(row["total"]),
        "completed": int(row["completed"]),
        "failed": int(row["failed"]),
        "in_progress": int(row["total"]) - int(row["completed"]) - int(row["failed"]),
        "jobs_queued": queued,
        "jobs_running": running,
    }


async def part_follow(svc: ServiceProcess, url: str, count: int, rate: float) -> Result:
    tag = f"f{uuid.uuid4().hex[:6]}"
    progress(f"onboarding: (b) {count} sign-ups at {rate:g}/s, each followed to completion")
    raw = await run_load(
        [
            *("follow", "--base-url", svc.base_url, "--count", str(count)),
            *("--rate", str(rate), "--tag", tag),
        ]
    )
    return {
        "count": count,
        "rate": rate,
        "outcomes": raw["outcomes"],
        "accept_to_completed_ms": common.latency_summary_ms(raw["total_s"]),
        "split_ms": {
            "post": common.latency_summary_ms(raw["post_s"]),
            "accepted_at_to_completed_at": common.latency_summary_ms(raw["server_side_s"]),
            "completed_at_to_client": common.latency_summary_ms(raw["completed_at_to_client_s"]),
        },
    }


async def part_open(
    svc: ServiceProcess, url: str, rate: float, seconds: float, warmup: float
) -> Result:
    tag = f"o{uuid.uuid4().hex[:6]}"
    progress(f"onboarding: (a) open loop, {rate:g} req/s for {seconds:g} s (+{warmup:g} s warm-up)")
    cpu = CpuWindow(svc.pid, await postmaster_pid(url))
    argv = ["open", "--base-url", svc.base_url, "--rate", str(rate), "--seconds", str(seconds)]
    argv += ["--warmup", str(warmup), "--tag", tag]
    # The CPU window starts with the load process (its imports included, ~0.5 s of one core).
    cpu.start()
    raw = await run_load(argv)
    usage = cpu.stop(load=raw["cpu_s"])
    conn = await db.connect(url)
    try:
        counts = await onboarding_counts(conn, tag)
    finally:
        await conn.close()
    outcomes: dict[str, int] = raw["outcomes"]
    ok = outcomes.get("202", 0)
    errors = raw["sent"] - ok
    lat = common.latency_summary_ms(raw["latency_s"])
    achieved = ok / raw["window_s"] if raw["window_s"] > 0 else 0.0
    met = (
        errors == 0
        and bool(lat.get("n"))
        and lat["p99"] <= GOAL_P99_MS
        and achieved >= rate * (1 - RATE_SHORTFALL)
    )
    return {
        "rate": rate,
        "seconds": seconds,
        "warmup_s": warmup,
        "sent": raw["sent"],
        "accepted": ok,
        "errors": errors,
        "outcomes": outcomes,
        "achieved_per_s": round(achieved, 1),
        "latency_ms": lat,
        "send_lag_ms": common.latency_summary_ms(raw["send_lag_s"]),
        "provisioning_at_end": counts,
        "cpu": usage,
        "goal": {"p99_ms_at_most": GOAL_P99_MS, "errors": 0, "met": met},
    }


async def run(server_url: str, args: argparse.Namespace) -> Result:
    seconds = common.pick(args.seconds, quick=args.quick, quick_value=5.0, full_value=30.0)
    follow = common.pick(args.follow, quick=args.quick, quick_value=40, full_value=200)
    pool_size = args.pool_size or args.concurrency + 10
    result: Result = {
        "concurrency": args.concurrency,
        "pool_size": pool_size,
        "accept_only": args.accept_only,
    }
    # --accept-only: a queue nobody enqueues to, so the provisioning jobs wait untouched.
    queue = "bench-idle" if args.accept_only else "default"
    data_dir = Path(tempfile.mkdtemp(prefix="tenantry-bench-onboarding-"))
    try:
        async with (
            common.fresh_database(server_url, "onboarding") as url,
            tenantry_service(
                url,
                data_dir,
                TENANTRY_TOKEN_SECRET=uuid.uuid4().hex + uuid.uuid4().hex,
                TENANTRY_QUEUES=f"{queue}={args.concurrency}",
                TENANTRY_POOL_SIZE=str(pool_size),
            ) as svc,
        ):
            if not (args.skip_follow or args.accept_only):
                result["follow"] = await part_follow(svc, url, follow, args.follow_rate)
            if not args.skip_open:
                result["open"] = await part_open(svc, url, args.rate, seconds, args.warmup)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


def _line(label: str, s: dict[str, float]) -> str:
    if not s.get("n"):
        return f"  {label:<30} no samples"
    return (
        f"  {label:<30} p50 {fmt_ms(s['p50']):>7}  p90 {fmt_ms(s['p90']):>7}"
        f"  p99 {fmt_ms(s['p99']):>7}  max {fmt_ms(s['max']):>8} ms  (n={s['n']:,})"
    )


def _cores(cpu: Result) -> str:
    c = cpu["cores"]
    keys = ("service", "postgres", "load", "other", "machine")
    parts = [f"{k} {c[k]:.2f}" for k in keys if k in c]
    return (
        f"  CPU, cores used over {cpu['window_s']:g} s: "
        + ", ".join(parts)
        + (f" (of {cpu['machine_cores']})")
    )


def render(result: Result) -> str:
    lines = common.header(
        result,
        f"onboarding: one `tenantry run` process (queue concurrency {result['concurrency']},"
        f" pool {result['pool_size']}), load from a separate process"
        + (", ACCEPT ONLY (nothing provisioned)" if result.get("accept_only") else ""),
    )
    if "open" in result:
        o = result["open"]
        p = o["provisioning_at_end"]
        lines.append(
            f"(a) POST /v1/onboardings, open loop {o['rate']:g} req/s for {o['seconds']:g} s"
            f" (after {o['warmup_s']:g} s warm-up); latency from the scheduled send time:"
        )
        lines.append(_line("202 latency", o["latency_ms"]))
        lines.append(_line("send lag (generator)", o["send_lag_ms"]))
        lines.append(
            f"  sent {o['sent']:,}, accepted {o['accepted']:,}, errors {o['errors']:,}"
            f" {o['outcomes']}; achieved {fmt_rate(o['achieved_per_s'])}/s"
        )
        lines.append(
            f"  provisioning at the end of the load: {p['completed']:,} of {p['accepted']:,}"
            f" completed, {p['failed']:,} failed, {p['in_progress']:,} in progress (jobs"
            f" queued {p['jobs_queued']:,}, running {p['jobs_running']:,})"
        )
        lines.append(_cores(o["cpu"]))
        g = o["goal"]
        lines.append(
            f"  goal p99 <= {g['p99_ms_at_most']:g} ms, no errors, rate achieved:"
            f" {common.verdict(g['met'])}"
        )
    if "follow" in result:
        f = result["follow"]
        s = f["split_ms"]
        lines.append(
            f"(b) accept -> completed (7 steps, files for mail and storage), {f['count']}"
            f" sign-ups at {f['rate']:g}/s, outcomes {f['outcomes']}:"
        )
        lines.append(_line("POST -> completed received", f["accept_to_completed_ms"]))
        lines.append(_line("  POST (202)", s["post"]))
        lines.append(_line("  accepted at -> completed at", s["accepted_at_to_completed_at"]))
        lines.append(_line("  completed at -> client", s["completed_at_to_client"]))
    return "\n".join(lines)


BENCH = common.Bench(NAME, __doc__ or NAME, add_arguments, run, render)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--load"]:
        return load_main(args[1:])
    return common.main(BENCH, args)


if __name__ == "__main__":
    raise SystemExit(main())
