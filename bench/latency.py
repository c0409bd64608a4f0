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

Under load (--background-rate R, issue 14).  While the probe runs, a background
producer on a connection of its own pushes R other no-op jobs a second through the
SAME queue: --background-batch jobs (10) per INSERT statement, each statement its own
transaction, spread round-robin over --background-tenants tenants (4), on an absolute
schedule with random (exponential, seeded) gaps, from before the warm-up until the
last probe job has started.
The probe's jobs are told apart by their kind; the background's handler does nothing.
Reported beside the probe's figures: the background's achieved rate (enqueued and
started per second over the probe), and, per probe job, where its time went: commit ->
the start of the claim that returned it (waiting for a wake-up), that claim's own
duration, and claim returned -> handler start; and whether a notification reached the
observer between the probe's send and that claim (its own, or a background one).
PGQueuer runs the same probe under the same background (enqueued with its own
`Queries.enqueue`, the same batches).

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
import contextlib
import importlib.metadata
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import anyio
import asyncpg
import orjson

from tenantry import db
from tenantry.app import JOBS_CHANNEL
from tenantry.jobs.model import Job
from tenantry.jobs.registry import Registry
from tenantry.jobs.worker import Claimed, Worker

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
# The background's jobs: a kind of their own (their handler does nothing), one INSERT
# of $3 rows per transaction, round-robin over the tenants in $1 from offset $2.
BACKGROUND_KIND = "background"
BACKGROUND_INSERT = (
    "INSERT INTO tenantry.jobs (tenant_id, kind)"
    " SELECT ($1::uuid[])[1 + (($2::integer + i) % cardinality($1::uuid[]))], 'background'"
    "   FROM generate_series(0, $3::integer - 1) AS i"
)
GOAL_LOADED_P99_MS = 2.0

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
        "--background-rate",
        type=float,
        default=0.0,
        help="other no-op jobs a second pushed through the same queue while probing"
        " (0: an idle worker; issue 14's load: 1000)",
    )
    parser.add_argument(
        "--background-batch", type=int, default=10, help="background jobs per INSERT (10)"
    )
    parser.add_argument(
        "--background-tenants",
        type=int,
        default=4,
        help="tenants the background jobs are spread over (4)",
    )
    parser.add_argument(
        "--trailing-fetch-ms",
        type=float,
        default=None,
        help="experiment: the worker's first trailing fetch this long after a wake-up"
        " (default: the worker's own, 11 ms)",
    )
    parser.add_argument(
        "--throttle-window-ms",
        type=float,
        default=None,
        help="experiment: the wake-up trigger's throttle window in this benchmark's"
        " database (default: as migrated, 5 ms; 0: a NOTIFY from every commit but"
        " those committing at the same moment)",
    )
    common.add_rearm_arguments(parser, "the worker before issue 14, to compare")
    parser.add_argument(
        "--rearm-on-claim",
        action="store_true",
        help="experiment: before each claim the worker re-arms its queue's wake-up"
        " throttle (RearmingWorker), so that a commit after a claim began notifies",
    )
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
        # Tenantry's 'claim_ran' hook: every claim, (began, returned, rows).
        self.claim_spans: list[tuple[float, float, int]] = []
        # Tenantry's 'rearmed' hook (right after its claim's 'claim_ran'): (at, gate_free).
        self.rearms: list[tuple[float, bool]] = []
        # Tenantry's 'quiet_commits_awaited' hook: (at, done).
        self.quiet_waits: list[tuple[float, bool]] = []
        self.timed: list[int] = []  # the timed samples' keys, in send order
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
    rec.timed = keys[warmup:]
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


class Background:
    """Other jobs through the same queue while the probe runs: `send_batch(n, seq)`
    enqueues n of them in one transaction, batch / rate seconds apart on average, on an
    absolute schedule (a late send is followed at once by the next, so the rate holds).
    The gaps are random (exponential, seeded): on a fixed period the batches lock in
    phase with the probe's own fixed period, and every probe job would land at the same
    moment of the background's cycle, always the best or always the worst one."""

    def __init__(
        self,
        rate: float,
        batch: int,
        send_batch: Callable[[int, int], Awaitable[None]],
        seed: int = 14,
    ) -> None:
        self.rate = rate
        self.batch = batch
        self.send_batch = send_batch
        self.rnd = random.Random(seed)
        self.sent: list[tuple[float, int]] = []  # (after the commit, jobs)
        self.started: list[float] = []  # background handlers' entries

    def handler_started(self) -> None:
        self.started.append(time.perf_counter())

    async def run(self) -> None:
        mean_gap = self.batch / self.rate
        due = time.perf_counter()
        i = 0
        while True:
            due += self.rnd.expovariate(1.0 / mean_gap)
            delay = due - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            await self.send_batch(self.batch, i)
            self.sent.append((time.perf_counter(), self.batch))
            i += 1

    def achieved(self, since: float, until: float) -> Result:
        """Jobs enqueued and started per second within [since, until]."""
        span = max(until - since, 1e-9)
        enqueued = sum(n for at, n in self.sent if since <= at <= until)
        started = sum(1 for at in self.started if since <= at <= until)
        return {
            "offered_per_s": self.rate,
            "batch": self.batch,
            "seconds": round(span, 3),
            "enqueued_per_s": round(enqueued / span, 1),
            "started_per_s": round(started / span, 1),
        }


async def drive_under(
    background: Background | None,
    send: Send,
    rec: Recorder,
    *,
    samples: int,
    warmup: int,
    interval: float,
    settle: float,
) -> Result:
    """`drive`, with the background (if any) running from before the readiness job
    until the last probe job has started; its achieved rate over the timed samples."""
    if background is None:
        return await drive(
            send, rec, samples=samples, warmup=warmup, interval=interval, settle=settle
        )
    cpu = [0.0, 0.0]  # this process's CPU seconds at the first and the last timed send

    async def send_timed(seq: int) -> int:
        if seq == warmup + 1:
            cpu[0] = time.process_time()
        elif seq == warmup + samples:
            cpu[1] = time.process_time()
        return await send(seq)

    async with anyio.create_task_group() as tg:
        tg.start_soon(background.run)
        result = await drive(
            send_timed, rec, samples=samples, warmup=warmup, interval=interval, settle=settle
        )
        tg.cancel_scope.cancel()
    timed = [k for k in rec.timed if k in rec.started]
    if timed:
        since = min(rec.sent[k][0] for k in timed)
        until = max(rec.started[k] for k in timed)
        result["background"] = background.achieved(since, until)
        result["background"]["cost"] = wake_up_cost(rec, since, until, cpu[1] - cpu[0])
    if rec.claim_spans:
        result["where"] = where_the_time_goes(rec, timed)
    return result


def wake_up_cost(rec: Recorder, since: float, until: float, cpu_s: float) -> Result:
    """What the wake-ups cost over [since, until] (the timed samples): insert
    notifications reaching the observer, claims (Tenantry: every claim, empty ones too;
    those a NOTIFY prompted re-arm the throttle; waits for quiet commits), each per
    second; and this process's CPU per second between the first and the last timed send
    (the worker's and, the same on both sides of a comparison, the producers' and the
    probe's)."""
    span = max(until - since, 1e-9)

    def rate(times: Collection[float]) -> float:
        return round(sum(1 for t in times if since <= t <= until) / span, 1)

    result: Result = {
        "notifications_per_s": rate(rec.notified),
        "claims_per_s": rate([began for began, _, _ in rec.claim_spans]),
        "rearming_claims_per_s": rate([at for at, _ in rec.rearms]),
        "gate_held_per_s": rate([at for at, free in rec.rearms if not free]),
        "quiet_waits_per_s": rate([at for at, _ in rec.quiet_waits]),
        "quiet_waits_run_out": sum(1 for at, done in rec.quiet_waits if not done),
        "process_cpu_s_per_s": round(cpu_s / span, 3),
    }
    return result


# The experiment's re-arm: the queue's throttle row back to "never notified", unless a
# producer holds it (that producer is notifying right now: its wake-up follows anyway).
REARM = (
    "UPDATE tenantry.notify_throttle t SET last_at = '-infinity'"
    "  FROM (SELECT key FROM tenantry.notify_throttle"
    "         WHERE key = $1 AND last_at > '-infinity' FOR UPDATE SKIP LOCKED) s"
    " WHERE t.key = s.key"
)


class RearmingWorker(Worker):
    """EXPERIMENT, not the service: a Worker that, before every claim (the service's
    worker does it before a claim a NOTIFY prompted only), re-arms its queue's wake-up
    throttle in a transaction of its own (committed before the claim's snapshot).  A
    producer then stays quiet only while a wake-up it could rely on has not been acted
    on yet: one notification per claim at most, instead of per 5 ms."""

    async def claim(self, queue: str, limit: int, cursor: uuid.UUID | None) -> Claimed | None:
        with contextlib.suppress(Exception):  # the claim below reports the database's state
            async with self.claim_pool.acquire() as conn:
                await conn.execute(REARM, f"{JOBS_CHANNEL}:{queue}")
        return await super().claim(queue, limit, cursor)


async def set_throttle_window(conn: asyncpg.Connection, window_ms: float) -> None:
    """An experiment: the migrated wake-up trigger function with another window, in
    this benchmark's own database only (its text as the server has it, one literal
    replaced; the function refuses to change if that literal is not there)."""
    text = str(
        await conn.fetchval("SELECT pg_get_functiondef('tenantry.wake_at_commit()'::regprocedure)")
    )
    migrated = "interval '5 milliseconds'"
    if migrated not in text:
        raise RuntimeError("wake_at_commit has no 5 ms window to replace")
    await conn.execute(text.replace(migrated, f"interval '{window_ms:g} milliseconds'"))


def where_the_time_goes(rec: Recorder, keys: Sequence[int]) -> Result:
    """Per probe job: the claim that returned it (the last claim with rows to return
    before its handler started), split into commit -> that claim's start (waiting for a
    wake-up), the claim itself, and claim returned -> handler start; and whether any
    notification reached the observer between the job's send and that claim's start."""
    spans = sorted((end, began, n) for began, end, n in rec.claim_spans if n > 0)
    ends = [e for e, _, _ in spans]
    arrivals = sorted(rec.notified)
    wait: list[float] = []
    claim: list[float] = []
    to_start: list[float] = []
    at_once: list[float] = []  # commit -> start of jobs whose claim began within 0.5 ms
    late = {
        "over_2ms": 0,
        "no_notification_before_its_claim": 0,
        # Which claim returned the late job: the one a NOTIFY prompted (it re-arms the
        # throttle), the one after a wait for quiet commits, or another (a trailing
        # fetch, a follow-up claim while rows remain, a poll).
        "by_a_notifys_claim": 0,
        "after_a_quiet_wait": 0,
        "by_another_claim": 0,
    }
    late_jobs: list[list[object]] = []
    rearm_at = sorted(at for at, _ in rec.rearms)
    wait_at = sorted(at for at, _ in rec.quiet_waits)
    for k in keys:
        t0, t1 = rec.sent[k]
        start = rec.started[k]
        j = bisect.bisect_right(ends, start) - 1
        if j < 0:
            continue
        end, began, _n = spans[j]
        wait.append(began - t1)
        claim.append(end - began)
        to_start.append(start - end)
        if began - t1 <= 0.0005:
            at_once.append(start - t1)
        if start - t1 > 0.002:
            late["over_2ms"] += 1
            i = bisect.bisect_left(arrivals, t0)
            if i >= len(arrivals) or arrivals[i] > began:
                late["no_notification_before_its_claim"] += 1
            r = bisect.bisect_left(rearm_at, end)
            q = bisect.bisect_right(wait_at, began) - 1
            prev_end = ends[j - 1] if j > 0 else -1.0
            if r < len(rearm_at) and rearm_at[r] - end < 0.0002:
                kind = "by_a_notifys_claim"
            elif q >= 0 and wait_at[q] >= prev_end:
                kind = "after_a_quiet_wait"
            else:
                kind = "by_another_claim"
            late[kind] += 1
            # Each late job: ms from its commit to its claim's start, the claim's own ms,
            # and whether a claim began between its commit and that one (it missed it).
            missed = any(t1 < b < began for b, _, _ in rec.claim_spans)
            late_jobs.append(
                [round((began - t1) * 1e3, 2), round((end - began) * 1e3, 2), kind, missed]
            )
    return {
        "commit_to_claim_start_ms": common.latency_summary_ms(wait),
        "claim_ms": common.latency_summary_ms(claim),
        "claim_to_start_ms": common.latency_summary_ms(to_start),
        # What the probe would show if every job's own commit woke the claim at once.
        "claimed_at_once_commit_to_start_ms": common.latency_summary_ms(at_once),
        "late": late,
        "late_jobs": late_jobs,
    }


# --- Tenantry -----------------------------------------------------------------------


async def tenantry_probe(
    server_url: str, args: argparse.Namespace, samples: int, *, observed: bool = False
) -> Result:
    """`observed`: as the service runs it, with its metrics (the worker's observer,
    their database reading every 5 s, a scrape every second) beside the probe."""
    rec = Recorder()
    bg_conn: asyncpg.Connection | None = None

    async def handler(job: Job) -> None:
        rec.record(job.id, time.perf_counter())

    def hook(name: str, data: dict[str, Any]) -> None:
        if name == "claimed":
            rec.claims.append(time.perf_counter())
        elif name == "claim_ran":
            now = time.perf_counter()
            rec.claim_spans.append((now - float(data["seconds"]), now, int(data["count"])))
        elif name == "rearmed":
            rec.rearms.append((time.perf_counter(), bool(data.get("gate_free", True))))
        elif name == "quiet_commits_awaited":
            rec.quiet_waits.append((time.perf_counter(), bool(data["done"])))

    registry = Registry()
    registry.add("noop", handler)
    tenant_id = common.tenant(0)
    # The background's tenants: others than the probe's.
    bg_tenants = [common.tenant(1 + i) for i in range(args.background_tenants)]
    async with common.fresh_database(server_url, "latency") as url:
        # min_size = max_size: every connection is open before the first sample.
        pool = await db.create_pool(url, min_size=args.pool_size, max_size=args.pool_size)
        producer = await db.connect(url)
        observer = await db.connect(url)
        if args.throttle_window_ms is not None:
            await set_throttle_window(producer, args.throttle_window_ms)
        background: Background | None = None
        if args.background_rate > 0:
            bg_conn = await db.connect(url)

            async def send_batch(n: int, seq: int) -> None:
                assert bg_conn is not None
                await bg_conn.execute(BACKGROUND_INSERT, bg_tenants, seq * n, n)

            background = Background(args.background_rate, args.background_batch, send_batch)

            async def background_handler(_job: Job) -> None:
                assert background is not None
                background.handler_started()

            registry.add(BACKGROUND_KIND, background_handler)
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
                    worker_cls=(
                        RearmingWorker
                        if args.rearm_on_claim
                        else common.NoRearmWorker
                        if args.no_rearm
                        else Worker
                    ),
                    trailing_fetch=(
                        None if args.trailing_fetch_ms is None else args.trailing_fetch_ms / 1000.0
                    ),
                    rearm_interval=(
                        None if args.rearm_interval_ms is None else args.rearm_interval_ms / 1000.0
                    ),
                ),
            ):
                result = await drive_under(
                    background,
                    send,
                    rec,
                    samples=samples,
                    warmup=args.warmup,
                    interval=args.interval_ms / 1000.0,
                    settle=args.settle,
                )
        finally:
            if bg_conn is not None:
                await bg_conn.close()
            await observer.close()
            await producer.close()
            await pool.close()
    return {
        "concurrency": args.concurrency,
        "pool_size": args.pool_size,
        "poll_interval_s": POLL_INTERVAL,
        "experiment": {
            "trailing_fetch_ms": args.trailing_fetch_ms,
            "throttle_window_ms": args.throttle_window_ms,
            "rearm_on_claim": args.rearm_on_claim or None,
            "no_rearm": args.no_rearm or None,
            "rearm_interval_ms": args.rearm_interval_ms,
        },
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
        bg_conn = await asyncpg.connect(url) if args.background_rate > 0 else None
        background: Background | None = None
        try:
            qm = QueueManager(Queries(AsyncpgDriver(qm_conn)))
            qm.entrypoint("noop", accepts_context=False)(entrypoint)
            queries = Queries(AsyncpgDriver(producer))
            await observe(observer, str(qm.channel), on_notify)
            if bg_conn is not None:
                bg_queries = Queries(AsyncpgDriver(bg_conn))

                async def send_batch(n: int, _seq: int) -> None:
                    # One statement, one transaction, as for Tenantry.
                    await bg_queries.enqueue([BACKGROUND_KIND] * n, [None] * n, [0] * n)

                background = Background(args.background_rate, args.background_batch, send_batch)

                async def background_entrypoint(_job: Any) -> None:
                    assert background is not None
                    background.handler_started()

                qm.entrypoint(BACKGROUND_KIND, accepts_context=False)(background_entrypoint)

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
                    result = await drive_under(
                        background,
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
            if bg_conn is not None:
                await bg_conn.close()
            await observer.close()
            await producer.close()
            await qm_conn.close()
    return result


# --- the benchmark ------------------------------------------------------------------


async def run(server_url: str, args: argparse.Namespace) -> Result:
    samples = common.pick(args.samples, quick=args.quick, quick_value=100, full_value=500)
    loaded = args.background_rate > 0
    load = f", {args.background_rate:g} background jobs/s" if loaded else ""
    progress(f"latency: tenantry, {samples} samples every {args.interval_ms:g} ms{load}")
    t = await tenantry_probe(server_url, args, samples)
    tc = t["commit_to_start_ms"]
    progress(f"latency: tenantry p50 {fmt_ms(tc['p50'])} ms, p99 {fmt_ms(tc['p99'])} ms")
    goal: Result
    if loaded:
        # Issue 14: p99 <= 2 ms while 1,000 other jobs a second flow through the queue.
        goal = {
            "p99_ms_at_most": GOAL_LOADED_P99_MS,
            "background_rate": args.background_rate,
            "met": t["missing"] == 0 and tc["p99"] <= GOAL_LOADED_P99_MS,
        }
    else:
        goal = {
            "p50_ms_at_most": GOAL_P50_MS,
            "p99_ms_at_most": GOAL_P99_MS,
            "met": t["missing"] == 0 and tc["p50"] <= GOAL_P50_MS and tc["p99"] <= GOAL_P99_MS,
        }
    result: Result = {
        "samples": samples,
        "interval_ms": args.interval_ms,
        "warmup": args.warmup,
        "background_rate": args.background_rate,
        "tenantry": t,
        "goal": goal,
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
    if "background" in r:
        b = r["background"]
        lines.append(
            f"  background: {b['offered_per_s']:g} jobs/s offered in batches of {b['batch']};"
            f" achieved over the probe: {b['enqueued_per_s']:,.0f} enqueued/s,"
            f" {b['started_per_s']:,.0f} started/s"
        )
    if "where" in r:
        w = r["where"]
        lines.append("  where a probe job's time went (the claim that returned it):")
        lines.append(_line("commit -> claim", w["commit_to_claim_start_ms"]))
        lines.append(_line("the claim", w["claim_ms"]))
        lines.append(_line("claim -> start", w["claim_to_start_ms"]))
        once = w["claimed_at_once_commit_to_start_ms"]
        lines.append(_line(f"claimed at once ({once.get('n', 0)}), commit -> start", once))
        late = w["late"]
        slow = sum(1 for j in w.get("late_jobs", []) if j[0] <= 2 and j[1] > 2)
        began_late = sum(1 for j in w.get("late_jobs", []) if j[0] > 2)
        lines.append(
            f"  over 2 ms: {late['over_2ms']} (claim began over 2 ms after the commit:"
            f" {began_late}; began in time, took over 2 ms: {slow}; returned by a NOTIFY's"
            f" claim {late['by_a_notifys_claim']}, after a wait for quiet commits"
            f" {late['after_a_quiet_wait']}, another {late['by_another_claim']})"
        )
    cost = r.get("background", {}).get("cost")
    if cost:
        lines.append(
            f"  wake-ups: {cost['notifications_per_s']:g} notifications/s,"
            f" {cost['claims_per_s']:g} claims/s ({cost['rearming_claims_per_s']:g} re-arming,"
            f" the gate held at {cost['gate_held_per_s']:g}/s, {cost['quiet_waits_per_s']:g}"
            f" waits/s), process CPU {cost['process_cpu_s_per_s']:g} s/s"
        )
    return lines


def render(result: Result) -> str:
    rate = float(result.get("background_rate") or 0)
    lines = common.header(
        result,
        "latency: enqueue commit -> handler start, "
        + (f"{rate:g} other jobs/s through the same queue" if rate else "idle worker")
        + f", one job every {result['interval_ms']:g} ms",
    )
    t = result["tenantry"]
    lines.append(
        f"Tenantry Worker (NOTIFY only: poll {t['poll_interval_s']:g} s; concurrency"
        f" {t['concurrency']}, pool {t['pool_size']}), {t['samples']} samples"
        f" after {result['warmup']} warm-up:"
    )
    x = {k: v for k, v in t.get("experiment", {}).items() if v is not None}
    if x:
        lines.append(
            "  EXPERIMENT, not the service as it ships: "
            + ", ".join(f"{k} {v:g}" for k, v in x.items())
        )
    lines += _probe_lines(t)
    g = result["goal"]
    wanted = f"p99 <= {g['p99_ms_at_most']:g} ms"
    if "p50_ms_at_most" in g:
        wanted = f"p50 <= {g['p50_ms_at_most']:g} ms and {wanted}"
    lines.append(f"  goal {wanted} (none missing): {common.verdict(g['met'])}")
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
