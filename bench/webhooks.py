"""Webhook delivery through one real `tenantry run` process: the whole pipeline (an
event committed to the outbox -> the fan-out -> a signed POST to a receiver -> the
attempt recorded), 10 endpoints over 10 tenants, the receiver in a process of its own
(bench.webhook_receiver: aiohttp on loopback, answers 204 at once).

(1) burst.  --events events (10,000) committed in one transaction, spread over the ten
    tenants; deliveries per second from that commit until the receiver has every one
    (`received`) and until every delivery is recorded `delivered` in the database
    (`recorded`, polled every 50 ms).
(2) latency.  An open-loop producer at --rate events/s (200) for --seconds (20): event i
    due at start + i / rate, each its own transaction; commit (the producer's clock when
    COMMIT returned) -> first arrival at the receiver (same machine, wall clock), p50 and
    p99.
(3) one endpoint hanging.  The first tenant's endpoint is moved to a path where the
    receiver holds every request until the sender's timeout (15 s); (2) and (1) again,
    their figures taken over the other nine endpoints, and compared with the same nine
    in (1) and (2).  Each burst starts after a VACUUM of the webhook tables, so that
    the comparison is of the hanging endpoint, not of the dead rows earlier phases left.

CPU: the service, PostgreSQL, the receiver, in cores over each phase.

Goals (issue 11): (1) >= 2,000 deliveries/s on this 2-core machine; (2) p99 <= 50 ms at
200 events/s; (3) the others' throughput and p99 within 10% of (1) and (2).
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

from tenantry.tenants import store

from . import common, webhook_receiver
from .common import Result, fmt_rate, latency_summary_ms, progress
from .service_proc import (
    CpuWindow,
    LoadProcess,
    cores_line,
    free_port,
    latency_line,
    postmaster_pid,
    tenantry_service,
)

NAME = "webhooks"
TENANTS = 10
GOAL_RATE = 2000.0
GOAL_P99_MS = 50.0
GOAL_HANG_SHARE = 0.10
SECRET_KEY = "bench-secret-key-" + "b" * 32

EMIT_MANY = """
SELECT count(tenantry.emit(($1::uuid[])[1 + (i % $2::integer)], 'bench', i::text,
                           'bench.event', jsonb_build_object('seq', i)))
  FROM generate_series($3::integer, $4::integer - 1) AS i
"""
EMIT_ONE = (
    "SELECT tenantry.emit($1, 'bench', $2, 'bench.event', jsonb_build_object('seq', $3::int))"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=None, help="(1) burst size (10,000)")
    parser.add_argument("--rate", type=float, default=200.0, help="(2) events per second (200)")
    parser.add_argument("--seconds", type=float, default=None, help="(2) seconds (20)")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="TENANTRY_WEBHOOK_CONCURRENCY (64)"
    )
    parser.add_argument("--no-hang", action="store_true", help="skip (3)")


class Bench:
    def __init__(self, url: str, svc_url: str, receiver: LoadProcess, port: int) -> None:
        self.url = url
        self.svc_url = svc_url
        self.receiver = receiver
        self.port = port
        self.tenants: list[uuid.UUID] = []
        self.keys: list[str] = []
        self.endpoints: list[str] = []
        self.next_seq = 0
        self.commits: dict[int, float] = {}

    async def setup(self, admin: asyncpg.Pool) -> None:
        async with aiohttp.ClientSession(self.svc_url) as http:
            for i in range(TENANTS):
                t = await store.create_tenant(admin, name=f"Webhook bench {i}")
                key = (await store.create_key(admin, t.id)).secret
                async with http.post(
                    "/v1/webhook-endpoints",
                    json={"url": f"http://127.0.0.1:{self.port}/t{i}"},
                    headers={"Authorization": f"Bearer {key}"},
                ) as r:
                    if r.status != 201:
                        raise RuntimeError(f"endpoint: {r.status} {await r.text()}")
                    self.endpoints.append((await r.json())["id"])
                self.tenants.append(t.id)
                self.keys.append(key)

    async def hang_first(self) -> None:
        async with (
            aiohttp.ClientSession(self.svc_url) as http,
            http.patch(
                f"/v1/webhook-endpoints/{self.endpoints[0]}",
                json={"url": f"http://127.0.0.1:{self.port}/hang", "retry_schedule": [0]},
                headers={"Authorization": f"Bearer {self.keys[0]}"},
            ) as r,
        ):
            if r.status != 200:
                raise RuntimeError(f"patch: {r.status} {await r.text()}")

    async def wait_received(self, wanted: int, within: float) -> bool:
        """Poll the receiver's count until it has `wanted` events (or time is up); the
        arrival times come at the end (`stop`)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            await self.receiver.send("count")
            if (await self.receiver.receive("counts"))["received"] >= wanted:
                return True
            await anyio.sleep(0.05)
        return False


async def _burst(
    b: Bench, admin: asyncpg.Pool, n: int, cpu: CpuWindow, *, skip_first: bool
) -> Result:
    first = b.next_seq
    b.next_seq += n
    expected_recorded = await admin.fetchval(
        "SELECT count(*) FROM tenantry.webhook_deliveries WHERE state = 'delivered'"
    )
    others = [s for s in range(first, first + n) if not (skip_first and s % TENANTS == 0)]
    # Each burst starts from tables without the dead rows of the phases before it, so
    # that (3) compares the hanging endpoint's effect, not the bloat (1) and (2) left.
    await admin.execute(
        "VACUUM ANALYZE tenantry.webhook_deliveries, tenantry.webhook_attempts,"
        " tenantry.webhook_endpoints, tenantry.outbox"
    )
    cpu.start()
    async with admin.acquire() as conn:
        await conn.fetchval(EMIT_MANY, b.tenants, TENANTS, first, first + n)
    t0 = time.time()
    for s in range(first, first + n):
        b.commits[s] = t0
    recorded_at = None
    target = expected_recorded + len(others)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = await admin.fetchval(
            "SELECT count(*) FROM tenantry.webhook_deliveries WHERE state = 'delivered'"
        )
        if done >= target:
            recorded_at = time.time()
            break
        await anyio.sleep(0.05)
    usage = cpu.stop()
    return {
        "events": n,
        "measured": len(others),
        "first": first,
        "t0": t0,
        "recorded_s": None if recorded_at is None else recorded_at - t0,
        "cpu": usage,
    }


async def _open_loop(
    b: Bench, pool: asyncpg.Pool, rate: float, seconds: float, cpu: CpuWindow
) -> Result:
    n = round(rate * seconds)
    first = b.next_seq
    b.next_seq += n
    late = 0
    start = time.monotonic()

    async def one(seq: int) -> None:
        async with pool.acquire() as conn:
            await conn.fetchval(EMIT_ONE, b.tenants[seq % TENANTS], str(seq), seq)
        b.commits[seq] = time.time()

    cpu.start()
    async with anyio.create_task_group() as tg:
        for i in range(n):
            due = start + i / rate
            wait = due - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)
            elif wait < -0.005:
                late += 1
            tg.start_soon(one, first + i)
    usage = cpu.stop()
    return {"events": n, "first": first, "late_sends": late, "cpu": usage}


def _latencies(
    b: Bench, arrivals: dict[int, float], first: int, n: int, *, skip_first: bool
) -> Result:
    samples = [
        arrivals[s] - b.commits[s]
        for s in range(first, first + n)
        if s in arrivals and s in b.commits and not (skip_first and s % TENANTS == 0)
    ]
    wanted = sum(1 for s in range(first, first + n) if not (skip_first and s % TENANTS == 0))
    return {"commit_to_receiver_ms": latency_summary_ms(samples), "lost": wanted - len(samples)}


def _rate(b: Bench, arrivals: dict[int, float], burst: Result, *, skip_first: bool) -> Result:
    seqs = [
        s
        for s in range(burst["first"], burst["first"] + burst["events"])
        if not (skip_first and s % TENANTS == 0)
    ]
    got = [arrivals[s] for s in seqs if s in arrivals]
    last = max(got) if got else burst["t0"]
    received_s = last - burst["t0"]
    out: Result = {
        "deliveries": len(seqs),
        "received": len(got),
        "received_s": round(received_s, 3),
        "received_per_s": round(len(got) / received_s, 1) if received_s > 0 else 0.0,
    }
    if burst["recorded_s"]:
        out["recorded_s"] = round(burst["recorded_s"], 3)
        out["recorded_per_s"] = round(len(seqs) / burst["recorded_s"], 1)
    return out


async def run(server_url: str, args: argparse.Namespace) -> Result:
    events = common.pick(args.events, quick=args.quick, quick_value=3000, full_value=10_000)
    seconds = common.pick(args.seconds, quick=args.quick, quick_value=8.0, full_value=20.0)
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="tenantry-bench-webhooks-"))
    result: Result = {"tenants": TENANTS, "rate": args.rate, "seconds": seconds}
    receiver = await LoadProcess.start("bench.webhooks", ["--port", str(port)])
    try:
        await receiver.receive("ready")
        async with (
            common.fresh_database(server_url, NAME) as url,
            tenantry_service(
                url,
                data_dir,
                TENANTRY_SECRET_KEY=SECRET_KEY,
                TENANTRY_WEBHOOK_ALLOW_NETWORKS="127.0.0.0/8",
                TENANTRY_WEBHOOK_ALLOW_HTTP="true",
                TENANTRY_WEBHOOK_CONCURRENCY=str(args.concurrency),
                TENANTRY_QUEUES="default=2",
            ) as svc,
        ):
            admin = await asyncpg.create_pool(url, min_size=2, max_size=20)
            try:
                b = Bench(url, svc.base_url, receiver, port)
                await b.setup(admin)
                pg = await postmaster_pid(url)
                cpu = CpuWindow(svc.pid, pg, {"receiver": receiver.proc.pid})
                progress(f"webhooks: (1) burst of {events:,} events")
                burst = await _burst(b, admin, events, cpu, skip_first=False)
                progress(f"webhooks: (2) {args.rate:g} events/s for {seconds:g} s")
                loop = await _open_loop(b, admin, args.rate, seconds, cpu)
                await b.wait_received(b.next_seq, 60)
                hang_loop = hang_burst = None
                if not args.no_hang:
                    await b.hang_first()
                    progress("webhooks: (3) one endpoint hanging: (2) and (1) again")
                    hang_loop = await _open_loop(b, admin, args.rate, seconds, cpu)
                    hang_burst = await _burst(b, admin, events, cpu, skip_first=True)
                    # The hanging endpoint got 4 of its events at most: the rest are the
                    # other nine's.
                    hung = sum(1 for s in range(loop["first"] + loop["events"], b.next_seq)
                               if s % TENANTS == 0)  # fmt: skip
                    await b.wait_received(b.next_seq - hung, 60)
                await receiver.send("stop")
                done = await receiver.receive("done")
            finally:
                await admin.close()
        arrivals = {int(k): v for k, v in done["arrivals"].items()}
        result["burst"] = {**_rate(b, arrivals, burst, skip_first=False), "cpu": burst["cpu"]}
        result["burst_nine"] = _rate(b, arrivals, burst, skip_first=True)
        result["open_loop"] = {
            **_latencies(b, arrivals, loop["first"], loop["events"], skip_first=False),
            "late_sends": loop["late_sends"],
            "cpu": loop["cpu"],
        }
        result["open_loop_nine"] = _latencies(
            b, arrivals, loop["first"], loop["events"], skip_first=True
        )
        result["receiver_cpu_s"] = done["cpu_s"]
        if hang_loop is not None and hang_burst is not None:
            result["hanging"] = {
                "open_loop_nine": {
                    **_latencies(
                        b, arrivals, hang_loop["first"], hang_loop["events"], skip_first=True
                    ),
                    "cpu": hang_loop["cpu"],
                },
                "burst_nine": {
                    **_rate(b, arrivals, hang_burst, skip_first=True),
                    "cpu": hang_burst["cpu"],
                },
            }
        result["goal"] = _goal(result)
        return result
    finally:
        await receiver.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def _goal(r: Result) -> Result:
    rate = r["burst"].get("recorded_per_s", 0.0)
    p99 = r["open_loop"]["commit_to_receiver_ms"].get("p99", float("inf"))
    g: Result = {
        "rate_at_least": GOAL_RATE,
        "rate_met": rate >= GOAL_RATE,
        "p99_ms_at_most": GOAL_P99_MS,
        "p99_met": p99 <= GOAL_P99_MS and r["open_loop"]["lost"] == 0,
    }
    if "hanging" in r:
        h = r["hanging"]
        base_rate = r["burst_nine"]["received_per_s"]
        hang_rate = h["burst_nine"]["received_per_s"]
        base_p99 = r["open_loop_nine"]["commit_to_receiver_ms"].get("p99", float("inf"))
        hang_p99 = h["open_loop_nine"]["commit_to_receiver_ms"].get("p99", float("inf"))
        g["hang_rate_ratio"] = round(hang_rate / base_rate, 3) if base_rate else 0.0
        g["hang_p99_ratio"] = round(hang_p99 / base_p99, 3) if base_p99 else float("inf")
        g["hang_met"] = (
            g["hang_rate_ratio"] >= 1 - GOAL_HANG_SHARE
            and g["hang_p99_ratio"] <= 1 + GOAL_HANG_SHARE
            and h["open_loop_nine"]["lost"] == 0
        )
    return g


def render(r: Result) -> str:
    b, g = r["burst"], r["goal"]
    lines = [
        f"webhooks: {r['tenants']} endpoints over {r['tenants']} tenants, receiver in another"
        " process",
        f"(1) burst of {b['deliveries']:,}: received in {b['received_s']:.2f} s"
        f" ({fmt_rate(b['received_per_s'])}/s), all recorded delivered in"
        f" {b.get('recorded_s', float('nan')):.2f} s ({fmt_rate(b.get('recorded_per_s', 0))}/s)",
        f"  goal >= {fmt_rate(g['rate_at_least'])}/s recorded: {common.verdict(g['rate_met'])}",
        cores_line(b["cpu"]),
    ]
    ol = r["open_loop"]
    lines.append(f"(2) {r['rate']:g} events/s for {r['seconds']:g} s, lost {ol['lost']}")
    lines.append(latency_line("commit -> receiver", ol["commit_to_receiver_ms"]))
    lines.append(f"  goal p99 <= {g['p99_ms_at_most']:g} ms: {common.verdict(g['p99_met'])}")
    lines.append(cores_line(ol["cpu"]))
    if "hanging" in r:
        h = r["hanging"]
        lines.append("(3) one endpoint hanging; the other nine:")
        lines.append(
            f"  burst {fmt_rate(h['burst_nine']['received_per_s'])}/s against"
            f" {fmt_rate(r['burst_nine']['received_per_s'])}/s without"
            f" ({g['hang_rate_ratio']:.2f}x)"
        )
        lines.append(
            latency_line("commit -> receiver", h["open_loop_nine"]["commit_to_receiver_ms"])
        )
        base = r["open_loop_nine"]["commit_to_receiver_ms"]
        lines.append(
            f"  p99 {h['open_loop_nine']['commit_to_receiver_ms'].get('p99', float('nan')):.2f}"
            f" ms against {base.get('p99', float('nan')):.2f} ms without"
            f" ({g['hang_p99_ratio']:.2f}x); goal within 10%: {common.verdict(g['hang_met'])}"
        )
    return "\n".join(lines)


BENCH = common.Bench(NAME, __doc__ or NAME, add_arguments, run, render)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--load"]:
        return webhook_receiver.main(args[1:])
    return common.main(BENCH, args)


if __name__ == "__main__":
    raise SystemExit(main())
