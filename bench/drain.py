"""Drain throughput: N pre-enqueued no-op jobs, Tenantry's Worker versus PGQueuer 1.6.

Rounds.  The drain runs --rounds times (3); each round drains with Tenantry and with
PGQueuer back to back, the first of the two alternating from round to round (Tenantry
first in the first round), so that the machine's drift between rounds moves both
figures of a round alike.  Per round: each system's best setting and the ratio of the
two; over the rounds: each system's min / median / max jobs/s, the ratio of every
round, and their median, which is the headline (the goal is judged on it; the
smallest ratio is reported beside it).

Tenantry: the jobs are inserted in one statement (generate_series) over a few tenants;
a Worker (plus the Listener, wired as in `tenantry.app`) drains them with a no-op
handler.  The clock runs from starting the worker until the hook has seen every
outcome flushed to the database.  A couple of queue concurrencies are tried; the best
is reported (all are in the JSON).

PGQueuer: the same number of jobs, enqueued with its own `Queries.enqueue` into a
database of its own on the same server (schema from its own installer), drained by
QueueManagers in `drain` mode with a no-op entrypoint; the clock runs from starting
them until every one has returned (queue empty, its status-log buffer flushed).  A
couple of (connections x batch size) settings are tried, PGQueuer's own benchmark
default (5 x 10) among them; the best is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
import uuid
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import anyio
import asyncpg

from tenantry import db
from tenantry.jobs.model import Job
from tenantry.jobs.registry import Registry
from tenantry.metrics import Metrics

from . import common
from .common import Result, fmt_rate, progress

NAME = "drain"
# Issue 14: >= 4x PGQueuer at a few tenants, >= 3x at 1,000 tenants (PGQueuer has no
# tenants: its figure is the same work at any count, ours walks the tenants).
GOAL_RATIO_FEW_TENANTS = 4.0
GOAL_RATIO_MANY_TENANTS = 3.0
MANY_TENANTS = 1000


def goal_ratio(tenants: int) -> float:
    return GOAL_RATIO_MANY_TENANTS if tenants >= MANY_TENANTS else GOAL_RATIO_FEW_TENANTS


async def _noop(_job: Job) -> None:
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--jobs", type=int, default=None, help="jobs to drain (100000; quick 20000)"
    )
    parser.add_argument("--tenants", type=int, default=4, help="tenants the jobs are spread over")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[200, 400],
        help="Tenantry queue concurrencies to try (best is reported)",
    )
    parser.add_argument("--pool-size", type=int, default=10, help="Tenantry pool size (default 10)")
    parser.add_argument(
        "--pgq-settings",
        nargs="+",
        default=["5x10", "5x50"],
        help="PGQueuer settings to try, as CONNECTIONSxBATCH (best is reported)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds, each Tenantry and PGQueuer back to back in alternating order (3; quick 2)",
    )
    parser.add_argument("--skip-pgqueuer", action="store_true")
    parser.add_argument(
        "--observed-pairs",
        type=int,
        default=0,
        help="after the rounds, this many pairs of drains at the best concurrency, one"
        " plain and one with the service's metrics (hook, database reading, a scrape a"
        " second), in alternating order: what the metrics cost (0: none)",
    )


# --- Tenantry -----------------------------------------------------------------------


async def tenantry_round(
    url: str, jobs: int, tenants: int, concurrency: int, pool_size: int, *, observed: bool = False
) -> Result:
    """One drain.  `observed`: as the service runs it, with its metrics: the worker's
    hook feeding them, their database reading every 5 s, and a scrape every second."""
    pool = await db.create_pool(url, min_size=pool_size, max_size=pool_size)
    try:
        async with pool.acquire() as conn:
            await common.reset_tables(conn)
            await common.bulk_enqueue(conn, jobs, [common.tenant(i) for i in range(tenants)])
            await common.checkpoint(conn)
        registry = Registry()
        registry.add("noop", _noop)
        counter = common.OutcomeCounter()

        started = time.monotonic()
        async with (
            common.metrics_beside(pool, on=observed) as metrics,
            common.running_worker(
                url, pool, registry, concurrency=concurrency, hook=counter, observer=metrics
            ),
        ):
            done = await counter.wait_flushed(jobs, within=max(60.0, jobs / 500))
            elapsed = time.monotonic() - started
        async with pool.acquire() as conn:
            left = await conn.fetchval("SELECT count(*) FROM tenantry.jobs")
            succeeded = await conn.fetchval("SELECT sum(succeeded) FROM tenantry.job_counters")
    finally:
        await pool.close()
    if not done:
        raise RuntimeError(f"tenantry drain timed out: {counter.flushed}/{jobs} flushed")
    return {
        "observed": observed,
        "concurrency": concurrency,
        "jobs": jobs,
        "seconds": round(elapsed, 3),
        "jobs_per_s": round(jobs / elapsed, 1),
        "claims": counter.claims,
        "avg_claim_batch": round(counter.claimed / max(counter.claims, 1), 1),
        "left_in_table": int(left),
        "counted_succeeded": int(succeeded or 0),
    }


# --- PGQueuer -----------------------------------------------------------------------


def _parse_pgq(spec: str) -> tuple[int, int]:
    conns, _, batch = spec.lower().partition("x")
    return int(conns), int(batch)


async def pgqueuer_install(url: str) -> None:
    from pgqueuer.db import AsyncpgDriver  # noqa: PLC0415 - optional bench dependency
    from pgqueuer.queries import Queries  # noqa: PLC0415

    conn = await asyncpg.connect(url)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


async def pgqueuer_enqueue(
    url: str, jobs: int, entrypoint: str = "noop", chunk: int = 10_000
) -> None:
    from pgqueuer.db import AsyncpgDriver  # noqa: PLC0415
    from pgqueuer.queries import Queries  # noqa: PLC0415

    conn = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(conn))
        for offset in range(0, jobs, chunk):
            k = min(chunk, jobs - offset)
            await queries.enqueue([entrypoint] * k, [None] * k, [0] * k)
        await conn.execute("VACUUM ANALYZE pgqueuer")
        await conn.execute("VACUUM ANALYZE pgqueuer_log")
        await common.checkpoint(conn)
    finally:
        await conn.close()


async def _pgq_noop(_job: Any) -> None:
    return None


async def pgqueuer_round(url: str, jobs: int, connections: int, batch_size: int) -> Result:
    from pgqueuer.db import AsyncpgDriver  # noqa: PLC0415
    from pgqueuer.qm import QueueManager  # noqa: PLC0415
    from pgqueuer.queries import Queries  # noqa: PLC0415
    from pgqueuer.types import QueueExecutionMode  # noqa: PLC0415

    admin = await asyncpg.connect(url)
    try:
        await admin.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")
    finally:
        await admin.close()
    await pgqueuer_enqueue(url, jobs)
    conns = [await asyncpg.connect(url) for _ in range(connections)]
    try:
        managers: list[Any] = []
        for conn in conns:
            qm = QueueManager(Queries(AsyncpgDriver(conn)))
            qm.entrypoint("noop")(_pgq_noop)
            managers.append(qm)
        started = time.monotonic()
        with anyio.fail_after(max(120.0, jobs / 200)):
            async with anyio.create_task_group() as tg:
                for qm in managers:
                    tg.start_soon(
                        functools.partial(
                            qm.run, batch_size=batch_size, mode=QueueExecutionMode.drain
                        )
                    )
        elapsed = time.monotonic() - started
        left = await conns[0].fetchval("SELECT count(*) FROM pgqueuer")
        logged = await conns[0].fetchval(
            "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
        )
    finally:
        for conn in conns:
            await conn.close()
    if left:
        raise RuntimeError(f"pgqueuer drain ended with {left} jobs left")
    return {
        "connections": connections,
        "batch_size": batch_size,
        "jobs": jobs,
        "seconds": round(elapsed, 3),
        "jobs_per_s": round(jobs / elapsed, 1),
        "left_in_table": int(left),
        "logged_successful": int(logged),
    }


# --- the benchmark ------------------------------------------------------------------


def _spread(values: list[float], digits: int = 1) -> Result:
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
    }


def _best(rounds: list[Result]) -> Result:
    return max(rounds, key=lambda r: float(r["jobs_per_s"]))


async def _tenantry_settings(url: str, args: argparse.Namespace, jobs: int, rnd: int) -> Result:
    """One round's drains at every concurrency asked for; the round's best."""
    tried: list[Result] = []
    for c in args.concurrency:
        progress(f"drain: round {rnd}, tenantry, {jobs} jobs, concurrency {c}")
        r = await tenantry_round(url, jobs, args.tenants, c, args.pool_size)
        progress(
            f"drain: round {rnd}, tenantry concurrency {c}: {fmt_rate(r['jobs_per_s'])} jobs/s"
        )
        tried.append({"round": rnd, **r})
    return {"best": _best(tried), "tried": tried}


async def _pgqueuer_settings(url: str, args: argparse.Namespace, jobs: int, rnd: int) -> Result:
    tried: list[Result] = []
    for spec in args.pgq_settings:
        connections, batch = _parse_pgq(spec)
        progress(f"drain: round {rnd}, pgqueuer, {jobs} jobs, {connections}x{batch}")
        r = await pgqueuer_round(url, jobs, connections, batch)
        progress(
            f"drain: round {rnd}, pgqueuer {connections}x{batch}:"
            f" {fmt_rate(r['jobs_per_s'])} jobs/s"
        )
        tried.append({"round": rnd, **r})
    return {"best": _best(tried), "tried": tried}


async def run(server_url: str, args: argparse.Namespace) -> Result:
    jobs = common.pick(args.jobs, quick=args.quick, quick_value=20_000, full_value=100_000)
    args.rounds = common.pick(args.rounds, quick=args.quick, quick_value=2, full_value=3)
    t_rounds: list[Result] = []
    p_rounds: list[Result] = []
    async with contextlib.AsyncExitStack() as stack:
        t_url = await stack.enter_async_context(common.fresh_database(server_url, "drain"))
        p_url = ""
        if not args.skip_pgqueuer:
            p_url = await stack.enter_async_context(
                common.fresh_database(server_url, "drain_pgq", schema=False)
            )
            await pgqueuer_install(p_url)
        for i in range(args.rounds):
            # Alternate who goes first: a drift of the machine within a round then
            # favours each system in turn.
            tenantry_first = i % 2 == 0
            if tenantry_first or args.skip_pgqueuer:
                t_rounds.append(await _tenantry_settings(t_url, args, jobs, i + 1))
            if not args.skip_pgqueuer:
                p_rounds.append(await _pgqueuer_settings(p_url, args, jobs, i + 1))
                if not tenantry_first:
                    t_rounds.append(await _tenantry_settings(t_url, args, jobs, i + 1))
            if p_rounds:
                ratio = float(t_rounds[-1]["best"]["jobs_per_s"]) / float(
                    p_rounds[-1]["best"]["jobs_per_s"]
                )
                progress(f"drain: round {i + 1}: ratio {ratio:.2f}x")
    t_best = [r["best"] for r in t_rounds]
    best_t = _best(t_best)
    observed = await _observed_pairs(server_url, args, jobs, int(best_t["concurrency"]))
    result: Result = {
        "jobs": jobs,
        "tenants": args.tenants,
        "pool_size": args.pool_size,
        "rounds": args.rounds,
        "concurrency_tried": list(args.concurrency),
        "tenantry": {
            "best": best_t,
            "per_round": t_best,
            "jobs_per_s": _spread([float(r["jobs_per_s"]) for r in t_best]),
            "tried": [r for rnd in t_rounds for r in rnd["tried"]],
        },
    }
    if observed:
        result["observed"] = observed
    if args.skip_pgqueuer:
        return result
    p_best = [r["best"] for r in p_rounds]
    ratios = [
        float(t["jobs_per_s"]) / float(p["jobs_per_s"]) for t, p in zip(t_best, p_best, strict=True)
    ]
    median_ratio = statistics.median(ratios)
    goal = goal_ratio(args.tenants)
    result["pgqueuer"] = {
        "version": version("pgqueuer"),
        "settings_tried": list(args.pgq_settings),
        "best": _best(p_best),
        "per_round": p_best,
        "jobs_per_s": _spread([float(r["jobs_per_s"]) for r in p_best]),
        "tried": [r for rnd in p_rounds for r in rnd["tried"]],
    }
    result["ratios"] = [round(x, 3) for x in ratios]
    result["ratio_spread"] = _spread(ratios, 3)
    # The headline: the median of the per-round ratios (each round's two drains ran
    # back to back), not best against best.
    result["ratio_tenantry_over_pgqueuer"] = round(median_ratio, 2)
    result["goal"] = {
        "ratio_at_least": goal,
        "judged_on": "median ratio over the rounds",
        "met": median_ratio >= goal,
        "met_in_every_round": min(ratios) >= goal,
    }
    return result


async def _observed_pairs(
    server_url: str, args: argparse.Namespace, jobs: int, concurrency: int
) -> Result | None:
    if not args.observed_pairs:
        return None
    rates: dict[bool, list[float]] = {False: [], True: []}
    async with common.fresh_database(server_url, "drain_observed") as url:
        for i in range(args.observed_pairs):
            for observed in (False, True) if i % 2 == 0 else (True, False):
                r = await tenantry_round(
                    url, jobs, args.tenants, concurrency, args.pool_size, observed=observed
                )
                progress(
                    f"drain: {'with' if observed else 'without'} metrics:"
                    f" {fmt_rate(r['jobs_per_s'])} jobs/s"
                )
                rates[observed].append(float(r["jobs_per_s"]))
    plain, seen = statistics.median(rates[False]), statistics.median(rates[True])
    # Each pair's two drains ran back to back: their ratio is free of the machine's
    # drift between pairs (seen here: plain drains from 19,300 to 25,800 jobs/s in one
    # run), which the ratio of the two medians is not.
    pairs = [o / p for p, o in zip(rates[False], rates[True], strict=True)]
    paired = statistics.median(pairs)
    per_job_us = _observer_cost_us()
    return {
        "concurrency": concurrency,
        "plain_jobs_per_s": rates[False],
        "observed_jobs_per_s": rates[True],
        "median_ratio": round(seen / plain, 3),
        "pair_ratios": [round(x, 3) for x in pairs],
        "median_pair_ratio": round(paired, 3),
        # The metrics' own work per job (the observer's three calls), measured alone,
        # and what share of a job's time in the plain drain that is.
        "observer_us_per_job": round(per_job_us, 3),
        "observer_share_of_a_job": round(per_job_us * 1e-6 * plain, 4),
        "goal": {"within": 0.05, "met": paired >= 0.95},
    }


def _observer_cost_us(n: int = 200_000) -> float:
    """Microseconds the metrics spend per job (its outcome, run time and a first
    attempt's wait), over 10 kinds in one queue."""
    metrics = Metrics()
    now = datetime.now(UTC)
    jobs = [
        Job(
            id=i,
            tenant_id=uuid.UUID(int=i % 4),
            queue="default",
            kind=f"k{i % 10}",
            payload={},
            attempt=1,
            max_attempts=25,
            priority=0,
            created_at=now,
            _pool=None,  # type: ignore[arg-type]
            _lease_owner="bench",
        )
        for i in range(1000)
    ]
    began = time.perf_counter()
    for i in range(n):
        job = jobs[i % 1000]
        metrics.job_finished(job, None, 0.0004, 0.002)
    return (time.perf_counter() - began) / n * 1e6


def _spread_text(s: Result) -> str:
    return f"min {fmt_rate(s['min'])} / median {fmt_rate(s['median'])} / max {fmt_rate(s['max'])}"


def render(result: Result) -> str:
    lines = common.header(
        result,
        f"drain: {result['jobs']:,} pre-enqueued no-op jobs over {result['tenants']:,} tenants,"
        f" {result['rounds']} round(s)",
    )
    t = result["tenantry"]
    p = result.get("pgqueuer")
    tried = ", ".join(str(c) for c in result["concurrency_tried"])
    lines.append(
        f"Tenantry Worker (pool {result['pool_size']}, concurrency {tried}): start -> all"
        " outcomes flushed."
    )
    if p:
        lines.append(
            f"PGQueuer {p['version']} QueueManagers in drain mode"
            f" ({', '.join(p['settings_tried'])}): start -> all returned."
        )
    lines.append("Per round, each system's best setting:")
    for i, tb in enumerate(t["per_round"]):
        line = (
            f"  round {i + 1}: Tenantry {fmt_rate(tb['jobs_per_s']):>8} jobs/s"
            f" (concurrency {tb['concurrency']}, {tb['claims']} claims of"
            f" {tb['avg_claim_batch']} rows avg)"
        )
        if p:
            pb = p["per_round"][i]
            first = "Tenantry" if i % 2 == 0 else "PGQueuer"
            line += (
                f"  PGQueuer {fmt_rate(pb['jobs_per_s']):>8} jobs/s"
                f" ({pb['connections']}x{pb['batch_size']})"
                f"  ratio {result['ratios'][i]:.2f}x  ({first} first)"
            )
        lines.append(line)
    lines.append(f"Tenantry jobs/s over the rounds: {_spread_text(t['jobs_per_s'])}")
    if p:
        lines.append(f"PGQueuer jobs/s over the rounds: {_spread_text(p['jobs_per_s'])}")
        g = result["goal"]
        rs = result["ratio_spread"]
        lines.append(
            "Ratio tenantry/pgqueuer, median of the rounds:"
            f" {result['ratio_tenantry_over_pgqueuer']:.2f}x"
            f" (rounds {rs['min']:.2f}x-{rs['max']:.2f}x)"
            f"   goal >= {g['ratio_at_least']:g}x: {common.verdict(g['met'])}"
            + ("" if g["met_in_every_round"] else " (not in every round)" if g["met"] else "")
        )
    if "observed" in result:
        o = result["observed"]
        lines.append(
            f"With the service's metrics (hook, database reading every 5 s, a scrape a"
            f" second), concurrency {o['concurrency']}: median"
            f" {fmt_rate(statistics.median(o['observed_jobs_per_s']))} against"
            f" {fmt_rate(statistics.median(o['plain_jobs_per_s']))} jobs/s without"
            f" ({o['median_ratio']:.3f}x); pair by pair (each pair back to back) median"
            f" {o['median_pair_ratio']:.3f}x {o['pair_ratios']}; goal within 5%:"
            f" {common.verdict(o['goal']['met'])}.  The metrics' own work:"
            f" {o['observer_us_per_job']:.2f} us per job, {o['observer_share_of_a_job']:.1%}"
            " of a job's time in the plain drain"
        )
    return "\n".join(lines)


BENCH = common.Bench(NAME, __doc__ or NAME, add_arguments, run, render)


def main() -> int:
    return common.main(BENCH)


if __name__ == "__main__":
    raise SystemExit(main())
