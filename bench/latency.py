"""Wake-up latency with an idle worker: enqueue commit -> handler start, Tenantry's Worker
versus PGQueuer 1.6.

Method.  A producer on a connection of its own enqueues one job every --interval-ms
(20 ms), in autocommit, so the statement's return is its commit.  t0 is taken just
before sending the statement, t1 just after it returns; the handler takes its own
timestamp first thing.  Reported per job:

  commit -> start   handler entry - t1: the headline figure.  The reply leaves the server
                    right after the commit, so this is the commit-to-start time minus the
                    reply's trip back (a fraction of the round trip below).  It can even be
                    negative: the worker may run the job before the producer's coroutine
                    resumes; such samples are counted as "early".
  send -> start     handler entry - t0, for transparency: includes the enqueue round trip.
  enqueue RTT       t1 - t0.

Producer, worker and handler all run in this one process on one event loop (anyio on
asyncio with uvloop, as `tenantry run` does), so every timestamp comes from one clock
(time.perf_counter).  The flip side: they share that loop and one core's worth of CPU;
the producer is idle while a job is in flight, so this costs little.

The NOTIFY path only.  The Worker polls at 30 s (x0.5..1.5 jitter, so not before 15 s:
longer than a probe), so every job in the figures was found because its insert's NOTIFY
woke the worker through the Listener, wired as in `tenantry.app` (common.running_worker).
That path includes the worker's trailing fetch (one more claim 20 ms after a wake-up),
which with a 20 ms enqueue interval lands close to the next commit: it may claim a job
just before that job's own NOTIFY arrives, or delay the claim that NOTIFY triggers.

A third connection LISTENs on the same channel as an observer: the first notification
from the insert that arrives after a job's t0 splits the time into commit -> NOTIFY
arrival and NOTIFY -> start (for Tenantry also NOTIFY -> claim returned and claim ->
start, from the Worker's 'claimed' hook).

Warm-up: one job sent alone and awaited (everything is connected and listening
afterwards), then --warmup jobs on the same schedule as the timed ones, discarded.
A job that has not started --settle seconds after the last send is "missing" and fails
the goal (only a poll would find it: a lost wake-up).

PGQueuer: the same probe into a database of its own on the same server (schema from its
installer), one QueueManager with its defaults: continuous mode, batch_size 10,
dequeue_timeout 30 s (its poll, so it too is woken by NOTIFY only), no concurrency cap,
one connection (AsyncpgDriver) for both LISTEN and its queries; jobs enqueued with its
own `Queries.enqueue`, a sequence number in the payload bytes identifies each.  Its
trigger notifies on every insert, update and delete; the observer only counts inserts.
"""

from __future__ import annotations

import argparse
import bisect
import importlib.metadata
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import anyio
import asyncpg
import orjson

from tenantry import db
from tenantry.app import JOBS_CHANNEL
from tenantry.jobs.model import Job
from tenantry.jobs.registry import Registry

from . import common
from .common import Result, fmt_ms, progress

NAME = "latency"
GOAL_P50_MS = 2.0
GOAL_P99_MS = 10.0
# The worker's poll interval: far longer than a probe, so NOTIFY is the only wake-up.
POLL_INTERVAL = 30.0
# How long the first (readiness) job may take: the worker's first sweep or wake-up.
READY_TIMEOUT = 15.0

ENQUEUE = "SELECT tenantry.enqueue($1::uuid, 'noop')"

Send = Callable[[int], Awaitable[int]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--samples", type=int, default=None, help="timed samples per queue (500; quick 100)"
    )
    parser.add_argument(
        "--interval-ms", type=float, default=20.0, help="one enqueue every this many ms (20)"
    )
    parser.add_argument(
        "--warmup", type=int, default=10, help="jobs sent on schedule first, discarded (10)"
    )
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds the last jobs may take to start (5)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=10, help="Tenantry queue concurrency (default 10)"
    )
    parser.add_argument("--pool-size", type=int, default=10, help="Tenantry pool size (default 10)")
    parser.add_argument("--skip-pgqueuer", action="store_true")
    parser.add_argument(
        "--observed",
        action="store_true",
        help="probe again with the service's metrics beside it (observer, database reading"
        " every 5 s, a scrape a second) and report both",
    )
    parser.add_argument(
        "--observed-rounds",
        type=int,
        default=3,
        help="with --observed: rounds of one plain and one observed probe, in alternating"
        " order, their samples pooled per side (3)",
    )


# --- the probe, shared by both queues -----------------------------------------------


class Recorder:
    """One probe's timestamps (time.perf_counter seconds), keyed by whatever identifies
    a job to its handler (Tenantry: the job id; PGQueuer: the payload's number)."""

    def __init__(self) -> None:
        self.sent: dict[int, tuple[float, float]] = {}  # key -> (before send, after return)
        self.started: dict[int, float] = {}  # key -> handler entry
        self.notified: list[float] = []  # insert notifications arriving at the observer
        self.claims: list[float] = []  # Tenantry's 'claimed' hook (a claim returned rows)
        self._changed = anyio.Event()

    def record(self, key: int, at: float) -> None:
        # The handler passes its entry time in: nothing it does first can count.
        self.started.setdefault(key, at)
        self._changed.set()

    async def wait_started(self, keys: Collection[int], within: float) -> bool:
        with anyio.move_on_after(within):
            while not all(k in self.started for k in keys):
                # No await between the check and the new event: no wake-up is lost.
                self._changed = anyio.Event()
                await self._changed.wait()
        return all(k in self.started for k in keys)


async def drive(
    send: Send, rec: Recorder, *, samples: int, warmup: int, interval: float, settle: float
) -> Result:
    """Readiness job, then warm-up + samples on a fixed schedule, then the figures."""
    first = await send(0)
    if not await rec.wait_started([first], READY_TIMEOUT):
        raise RuntimeError(f"the first job did not start within {READY_TIMEOUT:g} s")
    keys: list[int] = []
    # An absolute schedule: a slow send delays one job, not all the following ones.
    base = time.perf_counter() + interval
    for i in range(warmup + samples):
        delay = base + i * interval - time.perf_counter()
        if delay > 0:
            await anyio.sleep(delay)
        t0 = time.perf_counter()
        key = await send(i + 1)
        t1 = time.perf_counter()
        rec.sent[key] = (t0, t1)
        keys.append(key)
    await rec.wait_started(keys, settle)
    return figures(rec, keys[warmup:], interval)


def figures(rec: Recorder, keys: Sequence[int], interval: float) -> Result:
    started = [k for k in keys if k in rec.started]
    commit = [rec.started[k] - rec.sent[k][1] for k in started]
    arrivals = sorted(rec.notified)
    claims = sorted(rec.claims)
    to_notify: list[float] = []
    notify_to_start: list[float] = []
    notify_to_claim: list[float] = []
    claim_to_start: list[float] = []
    for k in started:
        t0, t1 = rec.sent[k]
        start = rec.started[k]
        # This job's notification: the first to arrive after it was sent and before the
        # next job was (one per insert at this spacing).
        i = bisect.bisect_left(arrivals, t0)
        if i < len(arrivals) and arrivals[i] < t0 + interval:
            to_notify.append(arrivals[i] - t1)
            notify_to_start.append(start - arrivals[i])
            # The claim that returned this job: the last one to return before it started.
            j = bisect.bisect_right(claims, start) - 1
            if j >= 0 and claims[j] >= arrivals[i]:
                notify_to_claim.append(claims[j] - arrivals[i])
                claim_to_start.append(start - claims[j])
    result: Result = {
        "samples": len(keys),
        "missing": len(keys) - len(started),
        "early": sum(1 for x in commit if x < 0),
        "commit_to_start_ms": common.latency_summary_ms(commit),
        # Raw, for pooling rounds (popped before the result is printed).
        "commit_to_start_s": commit,
        "send_to_start_ms": common.latency_summary_ms(
            [rec.started[k] - rec.sent[k][0] for k in started]
        ),
        "enqueue_rtt_ms": common.latency_summary_ms(
            [rec.sent[k][1] - rec.sent[k][0] for k in keys]
        ),
        "split": {
            "commit_to_notify_ms": common.latency_summary_ms(to_notify),
            "notify_to_start_ms": common.latency_summary_ms(notify_to_start),
        },
    }
    if claims:
        result["split"]["notify_to_claim_ms"] = common.latency_summary_ms(notify_to_claim)
        result["split"]["claim_to_start_ms"] = common.latency_summary_ms(claim_to_start)
    return result


async def observe(conn: asyncpg.Connection, channel: str, on_notify: Callable[[str], None]) -> None:
    def callback(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        on_notify(str(payload))

    await conn.add_listener(channel, callback)


# --- Tenantry -----------------------------------------------------------------------


async def tenantry_probe(
    server_url: str, args: argparse.Namespace, samples: int, *, observed: bool = False
) -> Result:
    """`observed`: as the service runs it, with its metrics (the worker's observer,
    their database reading every 5 s, a scrape every second) beside the probe."""
    rec = Recorder()

    async def handler(job: Job) -> None:
        rec.record(job.id, time.perf_counter())

    def hook(name: str, _data: dict[str, Any]) -> None:
        if name == "claimed":
            rec.claims.append(time.perf_counter())

    registry = Registry()
    registry.add("noop", handler)
    tenant_id = common.tenant(0)
    async with common.fresh_database(server_url, "latency") as url:
        # min_size = max_size: every connection is open before the first sample.
        pool = await db.create_pool(url, min_size=args.pool_size, max_size=args.pool_size)
        producer = await db.connect(url)
        observer = await db.connect(url)
        try:
            await observe(
                observer, JOBS_CHANNEL, lambda _payload: rec.notified.append(time.perf_counter())
            )

            async def send(_seq: int) -> int:
                return int(await producer.fetchval(ENQUEUE, tenant_id))

            async with (
                common.metrics_beside(pool, on=observed) as metrics,
                common.running_worker(
                    url,
                    pool,
                    registry,
                    concurrency=args.concurrency,
                    poll_interval=POLL_INTERVAL,
                    hook=hook,
                    observer=metrics,
                ),
            ):
                result = await drive(
                    send,
                    rec,
                    samples=samples,
                    warmup=args.warmup,
                    interval=args.interval_ms / 1000.0,
                    settle=args.settle,
                )
        finally:
            await observer.close()
            await producer.close()
            await pool.close()
    return {
        "concurrency": args.concurrency,
        "pool_size": args.pool_size,
        "poll_interval_s": POLL_INTERVAL,
        **result,
    }


# --- PGQueuer -----------------------------------------------------------------------


async def pgqueuer_probe(server_url: str, args: argparse.Namespace, samples: int) -> Result:
    from pgqueuer.db import AsyncpgDriver  # noqa: PLC0415 - optional bench dependency
    from pgqueuer.qm import QueueManager  # noqa: PLC0415
    from pgqueuer.queries import Queries  # noqa: PLC0415

    from .drain import pgqueuer_install  # noqa: PLC0415 - PGQueuer's installer, as drain uses it

    rec = Recorder()

    async def entrypoint(job: Any) -> None:
        at = time.perf_counter()
        rec.record(int(job.payload), at)

    def on_notify(payload: str) -> None:
        at = time.perf_counter()
        # Its trigger also fires on the worker's own updates and deletes: inserts only.
        if orjson.loads(payload).get("operation") == "insert":
            rec.notified.append(at)

    async with common.fresh_database(server_url, "latency_pgq", schema=False) as url:
        await pgqueuer_install(url)
        qm_conn = await asyncpg.connect(url)
        producer = await asyncpg.connect(url)
        observer = await asyncpg.connect(url)
        try:
            qm = QueueManager(Queries(AsyncpgDriver(qm_conn)))
            qm.entrypoint("noop", accepts_context=False)(entrypoint)
            queries = Queries(AsyncpgDriver(producer))
            await observe(observer, str(qm.channel), on_notify)

            async def send(seq: int) -> int:
                await queries.enqueue("noop", str(seq).encode())
                return seq

            stopped = anyio.Event()

            async def run_qm() -> None:
                try:
                    await qm.run()  # its defaults (see the module docstring)
                finally:
                    stopped.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_qm)
                try:
                    result = await drive(
                        send,
                        rec,
                        samples=samples,
                        warmup=args.warmup,
                        interval=args.interval_ms / 1000.0,
                        settle=args.settle,
                    )
                finally:
                    # PGQueuer 1.6's way to stop: its loop returns once `shutdown` is set
                    # (flushing its status-log buffer); cancel it if it does not.
                    qm.shutdown.set()
                    with anyio.move_on_after(10, shield=True):
                        await stopped.wait()
                    tg.cancel_scope.cancel()
        finally:
            await observer.close()
            await producer.close()
            await qm_conn.close()
    return result


# --- the benchmark ------------------------------------------------------------------


async def run(server_url: str, args: argparse.Namespace) -> Result:
    samples = common.pick(args.samples, quick=args.quick, quick_value=100, full_value=500)
    progress(f"latency: tenantry, {samples} samples every {args.interval_ms:g} ms")
    t = await tenantry_probe(server_url, args, samples)
    tc = t["commit_to_start_ms"]
    progress(f"latency: tenantry p50 {fmt_ms(tc['p50'])} ms, p99 {fmt_ms(tc['p99'])} ms")
    met = t["missing"] == 0 and tc["p50"] <= GOAL_P50_MS and tc["p99"] <= GOAL_P99_MS
    result: Result = {
        "samples": samples,
        "interval_ms": args.interval_ms,
        "warmup": args.warmup,
        "tenantry": t,
        "goal": {"p50_ms_at_most": GOAL_P50_MS, "p99_ms_at_most": GOAL_P99_MS, "met": met},
    }
    t.pop("commit_to_start_s")
    if args.observed:
        result["observed"] = await observed_rounds(server_url, args, samples)
    if args.skip_pgqueuer:
        return result
    # Its installed version (`pgqueuer.__version__` is not re-exported for mypy).
    pgq_version = importlib.metadata.version("pgqueuer")
    progress(f"latency: pgqueuer {pgq_version}, {samples} samples")
    p = await pgqueuer_probe(server_url, args, samples)
    pc = p["commit_to_start_ms"]
    p.pop("commit_to_start_s")
    progress(f"latency: pgqueuer p50 {fmt_ms(pc['p50'])} ms, p99 {fmt_ms(pc['p99'])} ms")
    result["pgqueuer"] = {
        "version": pgq_version,
        "settings": {
            "mode": "continuous",
            "batch_size": 10,
            "dequeue_timeout_s": 30,
            "max_concurrent_tasks": None,
            "connections": 1,
        },
        **p,
    }
    result["p99_ratio_pgqueuer_over_tenantry"] = round(pc["p99"] / max(tc["p99"], 1e-3), 2)
    return result


async def observed_rounds(server_url: str, args: argparse.Namespace, samples: int) -> Result:
    """The probe with and without the service's metrics beside it, in rounds of one
    each, alternating which goes first, samples pooled per side.  The plain probe's own
    p99 moves about 2x between runs on this shared machine, so one pair of probes cannot
    show a 5% effect; pooled, alternating rounds cancel the machine's drift."""
    pooled: dict[bool, list[float]] = {False: [], True: []}
    rounds: list[Result] = []
    missing = 0
    for i in range(max(1, args.observed_rounds)):
        order = (False, True) if i % 2 == 0 else (True, False)
        this: dict[bool, dict[str, float]] = {}
        for observed in order:
            r = await tenantry_probe(server_url, args, samples, observed=observed)
            pooled[observed] += r.pop("commit_to_start_s")
            missing += r["missing"]
            this[observed] = r["commit_to_start_ms"]
        progress(
            f"latency: round {i + 1}: p99 plain {fmt_ms(this[False]['p99'])} ms, with"
            f" metrics {fmt_ms(this[True]['p99'])} ms"
        )
        rounds.append(
            {
                "first": "observed" if order[0] else "plain",
                "plain_ms": this[False],
                "observed_ms": this[True],
                "p99_ratio": round(this[True]["p99"] / max(this[False]["p99"], 1e-3), 3),
                "p50_ratio": round(this[True]["p50"] / max(this[False]["p50"], 1e-3), 3),
            }
        )
    plain = common.latency_summary_ms(pooled[False])
    with_metrics = common.latency_summary_ms(pooled[True])
    return {
        "rounds": rounds,
        "missing": missing,
        "pooled_plain_ms": plain,
        "pooled_observed_ms": with_metrics,
        "p99_ratio_observed_over_plain": round(with_metrics["p99"] / max(plain["p99"], 1e-3), 3),
        "p50_ratio_observed_over_plain": round(with_metrics["p50"] / max(plain["p50"], 1e-3), 3),
    }


def _line(label: str, s: dict[str, float]) -> str:
    if not s.get("n"):
        return f"  {label:<18} no samples"
    return (
        f"  {label:<18} p50 {fmt_ms(s['p50']):>6}  p90 {fmt_ms(s['p90']):>6}"
        f"  p99 {fmt_ms(s['p99']):>6}  max {fmt_ms(s['max']):>7} ms"
    )


def _probe_lines(r: Result) -> list[str]:
    lines = [
        _line("commit -> start", r["commit_to_start_ms"]),
        _line("send -> start", r["send_to_start_ms"]),
        _line("enqueue RTT", r["enqueue_rtt_ms"]),
    ]
    split = r["split"]
    parts = [f"commit -> NOTIFY {fmt_ms(split['commit_to_notify_ms'].get('p50', 0.0))}"]
    if "notify_to_claim_ms" in split:
        parts.append(
            f"NOTIFY -> claim returned {fmt_ms(split['notify_to_claim_ms'].get('p50', 0))}"
        )
        parts.append(f"claim -> start {fmt_ms(split['claim_to_start_ms'].get('p50', 0.0))}")
    else:
        parts.append(f"NOTIFY -> start {fmt_ms(split['notify_to_start_ms'].get('p50', 0.0))}")
    lines.append(
        f"  split (p50, n={split['commit_to_notify_ms'].get('n', 0)}): " + ", ".join(parts) + " ms"
    )
    lines.append(f"  missing {r['missing']}, early (started before the reply) {r['early']}")
    return lines


def render(result: Result) -> str:
    lines = common.header(
        result,
        f"latency: enqueue commit -> handler start, idle worker,"
        f" one job every {result['interval_ms']:g} ms",
    )
    t = result["tenantry"]
    lines.append(
        f"Tenantry Worker (NOTIFY only: poll {t['poll_interval_s']:g} s; concurrency"
        f" {t['concurrency']}, pool {t['pool_size']}), {t['samples']} samples"
        f" after {result['warmup']} warm-up:"
    )
    lines += _probe_lines(t)
    g = result["goal"]
    lines.append(
        f"  goal p50 <= {g['p50_ms_at_most']:g} ms and p99 <= {g['p99_ms_at_most']:g} ms"
        f" (none missing): {common.verdict(g['met'])}"
    )
    if "observed" in result:
        o = result["observed"]
        lines.append(
            f"With the service's metrics beside it (observer, database reading every 5 s, a"
            f" scrape a second), {len(o['rounds'])} rounds of a plain and an observed probe,"
            " alternating which goes first:"
        )
        for i, r in enumerate(o["rounds"], 1):
            lines.append(
                f"  round {i} ({r['first']} first): p99 {fmt_ms(r['plain_ms']['p99'])} ->"
                f" {fmt_ms(r['observed_ms']['p99'])} ms ({r['p99_ratio']:.3f}x), p50"
                f" {r['p50_ratio']:.3f}x"
            )
        lines.append(_line("pooled, plain", o["pooled_plain_ms"]))
        lines.append(_line("pooled, metrics", o["pooled_observed_ms"]))
        lines.append(
            f"  pooled: p50 {o['p50_ratio_observed_over_plain']:.3f}x, p99"
            f" {o['p99_ratio_observed_over_plain']:.3f}x of the plain probe's; missing"
            f" {o['missing']}"
        )
    if "pgqueuer" in result:
        p = result["pgqueuer"]
        s = p["settings"]
        lines.append(
            f"PGQueuer {p['version']} QueueManager (defaults: {s['mode']}, batch"
            f" {s['batch_size']}, dequeue_timeout {s['dequeue_timeout_s']} s, one connection),"
            f" {p['samples']} samples:"
        )
        lines += _probe_lines(p)
        lines.append(
            "p99 commit -> start, PGQueuer / Tenantry:"
            f" {result['p99_ratio_pgqueuer_over_tenantry']:.2f}x"
        )
    return "\n".join(lines)


BENCH = common.Bench(NAME, __doc__ or NAME, add_arguments, run, render)


def main() -> int:
    return common.main(BENCH)


if __name__ == "__main__":
    raise SystemExit(main())
