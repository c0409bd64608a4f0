"""What the metrics cost with a large backlog: --jobs queued jobs (1,000,000) over
--tenants tenants (1,000) in one queue, plus a tenth as many scheduled.

(a) the database reading behind the gauges (tenantry/metrics.py `DatabaseGauges`, on the
    worker's login: the queue's depth counted up to the cap, the backlog's age walked
    over the claim index's group heads, the webhooks' counts): --reads readings, their
    p50 and p99.  The service makes one reading per TENANTRY_METRICS_INTERVAL (5 s), in
    the background, whatever the scrapes.
(b) a scrape: `GET /metrics` rendered from that reading (what Prometheus waits for).
(c) for comparison, the exact count `tenantry jobs stats` makes (tenantry.queue_stats:
    every row counted), the kind of query that timed out for River's users at 5 million.

Goal (issue 12): a scrape <= 50 ms with 1,000,000 queued jobs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import asyncpg

from tenantry import db, roles
from tenantry.metrics import DatabaseGauges, Metrics

from . import common
from .common import Result, fmt_ms, progress

NAME = "metrics"
GOAL_SCRAPE_MS = 50.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=None, help="queued jobs (1000000)")
    parser.add_argument("--tenants", type=int, default=1000, help="tenants (1000)")
    parser.add_argument("--reads", type=int, default=20, help="readings and scrapes (20)")


async def run(server_url: str, args: argparse.Namespace) -> Result:
    n = common.pick(args.jobs, quick=args.quick, quick_value=100_000, full_value=1_000_000)
    tenants = [common.tenant(i) for i in range(args.tenants)]
    async with common.fresh_database(server_url, NAME) as url:
        admin = await db.connect(url)
        try:
            await roles.ensure_login(
                admin, roles.Login(roles.DEFAULT_LOGIN + "_worker", None), roles.WORKER_ROLES
            )
            progress(f"metrics: loading {n:,} queued jobs over {len(tenants):,} tenants")
            await common.bulk_enqueue(admin, n, tenants)
            await admin.execute(
                "INSERT INTO tenantry.jobs (tenant_id, kind, run_at)"
                " SELECT ($1::uuid[])[1 + (i % $2::integer)], 'later', now() + interval '1 day'"
                "   FROM generate_series(0, $3::integer - 1) AS i",
                tenants,
                len(tenants),
                n // 10,
            )
            await admin.execute("VACUUM ANALYZE tenantry.jobs")
            await common.checkpoint(admin)
        finally:
            await admin.close()
        worker_url = roles.with_login(url, roles.DEFAULT_LOGIN + "_worker")
        pool = await asyncpg.create_pool(worker_url, min_size=1, max_size=2)
        try:
            gauges = DatabaseGauges(pool, ["default"])
            metrics = Metrics()
            metrics.watch(gauges.collect)
            readings, scrapes = [], []
            for _ in range(args.reads):
                t0 = time.perf_counter()
                await gauges.read_once()
                readings.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                text = metrics.render()
                scrapes.append(time.perf_counter() - t0)
            exact = []
            for _ in range(3):
                t0 = time.perf_counter()
                await pool.fetch("SELECT * FROM tenantry.queue_stats()")
                exact.append(time.perf_counter() - t0)
        finally:
            await pool.close()
    assert gauges.reading is not None
    depth = {q["queue"]: (q["queued"], q["scheduled"], q["heads"]) for q in gauges.reading.queues}
    reading = common.latency_summary_ms(readings)
    scrape = common.latency_summary_ms(scrapes)
    return {
        "jobs": n,
        "tenants": len(tenants),
        "reported": {"queued": depth["default"][0], "scheduled": depth["default"][1],
                     "heads_walked": depth["default"][2], "cap": gauges.cap},
        "reading_ms": reading,
        "scrape_ms": scrape,
        "scrape_bytes": len(text),
        "exact_count_ms": common.latency_summary_ms(exact),
        "goal": {"scrape_ms_at_most": GOAL_SCRAPE_MS, "met": scrape["p99"] <= GOAL_SCRAPE_MS},
    }  # fmt: skip


def render(r: Result) -> str:
    rep = r["reported"]
    return "\n".join(
        [
            f"metrics: {r['jobs']:,} queued jobs over {r['tenants']:,} tenants (reported"
            f" {rep['queued']:,} queued, cap {rep['cap']:,}; {rep['scheduled']:,} scheduled;"
            f" backlog age from {rep['heads_walked']:,} group heads)",
            f"(a) database reading: p50 {fmt_ms(r['reading_ms']['p50'])} ms,"
            f" p99 {fmt_ms(r['reading_ms']['p99'])} ms (one per 5 s per process)",
            f"(b) scrape: p50 {fmt_ms(r['scrape_ms']['p50'])} ms,"
            f" p99 {fmt_ms(r['scrape_ms']['p99'])} ms ({r['scrape_bytes']:,} bytes);"
            f" goal <= {r['goal']['scrape_ms_at_most']:g} ms: {common.verdict(r['goal']['met'])}",
            f"(c) the exact count of `jobs stats`: p50 {fmt_ms(r['exact_count_ms']['p50'])} ms",
        ]
    )


BENCH = common.Bench(NAME, __doc__ or NAME, add_arguments, run, render)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(BENCH, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
