"""Server-sent events at scale: --clients (20,000) concurrent streams on ONE `tenantry
run` process, its memory per idle stream, and status events commit -> client under load.

Set-up.  The onboardings are written straight into the database as the superuser (rows
in tenantry.onboardings plus their version-1 `onboarding.accepted` event through
tenantry.emit, in batches; no provisioning job), each with its status token signed here
with the service's TENANTRY_TOKEN_SECRET (tenantry.onboarding.tokens.Signer).  The
service runs as bench.service_proc starts it (its own process, log level warning, the
default SSE settings unless --keepalive); the streams live in --load-processes (2)
separate processes (`python -m bench.sse --load ...`, bench.sse_load: aiohttp, no
connection limit),
each connecting from a loopback address of its own (127.0.0.2, 127.0.0.3, ...) so that
each has a whole ephemeral port range.  This process raises its open-files limit to
the hard limit before starting any of them (they inherit it); the streams cannot
outnumber what the service's limit leaves after the descriptors it holds once started
(plus FD_SPARE), and the result says when --clients had to be cut to fit.

(a) memory.  The service's VmRSS after start-up and a warm-up (a few streams opened
    and closed), then with every stream connected and idle for --idle seconds:
    (after - before) / streams is the memory per idle client, hub included.  Connect
    time: from the command to connect to the last stream's first event (the replayed
    `onboarding.accepted`), at most --connect-concurrency connects in flight per load
    process; per stream, GET -> that first event.
(b) latency.  --rate (2,000) events/s for --seconds (20), open loop, spread over the
    connected streams (a random order, round robin, each onboarding's next version),
    each `SELECT tenantry.emit(...)` in autocommit (its own transaction) on a pool of
    --pool superuser connections.  Its payload carries `sent` (time.time() just before
    the statement is sent) and a sequence number; the client parses the frame's data
    (the payload's keys plus type, version, at) and takes now - sent: the headline,
    which covers the commit itself.  `commit returned ->
    client` subtracts the statement's round trip (the commit happened before it
    returned: a lower bound).  Lost: events committed but never received within
    --settle s after the last (expected 0).  The p99 of the events sent in each second
    (and the worst such second) shows whether latency comes in bursts: a full garbage
    collection of the service's heap stops its event loop, and so would keepalives
    written to every stream at once (the hub spreads them: each quiet stream gets one
    every --keepalive s, at its own phase).  The load processes freeze and stop
    their own collector once their streams are open, so that its pauses (10,000
    client streams a process) are not timed as the service's.
(c) CPU.  The service's utime + stime over the event phase (first send to the last
    receipt) / events delivered, in microseconds; keepalive frames written meanwhile
    are reported beside it (they are part of that CPU).

Goals (issue 14, tighter than DESIGN.md's 50 ms and 32 KiB): p99 <= 20 ms commit ->
client at 2,000 events/s with 20k clients connected to one process, none lost; <= 16
KiB per idle client including the hub.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import anyio

from tenantry import db
from tenantry.onboarding.tokens import Signer

from . import common, sse_load
from .common import Result, progress
from .service_proc import (
    CpuWindow,
    LoadProcess,
    cores_line,
    latency_line,
    open_fds,
    open_files_limit,
    postmaster_pid,
    raise_nofile,
    rss_kib,
    tenantry_service,
)
from .sse_load import Stream

NAME = "sse"
GOAL_P99_MS = 20.0
GOAL_KIB_PER_CLIENT = 16.0
# Descriptors the service may open after start-up besides its streams (its pools grow
# to their maximum under the connect storm), with room to spare.
FD_SPARE = 32
TOKEN_TTL = 86_400
WARMUP_STREAMS = 20


# --- the benchmark ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clients", type=int, default=None, help="concurrent streams (20000; quick 2000)"
    )
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second (2000)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds of events (20; quick 5)"
    )
    parser.add_argument("--load-processes", type=int, default=2, help="client processes (2)")
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=20,
        help="connects in flight per load process (20)",
    )
    parser.add_argument(
        "--idle", type=float, default=3.0, help="seconds idle before the memory figure (3)"
    )
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds the last events may take (10)"
    )
    parser.add_argument(
        "--keepalive",
        type=float,
        default=None,
        help="TENANTRY_SSE_KEEPALIVE for the service (default: the service's, 15 s)",
    )
    parser.add_argument("--pool", type=int, default=16, help="producer connections (16)")
    parser.add_argument(
        "--gc-tuning",
        choices=("on", "off"),
        default="on",
        help="TENANTRY_SSE_GC_TUNING for the service: the collector's settings for many"
        " streams (on, the default) or Python's own (off)",
    )


def by_second(sent_at: list[float], latency: dict[int, float]) -> list[Result]:
    """Latency of the events sent in each second of the phase."""
    if not latency:
        return []
    t0 = min(sent_at[i] for i in latency)
    buckets: dict[int, list[float]] = {}
    for i, lat in latency.items():
        buckets.setdefault(int(sent_at[i] - t0), []).append(lat)
    return [{"second": b, **common.latency_summary_ms(buckets[b])} for b in sorted(buckets)]


async def run(server_url: str, args: argparse.Namespace) -> Result:
    wanted = common.pick(args.clients, quick=args.quick, quick_value=2000, full_value=20_000)
    seconds = common.pick(args.seconds, quick=args.quick, quick_value=5.0, full_value=20.0)
    nofile = raise_nofile(wanted + 100)
    clients = min(wanted, nofile)
    result: Result = {
        "clients_requested": wanted,
        "nofile_limit": nofile,
        "load_processes": args.load_processes,
        "rate": args.rate,
        "seconds": seconds,
    }
    secret = uuid.uuid4().hex + uuid.uuid4().hex
    signer = Signer(secret.encode(), TOKEN_TTL)
    data_dir = Path(tempfile.mkdtemp(prefix="tenantry-bench-sse-"))
    env = {
        "TENANTRY_TOKEN_SECRET": secret,
        "TENANTRY_SSE_GC_TUNING": "true" if args.gc_tuning == "on" else "false",
    }
    result["gc_tuning"] = args.gc_tuning
    if args.keepalive is not None:
        env["TENANTRY_SSE_KEEPALIVE"] = f"{args.keepalive:g}"
    try:
        async with common.fresh_database(server_url, "sse") as url:
            conn = await db.connect(url)
            try:
                progress(f"sse: creating {clients:,} onboardings with their first event")
                streams = await sse_load.create_onboardings(conn, clients)
            finally:
                await conn.close()
            paths = [s.path(signer) for s in streams]
            async with tenantry_service(url, data_dir, **env) as svc:
                result["keepalive_s"] = args.keepalive or 15.0
                result.update(
                    await measure(
                        pid=svc.pid,
                        base_url=svc.base_url,
                        url=url,
                        streams=streams,
                        paths=paths,
                        data_dir=data_dir,
                        args=args,
                    )
                )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


async def measure(
    *,
    pid: int,
    base_url: str,
    url: str,
    streams: list[Stream],
    paths: list[str],
    data_dir: Path,
    args: argparse.Namespace,
) -> Result:
    seconds = common.pick(args.seconds, quick=args.quick, quick_value=5.0, full_value=20.0)
    fds, nofile = open_fds(pid), open_files_limit(pid)
    clients = min(len(paths), nofile - fds - FD_SPARE)
    out: Result = {"service_fds_at_start": fds, "clients": clients}
    if clients < len(paths):
        out["clients_capped_by"] = (
            f"RLIMIT_NOFILE: the service process may open {nofile:,} files (the hard limit here;"
            f" raising it needs CAP_SYS_RESOURCE), it holds {fds} after start-up,"
            f" {FD_SPARE} kept spare"
        )
        progress(f"sse: {len(paths):,} streams do not fit in {nofile:,} files: {clients:,}")
    paths = paths[:clients]
    await sse_load.warm_up(base_url, paths[:WARMUP_STREAMS])
    await anyio.sleep(1.0)
    rss_before = rss_kib(pid)
    k = max(1, args.load_processes)
    shares = [list(range(i, len(paths), k)) for i in range(k)]  # stream indexes per process
    loads: list[LoadProcess] = []
    try:
        for i, share in enumerate(shares):
            f = data_dir / f"paths-{i}.txt"
            f.write_text("\n".join(paths[j] for j in share) + "\n")
            loads.append(
                await sse_load.start(base_url, f, args.connect_concurrency, f"127.0.0.{i + 2}")
            )
        for lp in loads:
            await lp.receive("ready")
        progress(f"sse: connecting {len(paths):,} streams from {k} load processes")
        cpu = CpuWindow(pid, await postmaster_pid(url))
        for i, lp in enumerate(loads):
            cpu.extra[f"load{i}"] = lp.proc.pid
        cpu.start()
        t0 = time.perf_counter()
        for lp in loads:
            await lp.send("connect")
        connected = [await lp.receive("connected") for lp in loads]
        connect_wall = time.perf_counter() - t0
        connect_cpu = cpu.stop()
        failed = {
            shares[i][local]: why for i, msg in enumerate(connected) for local, why in msg["failed"]
        }
        ok = [j for j in range(len(paths)) if j not in failed]
        out["connect"] = {
            "streams": len(ok),
            "failed": len(failed),
            "failures": dict(Counter(failed.values())),
            "wall_s": round(connect_wall, 2),
            "per_s": round(len(ok) / connect_wall, 1) if connect_wall > 0 else None,
            "per_stream_ms": common.latency_summary_ms(
                [x for msg in connected for x in msg["connect_s"]]
            ),
            "cpu": connect_cpu,
        }
        progress(
            f"sse: {len(ok):,} streams connected in {connect_wall:.1f} s"
            f" ({len(failed):,} failed); idle {args.idle:g} s"
        )
        await anyio.sleep(args.idle)
        rss_after = rss_kib(pid)
        out["memory"] = {
            "rss_before_kib": rss_before,
            "rss_connected_kib": rss_after,
            "service_fds_connected": open_fds(pid),
            "kib_per_client": round((rss_after - rss_before) / max(1, len(ok)), 2),
        }
        out["memory"]["goal"] = {
            "kib_per_client_at_most": GOAL_KIB_PER_CLIENT,
            "met": bool(ok) and out["memory"]["kib_per_client"] <= GOAL_KIB_PER_CLIENT,
        }
        if ok:
            out["latency"] = await events_phase(
                pid=pid, url=url, streams=streams, ok=ok, loads=loads, seconds=seconds, args=args
            )
            out["memory"]["rss_after_events_kib"] = rss_kib(pid)
        for lp in loads:
            await lp.send("stop")
        done = [await lp.receive("done") for lp in loads]
        if "latency" in out:
            finish_latency(out["latency"], done)
    finally:
        for lp in loads:
            if lp.proc.returncode is None:
                with anyio.move_on_after(1):
                    await lp.send("stop")
        for lp in loads:
            await lp.close()
    return out


async def events_phase(
    *,
    pid: int,
    url: str,
    streams: list[Stream],
    ok: list[int],
    loads: list[LoadProcess],
    seconds: float,
    args: argparse.Namespace,
) -> Result:
    n_events = round(args.rate * seconds)
    order = list(ok)
    random.Random(42).shuffle(order)
    sent_at = [math.nan] * n_events
    committed_at = [math.nan] * n_events
    pool = await db.create_pool(url, min_size=args.pool, max_size=args.pool)
    try:
        before = await sse_load.total_counts(loads)
        cpu = CpuWindow(pid, await postmaster_pid(url))
        for i, lp in enumerate(loads):
            cpu.extra[f"load{i}"] = lp.proc.pid
        progress(f"sse: {args.rate:g} events/s for {seconds:g} s")
        cpu.start()
        errors = await sse_load.produce(
            pool,
            streams=streams,
            order=order,
            rate=args.rate,
            seconds=seconds,
            sent_at=sent_at,
            committed_at=committed_at,
        )
        committed = sum(1 for x in committed_at if not math.isnan(x))
        deadline = time.monotonic() + args.settle
        while True:
            counts = await sse_load.total_counts(loads)
            if counts["received"] - before["received"] >= committed:
                break
            if time.monotonic() > deadline:
                break
            await anyio.sleep(0.1)
        usage = cpu.stop()
    finally:
        await pool.close()
    delivered = counts["received"] - before["received"]
    keepalives = counts["keepalives"] - before["keepalives"]
    service_cpu = usage["cpu_seconds"]["service"]
    return {
        "seconds": seconds,
        "events": n_events,
        "committed": committed,
        "emit_errors": dict(errors),
        "delivered": delivered,
        "keepalives_during": keepalives,
        "streams_ended": counts["ended"],
        "cpu": usage,
        "service_cpu_us_per_delivery": round(service_cpu / max(1, delivered) * 1e6, 1),
        "service_cpu_us_per_frame": round(service_cpu / max(1, delivered + keepalives) * 1e6, 1),
        "_sent_at": sent_at,
        "_committed_at": committed_at,
    }


def finish_latency(lat: Result, done: list[Result]) -> None:
    sent_at: list[float] = lat.pop("_sent_at")
    committed_at: list[float] = lat.pop("_committed_at")
    latency: dict[int, float] = {}
    duplicates = 0
    for msg in done:
        for seq, value in msg["receipts"]:
            if seq in latency:
                duplicates += 1
            latency[seq] = value
    committed = {i for i, x in enumerate(committed_at) if not math.isnan(x)}
    lost = len(committed - latency.keys())
    to_client = [latency[i] for i in committed if i in latency]
    after_commit = [latency[i] - (committed_at[i] - sent_at[i]) for i in committed if i in latency]
    summary = common.latency_summary_ms(to_client)
    seconds = by_second(sent_at, {i: latency[i] for i in committed if i in latency})
    lat.update(
        {
            "lost": lost,
            "lost_examples": sorted(committed - latency.keys())[:10],
            "duplicates": duplicates,
            "commit_to_client_ms": summary,
            "commit_returned_to_client_ms": common.latency_summary_ms(after_commit),
            "emit_rtt_ms": common.latency_summary_ms(
                [committed_at[i] - sent_at[i] for i in committed]
            ),
            "by_second_ms": seconds,
            "worst_second_ms": max(seconds, key=lambda x: x["p99"], default={}),
            "load_cpu_s": [round(m["cpu_s"], 2) for m in done],
        }
    )
    lat["goal"] = {
        "p99_ms_at_most": GOAL_P99_MS,
        "lost": 0,
        "met": bool(summary.get("n")) and summary["p99"] <= GOAL_P99_MS and lost == 0,
    }


def _line(label: str, s: dict[str, float]) -> str:
    return latency_line(label, s, width=28)


def render(result: Result) -> str:
    lines = common.header(
        result,
        f"sse: {result['clients']:,} concurrent streams on one `tenantry run` process,"
        f" clients in {result['load_processes']} separate processes,"
        f" collector tuning {result['gc_tuning']}",
    )
    if "clients_capped_by" in result:
        lines.append(
            f"  NOTE: {result['clients_requested']:,} requested; capped by"
            f" {result['clients_capped_by']}"
        )
    c = result["connect"]
    lines.append(
        f"Connect: {c['streams']:,} streams in {c['wall_s']:g} s ({c['per_s']:,.0f}/s),"
        f" {c['failed']:,} failed {c['failures'] or ''}"
    )
    lines.append(_line("GET -> first event", c["per_stream_ms"]))
    lines.append(cores_line(c["cpu"]))
    m = result["memory"]
    lines.append(
        f"(a) memory: service RSS {m['rss_before_kib'] / 1024:,.1f} MiB before,"
        f" {m['rss_connected_kib'] / 1024:,.1f} MiB with the streams connected and idle"
        f" ({m['service_fds_connected']:,} open files): {m['kib_per_client']:.1f} KiB per"
        f" idle client (goal <= {m['goal']['kib_per_client_at_most']:g} KiB:"
        f" {common.verdict(m['goal']['met'])})"
    )
    if "latency" in result:
        lt = result["latency"]
        lines.append(
            f"(b) {result['rate']:g} events/s for {lt['seconds']:g} s, each its own transaction"
            f" (keepalive every {result['keepalive_s']:g} s): {lt['committed']:,} committed,"
            f" {lt['delivered']:,} delivered, lost {lt['lost']:,}, duplicates"
            f" {lt['duplicates']:,}, streams ended early {lt['streams_ended']:,}"
        )
        lines.append(_line("commit -> client (headline)", lt["commit_to_client_ms"]))
        lines.append(_line("commit returned -> client", lt["commit_returned_to_client_ms"]))
        lines.append(_line("emit round trip", lt["emit_rtt_ms"]))
        w = lt["worst_second_ms"]
        if w:
            lines.append(_line(f"worst second (#{w['second']})", w))
            lines.append(
                "  p99 by second sent (ms): "
                + " ".join(f"{x['p99']:.0f}" for x in lt["by_second_ms"])
            )
        g = lt["goal"]
        lines.append(
            f"  goal p99 <= {g['p99_ms_at_most']:g} ms, none lost: {common.verdict(g['met'])}"
        )
        lines.append(
            f"(c) service CPU {lt['service_cpu_us_per_delivery']:.1f} us per delivered event"
            f" ({lt['service_cpu_us_per_frame']:.1f} us per frame counting"
            f" {lt['keepalives_during']:,} keepalives)"
        )
        lines.append(cores_line(lt["cpu"]))
    return "\n".join(lines)


BENCH = common.Bench(NAME, __doc__ or NAME, add_arguments, run, render)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--load"]:
        return sse_load.main(args[1:])
    return common.main(BENCH, args)


if __name__ == "__main__":
    raise SystemExit(main())
