"""Sustained load: producers inserting with plain SQL while a Worker drains.

Producers: pgbench, --clients connections (8), each transaction one single-row plain
`INSERT INTO tenantry.jobs (tenant_id, kind) VALUES (<random tenant>, 'noop')`: what
another service writing straight into the table does (the statement trigger and its
throttled NOTIFY included).  pgbench is a separate process, so the producers do not share
this Python process's CPU; they do share the machine's cores with it and the server.

Consumer: one Worker (plus the Listener, wired as in `tenantry.app`), queue concurrency
--concurrency (100), a no-op handler, its default 1 s poll.  A sampler on a connection of
its own records the queue depth (queued and running rows) every 0.5 s.

Rounds, one per --rate value, each on emptied tables with a fresh Worker:
  max    pgbench as fast as it can: the worker's capacity under concurrent inserts;
         if it cannot keep up the backlog grows, and this shows by how much.
  1000   a fixed arrival rate (jobs/s, pgbench --rate) well below the worker's capacity:
         shows whether the queue then stays near empty.  Not higher by default: on a
         2-core machine with fsync on, 8 clients of one-row commits insert only ~3k/s,
         so a fixed 3000/s round would be the "max" round again (and pgbench fell short
         of it).  A round whose arrival rate misses its target by over 5% says so.
(default: `--rate max 1000`; pass e.g. `--rate 5000` for a single round.)

Figures per round, over the pgbench window (process start to exit):
  jobs in/s    transactions pgbench committed / window (pgbench's own tps beside it)
  jobs out/s   outcomes the Worker wrote (OutcomeCounter, 'flushed') / the same window
  depth        queued rows at the start, at the end, and the most seen by the sampler
  bounded      the least-squares slope of the queued depth over the second half of the
               window is at most 2% of jobs in/s: the backlog absorbed under 2% of what
               arrived.  A finite run cannot prove boundedness; this flags steady growth
               (a worker slower than its producers) and tolerates a backlog that swings
               but does not trend upward.
  drain        after pgbench exits the Worker keeps running until every inserted job's
               outcome is written (at most --drain-timeout s): the time that took.

Planner statistics matter here: the claim's plan depends on what ANALYZE last saw of
tenantry.jobs (on a table never analyzed, or analyzed while empty, a claim over a deep
backlog reads the whole backlog).  Rounds start on a TRUNCATEd table with no VACUUM or
ANALYZE of their own (the first on a freshly migrated database, as after a first deploy);
autovacuum may analyze it meanwhile.  Each round reports the table's reltuples at its
start and how many (auto)analyzes ran during it, so a collapse can be told apart.
"""

from __future__ import annotations

import argparse
import time

import anyio
import asyncpg

from tenantry import db
from tenantry.app import JOBS_CHANNEL
from tenantry.jobs.model import Job
from tenantry.jobs.registry import Registry
from tenantry.jobs.worker import Worker

from . import common
from .common import Result, fmt_rate, progress

NAME = "sustained"
# Bounded: the backlog grew by at most this fraction of the arrival rate (second half).
BOUNDED_SLOPE_FRACTION = 0.02
SAMPLE_PERIOD = 0.5
# A fixed-rate round "fell short" when its arrival rate missed the target by more than this.
RATE_SHORTFALL = 0.05


async def _noop(_job: Job) -> None:
    return None


def _rate(text: str) -> float | None:
    """'max' (as fast as pgbench can) or a rate in jobs per second."""
    if text.lower() in ("max", "none"):
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("a rate must be > 0 (or 'max')")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seconds", type=float, default=None, help="producing seconds per round (30; quick 10)"
    )
    parser.add_argument(
        "--rate",
        type=_rate,
        nargs="+",
        default=[None, 1000.0],
        help="one round per value: 'max' (as fast as possible) or jobs/s (default: max 1000)",
    )
    parser.add_argument("--clients", type=int, default=8, help="pgbench clients (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench threads (default 2)")
    parser.add_argument("--tenants", type=int, default=4, help="tenants the jobs are spread over")
    parser.add_argument(
        "--concurrency", type=int, default=100, help="Worker queue concurrency (default 100)"
    )
    parser.add_argument("--pool-size", type=int, default=10, help="Tenantry pool size (default 10)")
    common.add_rearm_arguments(parser, "what the re-arm costs the producers")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="seconds the backlog may take to drain after the producers stop (default 120)",
    )


def script(tenants: int) -> str:
    # With --protocol=prepared, `:t` is sent as an untyped parameter and to_hex(unknown)
    # is ambiguous (integer or bigint overload): the cast rides along in the var name.
    return (
        f"\\set tenants {tenants}\n"
        "\\set t random(1, :tenants)\n"
        "INSERT INTO tenantry.jobs (tenant_id, kind)"
        f" VALUES ({common.pgbench_tenant_expr('t::integer')}, 'noop');\n"
    )


async def analyze_state(conn: db.Conn) -> tuple[float, int]:
    """(reltuples, analyzes so far) of tenantry.jobs: what the planner believes of it.
    reltuples is -1 on a table never analyzed (or just truncated)."""
    row = await conn.fetchrow(
        "SELECT c.reltuples, coalesce(s.analyze_count + s.autoanalyze_count, 0) AS analyzes"
        "  FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid"
        " WHERE c.oid = 'tenantry.jobs'::regclass"
    )
    assert row is not None
    return float(row["reltuples"]), int(row["analyzes"])


def slope(points: list[tuple[float, int]]) -> float:
    """Least-squares slope (rows per second) of (seconds, depth) points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(d for _, d in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return 0.0
    return sum((t - mx) * (d - my) for t, d in points) / sxx


class Sampler:
    """Queue depth every SAMPLE_PERIOD seconds on a connection of its own, until
    stopped (an event rather than a cancel, so no query is interrupted midway)."""

    def __init__(self, conn: asyncpg.Connection, origin: float) -> None:
        self.conn = conn
        self.origin = origin
        self.samples: list[tuple[float, int, int]] = []  # (seconds, queued, running)
        self._stop = anyio.Event()

    async def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            queued, running = await common.queue_depth(self.conn)
            self.samples.append((round(time.monotonic() - self.origin, 3), queued, running))
            next_at += SAMPLE_PERIOD
            with anyio.move_on_after(max(next_at - time.monotonic(), 0.0)):
                await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()


async def sustained_round(url: str, args: argparse.Namespace, rate: float | None) -> Result:
    seconds = common.pick(args.seconds, quick=args.quick, quick_value=10.0, full_value=30.0)
    pool = await db.create_pool(url, min_size=args.pool_size, max_size=args.pool_size)
    sampler_conn = await db.connect(url)
    # The insert notifications of the round (the cost of the wake-ups, beside the
    # worker's claims and this process's CPU).
    listen_conn = await db.connect(url)
    heard: list[float] = []
    await listen_conn.add_listener(JOBS_CHANNEL, lambda *_: heard.append(time.monotonic()))
    try:
        async with pool.acquire() as conn:
            await common.reset_tables(conn)
            await common.checkpoint(conn)
        registry = Registry()
        registry.add("noop", _noop)
        counter = common.OutcomeCounter()
        async with (
            common.running_worker(
                url,
                pool,
                registry,
                concurrency=args.concurrency,
                hook=counter,
                worker_cls=common.NoRearmWorker if args.no_rearm else Worker,
                rearm_interval=(
                    None if args.rearm_interval_ms is None else args.rearm_interval_ms / 1000.0
                ),
            ),
            anyio.create_task_group() as tg,
        ):
            async with pool.acquire() as conn:
                depth_start, _ = await common.queue_depth(conn)
                reltuples, analyzes_before = await analyze_state(conn)
            origin = time.monotonic()
            sampler = Sampler(sampler_conn, origin)
            tg.start_soon(sampler.run)
            flushed_start = counter.flushed
            claims_start, rearms_start = counter.claims_run, counter.rearms
            cpu_start = time.process_time()
            pg = await common.run_pgbench(
                url,
                [(script(args.tenants), 1)],
                clients=args.clients,
                threads=min(args.threads, args.clients),
                seconds=seconds,
                rate=rate,
            )
            window = time.monotonic() - origin
            flushed_end = counter.flushed
            cpu_s = time.process_time() - cpu_start
            claims_run = counter.claims_run - claims_start
            rearms = counter.rearms - rearms_start
            async with pool.acquire() as conn:
                depth_end, running_end = await common.queue_depth(conn)
            # Every committed insert is one outcome to write: wait for them all.
            drained = await counter.wait_flushed(pg.transactions, within=args.drain_timeout)
            drain_s = time.monotonic() - origin - window
            sampler.stop()
        async with pool.acquire() as conn:
            left = int(await conn.fetchval("SELECT count(*) FROM tenantry.jobs"))
            _, analyzes_after = await analyze_state(conn)
            succeeded = int(
                await conn.fetchval("SELECT coalesce(sum(succeeded), 0) FROM tenantry.job_counters")
            )
    finally:
        await sampler_conn.close()
        await listen_conn.close()
        await pool.close()

    in_rate = pg.transactions / window
    out_rate = (flushed_end - flushed_start) / window
    during = [(t, q) for t, q, _ in sampler.samples if t <= window]
    second_half = [(t, q) for t, q in during if t >= window / 2]
    growth = slope(second_half)
    bounded = growth <= BOUNDED_SLOPE_FRACTION * in_rate
    # pgbench --rate schedules transactions; busy clients fall behind that schedule.
    short = rate is not None and in_rate < (1 - RATE_SHORTFALL) * rate
    return {
        "rate": rate,
        "seconds": round(window, 3),
        "clients": args.clients,
        "pgbench": {
            "transactions": pg.transactions,
            "failed": pg.failed,
            "tps": round(pg.tps, 1),
            "latency_ms": pg.latency_ms,
        },
        "jobs_in_per_s": round(in_rate, 1),
        "rate_fell_short": short,
        "jobs_out_per_s": round(out_rate, 1),
        "out_over_in": round(out_rate / in_rate, 3) if in_rate else None,
        "depth": {
            "start": depth_start,
            "end": depth_end,
            "running_end": running_end,
            "max": max([q for _, q in during] + [depth_start, depth_end]),
            "second_half_slope_per_s": round(growth, 1),
        },
        "bounded": bounded,
        "stats": {
            "reltuples_at_start": reltuples,
            "analyzes_during_round": analyzes_after - analyzes_before,
        },
        "drained": drained,
        "drain_seconds": round(drain_s, 3) if drained else None,
        "flushed": counter.flushed,
        "claims": counter.claims,
        "avg_claim_batch": round(counter.claimed / max(counter.claims, 1), 1),
        "rearms": counter.rearms,
        # Over the pgbench window: the wake-ups' cost.
        "cost": {
            "notifications_per_s": round(
                sum(1 for t in heard if origin <= t <= origin + window) / window, 1
            ),
            "claims_per_s": round(claims_run / window, 1),
            "rearming_claims_per_s": round(rearms / window, 1),
            "claims_per_job": round(claims_run / max(flushed_end - flushed_start, 1), 3),
            "process_cpu_s_per_s": round(cpu_s / window, 3),
        },
        "left_in_table": left,
        "counted_succeeded": succeeded,
        "samples": sampler.samples,
    }


async def run(server_url: str, args: argparse.Namespace) -> Result:
    rounds: list[Result] = []
    async with common.fresh_database(server_url, "sustained") as url:
        for rate in args.rate:
            label = "max" if rate is None else f"{rate:g}/s"
            progress(
                f"sustained: rate {label}, {args.clients} pgbench clients,"
                f" concurrency {args.concurrency}"
            )
            r = await sustained_round(url, args, rate)
            progress(
                f"sustained: rate {label}: in {fmt_rate(r['jobs_in_per_s'])}/s,"
                f" out {fmt_rate(r['jobs_out_per_s'])}/s, depth end {r['depth']['end']},"
                f" drain {r['drain_seconds']} s"
            )
            rounds.append(r)
    return {
        "tenants": args.tenants,
        "rearm": not args.no_rearm,
        "rearm_interval_ms": args.rearm_interval_ms,
        "concurrency": args.concurrency,
        "pool_size": args.pool_size,
        "bounded_criterion": (
            f"second-half depth slope <= {BOUNDED_SLOPE_FRACTION:.0%} of jobs in/s"
        ),
        "rounds": rounds,
    }


def render(result: Result) -> str:
    lines = common.header(
        result,
        "sustained: pgbench plain-SQL single-row inserts while a Worker drains",
    )
    lines.append(
        f"Worker concurrency {result['concurrency']}, pool {result['pool_size']},"
        f" {result['tenants']} tenants; bounded = {result['bounded_criterion']}"
    )
    for r in result["rounds"]:
        d = r["depth"]
        label = "as fast as possible" if r["rate"] is None else f"fixed {r['rate']:g}/s"
        if r["rate_fell_short"]:
            label += " (pgbench fell short of it)"
        drain = (
            f"{r['drain_seconds']:.2f} s"
            if r["drained"]
            else f"NOT drained within the timeout ({r['left_in_table']} left)"
        )
        lines += [
            f"Round: {r['clients']} clients, {label}, {r['seconds']:.1f} s:",
            f"  jobs in/s  {fmt_rate(r['jobs_in_per_s']):>8}   (pgbench tps"
            f" {fmt_rate(r['pgbench']['tps'])}, {r['pgbench']['transactions']:,} inserts,"
            f" {r['pgbench']['failed']} failed)",
            f"  jobs out/s {fmt_rate(r['jobs_out_per_s']):>8}   (out/in {r['out_over_in']},"
            f" {r['claims']:,} claims of {r['avg_claim_batch']} rows avg,"
            f" {r.get('rearms', 0):,} of them re-arming the wake-up throttle)",
            f"  depth (queued) start {d['start']:,}, end {d['end']:,}, max {d['max']:,};"
            f" second-half slope {d['second_half_slope_per_s']:+,.0f}/s"
            f" -> bounded: {'yes' if r['bounded'] else 'NO'}",
            f"  drain after producers stopped: {drain}",
            f"  planner stats: reltuples {r['stats']['reltuples_at_start']:g} at start,"
            f" {r['stats']['analyzes_during_round']} analyze(s) during the round",
        ]
    return "\n".join(lines)


BENCH = common.Bench(NAME, __doc__ or NAME, add_arguments, run, render)


def main() -> int:
    return common.main(BENCH)


if __name__ == "__main__":
    raise SystemExit(main())
