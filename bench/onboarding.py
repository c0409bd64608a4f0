"""POST /v1/onboardings under a fixed open-loop rate, and accept -> completed, against
one real `tenantry run` process with the whole pipeline running.

The service.  `python -m tenantry run` in a process of its own, set up as a deployment
would be (the same environment as tests/acceptance/process.py): DATABASE_URL the
service's login, TENANTRY_ADMIN_URL the superuser (it migrates and creates the logins),
a temporary data folder (mail goes to files, tenant storage to folders), the sign-up rate
limit raised out of the way (TENANTRY_SIGNUP_RATE / _BURST 1,000,000), log level warning,
provisioning concurrency --provision-concurrency (4: TENANTRY_QUEUES=default=4; at 20
the provisioning jobs took both cores of a 2-core box from the accepts) and a pool of
--pool-size connections (concurrency + 10: running jobs hold one each and leave the rest
to the HTTP handlers).  Its port is picked here (free at the time); it is ready when
/readyz answers 200 (bench.service_proc).  --accept-only runs the service without its
worker (TENANTRY_WORKER=false): nothing is provisioned and (a) measures the accept path
alone.

The load comes from another process, so the client's CPU is not the service's; both
share the machine's cores with PostgreSQL.  (a)'s client is wrk when it is installed
(Debian's `wrk`; the schedule, bodies, keys and figures in onboarding_wrk.lua): it costs
about a fifth of the Python load process's CPU per request.  Without wrk, or with
--load-generator python, the Python load process (`python -m bench.onboarding --load
...`) sends them, and the report says so; either way the generator's CPU per request over
its sending is reported, so that its share of the machine can be subtracted.  (b) and
(c) always use the Python client.  Every sign-up of (a) carries a fresh Idempotency-Key,
as the sign-up page sends.

(a) open loop.  Request i is due at start + i / --rate; a scheduler sends each one at
    its due time whatever the earlier ones are doing (aiohttp, no connection limit), and
    its latency runs from the DUE time to the end of the response: a stalled service
    cannot slow the arrivals down and hide its queueing (no coordinated omission).  The
    first --warmup seconds run on the same schedule and are not counted.  `send lag`
    (actual send - due) is the load generator's own lateness, included in the latency.
    Errors: any answer other than 202, and exceptions (timeouts, resets).  Every
    accepted sign-up is provisioned (7 steps, one job) by the same process meanwhile:
    how many completed by the end of the load, and the backlog then, are reported.
(c) provisioning drain (runs first, on the idle service): the provisioning queue is
    paused (an operator's pause, tenantry.set_queue_control), --drain sign-ups are
    accepted over HTTP (from this process, before the clock starts), then the queue is
    resumed and the time runs until every one of them is `completed` or `failed`:
    sign-ups fully provisioned per second when provisioning has the machine to itself,
    and its CPU per sign-up (the service and PostgreSQL apart).  What the accept path
    costs is (a)'s.
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
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import anyio
import asyncpg

from tenantry import db

from . import common, onboarding_load
from .common import Result, filesystem_of, fmt_rate, progress
from .service_proc import (
    CpuWindow,
    ServiceProcess,
    cores_line,
    latency_line,
    postmaster_pid,
    run_load,
    tenantry_service,
)

NAME = "onboarding"
GOAL_P99_MS = 10.0
# The achieved rate may fall this far short of the offered one and still count.
RATE_SHORTFALL = 0.05
# Issue 14: sign-ups fully provisioned per second on this machine.
GOAL_PROVISIONED_PER_S = 500.0
# Provisioning jobs at once: at 20 they took the two cores from the accepts.
PROVISION_CONCURRENCY = 4


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
        "--provision-concurrency",
        "--concurrency",
        dest="provision_concurrency",
        type=int,
        default=PROVISION_CONCURRENCY,
        help=f"provisioning jobs the service runs at once, TENANTRY_QUEUES=default=N"
        f" ({PROVISION_CONCURRENCY}; --concurrency is the old name)",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help="the service's TENANTRY_POOL_SIZE (default: provisioning concurrency + 10, so"
        " that running jobs leave connections to the HTTP handlers)",
    )
    parser.add_argument(
        "--accept-only",
        action="store_true",
        help="diagnostic: the service runs without its worker, so nothing is provisioned and"
        " (a) measures the accept path alone ((b) and (c) are skipped)",
    )
    parser.add_argument(
        "--drain",
        type=int,
        default=None,
        help="(c) sign-ups accepted while provisioning is paused, then provisioned"
        " (3000; quick 300)",
    )
    parser.add_argument(
        "--load-generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="(a)'s client: wrk (Debian's, with onboarding_wrk.lua), the Python load"
        " process, or auto: wrk when installed, else Python (said so in the report)",
    )
    parser.add_argument(
        "--wrk-connections",
        type=int,
        default=None,
        help="(a) with wrk: its connections (default: 200 ms of requests at --rate, >= 32)",
    )
    parser.add_argument(
        "--service-data-root",
        type=Path,
        default=None,
        help="where the service's data folder is made (TENANTRY_DATA_DIR: each tenant's"
        " storage folder and the welcome emails' files, each written with fsync); default:"
        " the system's temporary folder.  PostgreSQL's data stays where it is: /dev/shm"
        " here measures the service without the cost of its local file backends",
    )
    parser.add_argument("--skip-drain", action="store_true", help="skip (c)")
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
        "bench.onboarding",
        [
            *("follow", "--base-url", svc.base_url, "--count", str(count)),
            *("--rate", str(rate), "--tag", tag),
        ],
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


async def _accept_many(base_url: str, count: int, tag: str, parallel: int = 32) -> int:
    """`count` sign-ups, `parallel` at a time, as fast as the service answers; how many
    were accepted."""
    accepted = 0
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base_url, timeout=timeout) as http:
        limit = anyio.Semaphore(parallel)

        async def one(i: int) -> None:
            nonlocal accepted
            async with (
                limit,
                http.post(
                    "/v1/onboardings",
                    data=onboarding_load.sign_up_body(tag, i),
                    headers={"Content-Type": "application/json"},
                ) as r,
            ):
                await r.read()
                accepted += r.status == 202

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, i)
    return accepted


async def part_drain(svc: ServiceProcess, url: str, count: int, queue: str) -> Result:
    tag = f"d{uuid.uuid4().hex[:6]}"
    progress(f"onboarding: (c) {count} sign-ups accepted with provisioning paused, then drained")
    conn = await db.connect(url)
    try:
        await conn.execute(_SET_PAUSED, queue, True)
        accepted = await _accept_many(svc.base_url, count, tag)
        before = await onboarding_counts(conn, tag)
        cpu = CpuWindow(svc.pid, await postmaster_pid(url))
        cpu.start()
        started = time.monotonic()
        await conn.execute(_SET_PAUSED, queue, False)
        # Bounded: a sign-up that never ends (a stuck provisioning) fails the run
        # instead of hanging it.
        with anyio.fail_after(DRAIN_LIMIT_S):
            while True:
                counts = await onboarding_counts(conn, tag)
                if counts["in_progress"] == 0:
                    break
                await anyio.sleep(0.1)
        elapsed = time.monotonic() - started
        usage = cpu.stop()
    finally:
        await conn.execute(_SET_PAUSED, queue, False)
        await conn.close()
    ended = counts["completed"] + counts["failed"]
    drained = ended - (before["completed"] + before["failed"])
    per_s = drained / elapsed if elapsed > 0 else 0.0
    spent = usage["cpu_seconds"]
    return {
        "count": count,
        "accepted": accepted,
        "drained": drained,
        "completed": counts["completed"],
        "failed": counts["failed"],
        "seconds": round(elapsed, 2),
        "provisioned_per_s": round(per_s, 1),
        "cpu": usage,
        "cpu_ms_per_sign_up": {
            k: round(spent[k] * 1000 / drained, 2)
            for k in ("service", "postgres")
            if k in spent and drained
        },
        "goal": {"per_s_at_least": GOAL_PROVISIONED_PER_S, "met": per_s >= GOAL_PROVISIONED_PER_S},
    }


# The longest (c) waits for its sign-ups to end.
DRAIN_LIMIT_S = 600.0
# An operator's pause, as the dashboard and `tenantry queues pause` set it.
_SET_PAUSED = "SELECT tenantry.set_queue_control($1::text, $2::boolean, NULL, false, 'bench')"


def pick_generator(wanted: str) -> tuple[str, str | None]:
    """(a)'s load generator, and why it is not the one asked for (None when it is)."""
    if wanted == "python":
        return "python", None
    if onboarding_load.wrk_path() is not None:
        return "wrk", None
    if wanted == "wrk":
        raise SystemExit("bench.onboarding: --load-generator wrk, but wrk is not installed")
    return "python", (
        "wrk is not installed (apt-get install wrk): the Python load process is used, and"
        " its CPU per request is reported so that its share can be subtracted"
    )


async def part_open(
    svc: ServiceProcess,
    url: str,
    rate: float,
    seconds: float,
    warmup: float,
    *,
    generator: str = "python",
    wrk_connections: int | None = None,
) -> Result:
    tag = f"o{uuid.uuid4().hex[:6]}"
    progress(
        f"onboarding: (a) open loop, {rate:g} req/s for {seconds:g} s (+{warmup:g} s warm-up),"
        f" load from {generator}"
    )
    cpu = CpuWindow(svc.pid, await postmaster_pid(url))
    if generator == "wrk":
        # The window runs over the schedule itself (warm-up included), wrk's among its
        # processes.
        raw = await onboarding_load.load_open_wrk(
            *(svc.base_url, rate, seconds, warmup, tag),
            connections=wrk_connections,
            window=cpu,
        )
        usage = raw["cpu_window"]
    else:
        argv = ["open", "--base-url", svc.base_url, "--rate", str(rate)]
        argv += ["--seconds", str(seconds), "--warmup", str(warmup), "--tag", tag]
        # The CPU window starts with the load process (its imports included, ~0.5 s of
        # one core); its own figure per request leaves them out.
        cpu.start()
        raw = await run_load("bench.onboarding", argv)
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
    sent_all = raw["sent"] + raw["warmup_sent"]
    spent = usage["cpu_seconds"]
    return {
        "rate": rate,
        "seconds": seconds,
        "warmup_s": warmup,
        "generator": generator,
        **({"wrk": raw["wrk"]} if "wrk" in raw else {}),
        "generator_cpu_ms_per_request": raw["cpu_ms_per_request"],
        # The window's CPU (warm-up included) over every request sent in it: provisioning
        # runs meanwhile, so the service's and PostgreSQL's figures are the pipeline's
        # per sign-up, not the accept's alone (--accept-only gives that).
        "cpu_ms_per_request": {
            k: round(spent[k] * 1000 / sent_all, 3)
            for k in ("service", "postgres", "load")
            if k in spent and sent_all
        },
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
    drain = common.pick(args.drain, quick=args.quick, quick_value=300, full_value=3000)
    concurrency = args.provision_concurrency
    pool_size = args.pool_size or concurrency + 10
    queues = f"default={concurrency}"
    # --accept-only: no worker, so the provisioning jobs wait untouched.  (A worker on a
    # queue nobody enqueues to, as before, is refused now: the onboarding queue must be
    # one the process works.)
    extra_env = {"TENANTRY_WORKER": "false"} if args.accept_only else {}
    generator, fallback = pick_generator(args.load_generator)
    if fallback is not None and not args.skip_open:
        progress(f"onboarding: {fallback}")
    result: Result = {
        "load_generator": generator,
        "load_generator_note": fallback,
        "provision_concurrency": concurrency,
        "queues": queues,
        "pool_size": pool_size,
        "accept_only": args.accept_only,
    }
    data_dir = Path(
        tempfile.mkdtemp(prefix="tenantry-bench-onboarding-", dir=args.service_data_root)
    )
    result["service_data_dir"] = {"path": str(data_dir), "filesystem": filesystem_of(data_dir)}
    try:
        async with (
            common.fresh_database(server_url, "onboarding") as url,
            tenantry_service(
                url,
                data_dir,
                TENANTRY_TOKEN_SECRET=uuid.uuid4().hex + uuid.uuid4().hex,
                TENANTRY_QUEUES=queues,
                TENANTRY_POOL_SIZE=str(pool_size),
                **extra_env,
            ) as svc,
        ):
            if not (args.skip_drain or args.accept_only):
                result["drain"] = await part_drain(svc, url, drain, "default")
            if not (args.skip_follow or args.accept_only):
                result["follow"] = await part_follow(svc, url, follow, args.follow_rate)
            if not args.skip_open:
                result["open"] = await part_open(
                    *(svc, url, args.rate, seconds, args.warmup),
                    generator=generator,
                    wrk_connections=args.wrk_connections,
                )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


def render(result: Result) -> str:
    lines = common.header(
        result,
        f"onboarding: one `tenantry run` process (provisioning concurrency"
        f" {result['provision_concurrency']}: TENANTRY_QUEUES={result['queues']}, pool"
        f" {result['pool_size']}), load from a separate process"
        + (", ACCEPT ONLY (nothing provisioned)" if result.get("accept_only") else ""),
    )
    if result.get("load_generator_note"):
        lines.append(f"   NOTE: {result['load_generator_note']}")
    if "service_data_dir" in result:
        d = result["service_data_dir"]
        lines.append(
            f"   the service's data folder (storage, mail files): {d['path']} ({d['filesystem']})"
        )
    if "open" in result:
        o = result["open"]
        p = o["provisioning_at_end"]
        client = o.get("generator", "python")
        if "wrk" in o:
            w = o["wrk"]
            client += f" ({w['connections']} connections, {w['threads']} thread)"
        lines.append(
            f"(a) POST /v1/onboardings, open loop {o['rate']:g} req/s for {o['seconds']:g} s"
            f" (after {o['warmup_s']:g} s warm-up), load from {client}; latency from the"
            f" scheduled send time:"
        )
        lines.append(latency_line("202 latency", o["latency_ms"]))
        lines.append(latency_line("send lag (generator)", o["send_lag_ms"]))
        lines.append(
            f"  sent {o['sent']:,}, accepted {o['accepted']:,}, errors {o['errors']:,}"
            f" {o['outcomes']}; achieved {fmt_rate(o['achieved_per_s'])}/s"
        )
        lines.append(
            f"  provisioning at the end of the load: {p['completed']:,} of {p['accepted']:,}"
            f" completed, {p['failed']:,} failed, {p['in_progress']:,} in progress (jobs"
            f" queued {p['jobs_queued']:,}, running {p['jobs_running']:,})"
        )
        lines.append(cores_line(o["cpu"]))
        per = ", ".join(f"{k} {v:g}" for k, v in o.get("cpu_ms_per_request", {}).items())
        lines.append(
            f"  CPU per request sent, ms: {per}; the generator over its sending alone"
            f" {o.get('generator_cpu_ms_per_request')} ms"
        )
        if "wrk" in o:
            w = o["wrk"]["latency_from_write_ms"]
            lines.append(
                f"  wrk's own latency (from the write, warm-up included): p50 {w['p50']:g},"
                f" p99 {w['p99']:g}, max {w['max']:g} ms; wrk errors {o['wrk']['errors']}"
            )
        g = o["goal"]
        lines.append(
            f"  goal p99 <= {g['p99_ms_at_most']:g} ms, no errors, rate achieved:"
            f" {common.verdict(g['met'])}"
        )
    if "drain" in result:
        d = result["drain"]
        per = ", ".join(f"{k} {v:g} ms" for k, v in d["cpu_ms_per_sign_up"].items())
        lines.append(
            f"(c) provisioning drain: {d['accepted']:,} sign-ups accepted while paused, then"
            f" {d['drained']:,} provisioned in {d['seconds']:g} s:"
            f" **{fmt_rate(d['provisioned_per_s'])}/s** ({d['completed']:,} completed,"
            f" {d['failed']:,} failed); CPU per sign-up: {per}"
        )
        lines.append(cores_line(d["cpu"]))
        g = d["goal"]
        lines.append(f"  goal >= {g['per_s_at_least']:g}/s provisioned: {common.verdict(g['met'])}")
    if "follow" in result:
        f = result["follow"]
        s = f["split_ms"]
        lines.append(
            f"(b) accept -> completed (7 steps, files for mail and storage), {f['count']}"
            f" sign-ups at {f['rate']:g}/s, outcomes {f['outcomes']}:"
        )
        lines.append(latency_line("POST -> completed received", f["accept_to_completed_ms"]))
        lines.append(latency_line("  POST (202)", s["post"]))
        lines.append(
            latency_line("  accepted at -> completed at", s["accepted_at_to_completed_at"])
        )
        lines.append(latency_line("  completed at -> client", s["completed_at_to_client"]))
    return "\n".join(lines)


BENCH = common.Bench(NAME, __doc__ or NAME, add_arguments, run, render)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--load"]:
        return onboarding_load.main(args[1:])
    return common.main(BENCH, args)


if __name__ == "__main__":
    raise SystemExit(main())
