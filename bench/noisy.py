"""Noisy neighbour: tenant B's job while tenant A has a deep backlog, and what the
fairness costs a drain.

Part 1, latency.  A Worker (plus the Listener, wired as in `tenantry.app`) with one
queue of `--concurrency` slots (20) drains tenant A's backlog of `--backlog` jobs
(50,000) whose handler sleeps `--handler-ms` (1 ms: a little I/O, so that the worker
keeps claiming small batches as slots free up, as it would in production; 0 makes it a
no-op).  Meanwhile tenant B enqueues one job at a time from its own connection
(autocommit `SELECT tenantry.enqueue(...)`), `--trials` times (20), 50-150 ms apart.
Each trial measures from the moment that statement has returned (committed) to the
moment B's handler starts; both clocks are `time.perf_counter` in this one process and
event loop.  Before each trial A's queued depth is counted, and topped up to
`--backlog` when it has fallen below half, so B always competes with a deep backlog.
The same number of trials on the idle queue (before A's backlog exists) gives the
floor: NOTIFY delivery plus one claim, with no neighbour at all.

Part 2, the price of fairness.  The same number of no-op jobs is drained twice per
spread of tenants (`--drain-tenants`: 1, i.e. A's backlog alone, and 100): once by the
Worker as shipped (the fair claim: a loose index scan over tenants, equal shares), and
once by a subclass whose `claim` runs a plain FIFO statement instead
(`... ORDER BY priority DESC, run_at, id LIMIT n FOR UPDATE SKIP LOCKED`, the same
columns, wrapped in a SECURITY DEFINER function like the fair claim): identical
worker, listener, outcome writer and pool, only the claim differs.  Each design gets
the index its claim needs and no other: the fair rounds use the migrated
`jobs_claim_idx` (queue, priority DESC, tenant_id, run_at, id); the FIFO rounds drop it
and create (queue, priority DESC, run_at, id), both partial on state = 'queued'; so
neither pays for the other's index maintenance.
The clock runs from starting the worker until every outcome is flushed (as in
bench.drain).  The order alternates (fair first, then FIFO first) over
`--drain-rounds` repetitions and the median is reported.

Goals: B's p99 commit -> handler start <= 100 ms under A's backlog; the fair drain at
least 0.9x the FIFO drain for every spread.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from typing import Any

import anyio
import asyncpg

from tenantry import db
from tenantry.jobs.model import Job
from tenantry.jobs.registry import Registry
from tenantry.jobs.worker import Worker

from . import common
from .common import Result, fmt_ms, fmt_rate, progress

NAME = "noisy"
GOAL_P99_MS = 100.0
GOAL_DRAIN_RATIO = 0.9
TENANT_A = common.tenant(0)
# Sorts after A: a tenant walk that starts at the first tenant meets A first.
TENANT_B = common.tenant(1)
TRIAL_TIMEOUT = 10.0

# The fair-less baseline: the most urgent rows of the queue, whoever they belong to.
# Same lock discipline and columns as the fair `tenantry.claim_jobs`, and wrapped the
# same way (a PL/pgSQL SECURITY DEFINER function owned by tenantry_system, with the same
# SET clauses), so that the comparison prices fairness and not the wrapper.  Created in
# the benchmark's own database only.
FIFO_FUNCTION = """
CREATE FUNCTION tenantry.bench_fifo_claim(
    for_queue text, n integer, owner text, lease_s double precision, after_tenant uuid,
    tenant_cap integer)
RETURNS TABLE (tenant_id uuid, id bigint, queue text, kind text, payload text,
               priority smallint, attempts integer, max_attempts integer,
               created_at timestamptz, unknown_kind_since timestamptz,
               cursor_after uuid, more boolean, capped boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    got integer;
BEGIN
PERFORM tenantry.stage_due_jobs(for_queue, 1000);
RETURN QUERY
WITH picked AS (
    SELECT j.ctid AS tid
      FROM tenantry.jobs j
     WHERE j.state = 'queued' AND j.queue = $1::text
     ORDER BY j.queue, j.priority DESC, j.run_at, j.id
     LIMIT $2::integer
       FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE tenantry.jobs j
       SET state = 'running',
           attempts = j.attempts + 1,
           lease_owner = $3::text,
           lease_expires_at = now() + make_interval(secs => $4::double precision),
           started_at = now()
     WHERE j.ctid = ANY (ARRAY(SELECT p.tid FROM picked p))
    RETURNING j.tenant_id, j.id, j.queue, j.kind, j.payload::text AS payload, j.priority,
              j.attempts, j.max_attempts, j.created_at, j.unknown_kind_since
)
SELECT c.tenant_id, c.id, c.queue, c.kind, c.payload, c.priority, c.attempts,
       c.max_attempts, c.created_at, c.unknown_kind_since, NULL::uuid, NULL::boolean,
       NULL::boolean
  FROM claimed c;
GET DIAGNOSTICS got = ROW_COUNT;
-- The claim's state row, as the fair claim ends: nothing more when it came back short.
RETURN QUERY SELECT NULL::uuid, NULL::bigint, NULL::text, NULL::text, NULL::text,
                    NULL::smallint, NULL::integer, NULL::integer, NULL::timestamptz,
                    NULL::timestamptz, after_tenant, got = n, false;
END;
$$;
ALTER FUNCTION tenantry.bench_fifo_claim(text, integer, text, double precision, uuid, integer)
    OWNER TO tenantry_system;
"""
# The fair claim's parameters that FIFO ignores (rotating cursor, per-tenant cap) are
# passed all the same, so both statements take the same arguments.
FIFO_CLAIM = """
SELECT * FROM tenantry.bench_fifo_claim($1::text, $2::integer, $3::text,
                                        $4::double precision, $5::uuid, $6::integer)
"""
FIFO_INDEX = (
    "CREATE INDEX bench_fifo_claim_idx ON tenantry.jobs (queue, priority DESC, run_at, id)"
    " WHERE state = 'queued'"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backlog", type=int, default=None, help="tenant A's queued jobs (50000; quick 10000)"
    )
    parser.add_argument(
        "--trials", type=int, default=None, help="tenant B's probe jobs (20; quick 5)"
    )
    parser.add_argument("--concurrency", type=int, default=20, help="queue slots (default 20)")
    parser.add_argument("--pool-size", type=int, default=10, help="pool size (default 10)")
    parser.add_argument(
        "--handler-ms",
        type=float,
        default=1.0,
        help="what A's handler sleeps in part 1, ms (default 1; 0: no-op)",
    )
    parser.add_argument(
        "--drain-jobs", type=int, default=None, help="jobs per drain in part 2 (default --backlog)"
    )
    parser.add_argument(
        "--drain-tenants",
        type=int,
        nargs="+",
        default=[1, 100],
        help="tenant spreads to compare fair and FIFO drains on (default 1 100)",
    )
    parser.add_argument(
        "--drain-rounds", type=int, default=None, help="repetitions per drain (2; quick 1)"
    )
    parser.add_argument("--skip-drain", action="store_true", help="part 1 only")


# --- part 1: B's latency behind A's backlog -----------------------------------------


class Probes:
    """B's handler: records when each trial's job started."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self._changed = anyio.Event()

    async def handler(self, job: Job) -> None:
        self.started[int(job.payload["trial"])] = time.perf_counter()
        self._changed.set()

    async def wait(self, trial: int, within: float) -> float | None:
        with anyio.move_on_after(within):
            while trial not in self.started:
                self._changed = anyio.Event()
                await self._changed.wait()
        return self.started.get(trial)


async def probe(conn: asyncpg.Connection, probes: Probes, trial: int) -> float | None:
    """One B job: seconds from its enqueue returning to its handler starting."""
    await conn.fetchval(
        "SELECT tenantry.enqueue($1::uuid, 'probe', $2::jsonb)", TENANT_B, {"trial": trial}
    )
    committed = time.perf_counter()
    started = await probes.wait(trial, TRIAL_TIMEOUT)
    return None if started is None else started - committed


async def fill_a(conn: asyncpg.Connection, n: int) -> None:
    # One statement: the statement-level trigger notifies once, as a bulk import would.
    await conn.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind)"
        " SELECT $1::uuid, 'work' FROM generate_series(1, $2::integer)",
        TENANT_A,
        n,
    )


async def queued_of(conn: asyncpg.Connection, tenant: uuid.UUID) -> int:
    n = await conn.fetchval(
        "SELECT count(*) FROM tenantry.jobs WHERE tenant_id = $1::uuid AND state = 'queued'",
        tenant,
    )
    return int(n)


def _gap(rnd: random.Random) -> float:
    # Spread the trials over the worker's claim cycle rather than lock-step with it.
    return rnd.uniform(0.05, 0.15)


async def latency_part(url: str, args: argparse.Namespace, backlog: int, trials: int) -> Result:
    handler_s = args.handler_ms / 1000.0

    async def work(_job: Job) -> None:
        if handler_s > 0:
            await anyio.sleep(handler_s)

    probes = Probes()
    registry = Registry()
    registry.add("work", work)
    registry.add("probe", probes.handler)
    counter = common.OutcomeCounter()
    rnd = random.Random(2024)
    idle: list[float] = []
    loaded: list[float] = []
    depths: list[int] = []
    timeouts = {"idle": 0, "backlog": 0}
    refills = 0
    pool = await db.create_pool(url, min_size=args.pool_size, max_size=args.pool_size)
    producer = await db.connect(url)
    try:
        await common.reset_tables(producer)
        async with common.running_worker(
            url, pool, registry, concurrency=args.concurrency, hook=counter
        ):
            progress(f"noisy: {trials} probes on the idle queue")
            for i in range(trials):
                lat = await probe(producer, probes, i)
                if lat is None:
                    timeouts["idle"] += 1
                else:
                    idle.append(lat)
                await anyio.sleep(_gap(rnd))
            progress(f"noisy: tenant A's backlog of {backlog:,} jobs, {trials} probes behind it")
            await common.bulk_enqueue(producer, backlog, [TENANT_A], kind="work")
            # Let the worker reach its steady state (claiming as slots free) first.
            if not await counter.wait_flushed(5 * args.concurrency, within=60.0):
                raise RuntimeError("the worker did not start draining A's backlog")
            a_flushed = counter.flushed
            a_started = time.monotonic()
            for i in range(trials, 2 * trials):
                depth = await queued_of(producer, TENANT_A)
                if depth < backlog // 2:
                    await fill_a(producer, backlog - depth)
                    refills += 1
                    depth = await queued_of(producer, TENANT_A)
                depths.append(depth)
                await anyio.sleep(_gap(rnd))
                lat = await probe(producer, probes, i)
                if lat is None:
                    timeouts["backlog"] += 1
                else:
                    loaded.append(lat)
            a_rate = (counter.flushed - a_flushed) / (time.monotonic() - a_started)
    finally:
        await producer.close()
        await pool.close()
    return {
        "backlog": backlog,
        "trials": trials,
        "handler_ms": args.handler_ms,
        "idle_ms": common.latency_summary_ms(idle),
        "backlog_ms": common.latency_summary_ms(loaded),
        "timeouts": timeouts,
        "a_queued_at_trials": {"min": min(depths), "max": max(depths)},
        "a_refills": refills,
        "a_jobs_per_s_during_trials": round(a_rate, 1),
    }


# --- part 2: fair versus FIFO drain ---------------------------------------------------


class FifoWorker(Worker):
    """The shipped Worker with a fair-less claim; everything else is inherited."""

    claim_statement = FIFO_CLAIM


async def use_index(conn: db.Conn, *, fair: bool, claim_idx_ddl: str) -> None:
    """Swap the claim index: the migrated one for the fair claim, a FIFO one for FIFO.
    Done on the empty table, so it costs nothing."""
    await conn.execute("DROP INDEX IF EXISTS tenantry.bench_fifo_claim_idx")
    await conn.execute("DROP INDEX IF EXISTS tenantry.jobs_claim_idx")
    await conn.execute(claim_idx_ddl if fair else FIFO_INDEX)


async def _noop(_job: Job) -> None:
    return None


async def drain_round(
    url: str,
    args: argparse.Namespace,
    *,
    jobs: int,
    tenants: int,
    fair: bool,
    claim_idx_ddl: str,
) -> Result:
    pool = await db.create_pool(url, min_size=args.pool_size, max_size=args.pool_size)
    try:
        async with pool.acquire() as conn:
            await common.reset_tables(conn)
            await use_index(conn, fair=fair, claim_idx_ddl=claim_idx_ddl)
            await common.bulk_enqueue(conn, jobs, [common.tenant(i) for i in range(tenants)])
            await common.checkpoint(conn)
        registry = Registry()
        registry.add("noop", _noop)
        counter = common.OutcomeCounter()
        started = time.monotonic()
        async with common.running_worker(
            url,
            pool,
            registry,
            concurrency=args.concurrency,
            hook=counter,
            worker_cls=Worker if fair else FifoWorker,
        ):
            done = await counter.wait_flushed(jobs, within=max(60.0, jobs / 200))
            elapsed = time.monotonic() - started
        async with pool.acquire() as conn:
            left = await conn.fetchval("SELECT count(*) FROM tenantry.jobs")
    finally:
        await pool.close()
    if not done or left:
        raise RuntimeError(f"drain incomplete: {counter.flushed}/{jobs} flushed, {left} left")
    return {
        "claim": "fair" if fair else "fifo",
        "tenants": tenants,
        "jobs": jobs,
        "seconds": round(elapsed, 3),
        "jobs_per_s": round(jobs / elapsed, 1),
        "claims": counter.claims,
        "avg_claim_batch": round(counter.claimed / max(counter.claims, 1), 1),
    }


async def drain_part(url: str, args: argparse.Namespace, jobs: int, rounds: int) -> Result:
    async with common.fresh_database(url, "noisy_drain") as dburl:
        conn = await asyncpg.connect(dburl)
        try:
            # Recreate the migrated index from its own definition, not a copy of it.
            claim_idx_ddl: str = await conn.fetchval(
                "SELECT pg_get_indexdef('tenantry.jobs_claim_idx'::regclass)"
            )
            await conn.execute(FIFO_FUNCTION)
        finally:
            await conn.close()
        spreads: list[Result] = []
        for tenants in args.drain_tenants:
            runs: list[Result] = []
            for r in range(rounds):
                for fair in (True, False) if r % 2 == 0 else (False, True):
                    label = "fair" if fair else "FIFO"
                    progress(f"noisy: drain {jobs:,} jobs over {tenants} tenant(s), {label} claim")
                    res = await drain_round(
                        dburl,
                        args,
                        jobs=jobs,
                        tenants=tenants,
                        fair=fair,
                        claim_idx_ddl=claim_idx_ddl,
                    )
                    progress(f"noisy: {label}: {fmt_rate(res['jobs_per_s'])} jobs/s")
                    runs.append(res)
            fair_rate = statistics.median(r["jobs_per_s"] for r in runs if r["claim"] == "fair")
            fifo_rate = statistics.median(r["jobs_per_s"] for r in runs if r["claim"] == "fifo")
            spreads.append(
                {
                    "tenants": tenants,
                    "fair_jobs_per_s": round(fair_rate, 1),
                    "fifo_jobs_per_s": round(fifo_rate, 1),
                    "ratio_fair_over_fifo": round(fair_rate / fifo_rate, 3),
                    "runs": runs,
                }
            )
    worst = min(float(s["ratio_fair_over_fifo"]) for s in spreads)
    return {
        "jobs": jobs,
        "rounds": rounds,
        "spreads": spreads,
        "worst_ratio_fair_over_fifo": worst,
        "goal": {"ratio_at_least": GOAL_DRAIN_RATIO, "met": worst >= GOAL_DRAIN_RATIO},
    }


# --- the benchmark ------------------------------------------------------------------


async def run(server_url: str, args: argparse.Namespace) -> Result:
    backlog = common.pick(args.backlog, quick=args.quick, quick_value=10_000, full_value=50_000)
    trials = common.pick(args.trials, quick=args.quick, quick_value=5, full_value=20)
    rounds = common.pick(args.drain_rounds, quick=args.quick, quick_value=1, full_value=2)
    async with common.fresh_database(server_url, "noisy") as url:
        latency = await latency_part(url, args, backlog, trials)
    p99 = float(latency["backlog_ms"].get("p99", float("inf")))
    met = p99 <= GOAL_P99_MS and not latency["timeouts"]["backlog"]
    result: Result = {
        "concurrency": args.concurrency,
        "pool_size": args.pool_size,
        "latency": latency,
        "goal": {"p99_ms_at_most": GOAL_P99_MS, "met": met},
    }
    if not args.skip_drain:
        result["drain"] = await drain_part(server_url, args, args.drain_jobs or backlog, rounds)
    return result


def _summary_row(label: str, s: dict[str, Any]) -> str:
    if not s.get("n"):
        return f"  {label:<22} no samples"
    return (
        f"  {label:<22} p50 {fmt_ms(s['p50']):>7} ms  p99 {fmt_ms(s['p99']):>7} ms"
        f"  max {fmt_ms(s['max']):>7} ms  (n={s['n']})"
    )


def render(result: Result) -> str:
    lat = result["latency"]
    lines = common.header(
        result,
        f"noisy: tenant B's job behind tenant A's {lat['backlog']:,}-job backlog"
        f" (concurrency {result['concurrency']})",
    )
    lines.append(
        f"B enqueue committed -> B handler started, {lat['trials']} trials each"
        f" (A's handler: {lat['handler_ms']:g} ms):"
    )
    lines.append(_summary_row("idle queue (floor)", lat["idle_ms"]))
    lines.append(_summary_row("behind A's backlog", lat["backlog_ms"]))
    a = lat["a_queued_at_trials"]
    lines.append(
        f"  A queued at each trial: {a['min']:,}-{a['max']:,} ({lat['a_refills']} refills),"
        f" A drained at {fmt_rate(lat['a_jobs_per_s_during_trials'])} jobs/s meanwhile"
    )
    t = lat["timeouts"]
    if t["idle"] or t["backlog"]:
        lines.append(
            f"  timed out (> {TRIAL_TIMEOUT:g} s): {t['idle']} idle, {t['backlog']} behind backlog"
        )
    g = result["goal"]
    lines.append(
        f"B p99 behind backlog: {fmt_ms(lat['backlog_ms'].get('p99', float('nan')))} ms"
        f"   goal <= {g['p99_ms_at_most']:g} ms: {common.verdict(g['met'])}"
    )
    if "drain" in result:
        d = result["drain"]
        lines.append(
            f"Drain of {d['jobs']:,} no-op jobs, fair claim vs FIFO claim (same Worker),"
            f" median of {d['rounds']} round(s):"
        )
        for s in d["spreads"]:
            lines.append(
                f"  {s['tenants']:>4} tenant(s): fair {fmt_rate(s['fair_jobs_per_s']):>7} jobs/s,"
                f" FIFO {fmt_rate(s['fifo_jobs_per_s']):>7} jobs/s,"
                f" ratio {s['ratio_fair_over_fifo']:.2f}x"
            )
        dg = d["goal"]
        lines.append(
            f"Worst ratio fair/FIFO: {d['worst_ratio_fair_over_fifo']:.2f}x"
            f"   goal >= {dg['ratio_at_least']:g}x: {common.verdict(dg['met'])}"
        )
    return "\n".join(lines)


BENCH = common.Bench(NAME, __doc__ or NAME, add_arguments, run, render)


def main() -> int:
    return common.main(BENCH)


if __name__ == "__main__":
    raise SystemExit(main())
