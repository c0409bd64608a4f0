"""The load of bench.onboarding.  The Python load process (`python -m bench.onboarding
--load open|follow ...`): (a) POSTs on an open-loop schedule, (b) sign-ups each followed
over its events stream to `onboarding.completed`; it prints one JSON object, its CPU
time included.  And (a) driven by wrk instead (`load_open_wrk`, the schedule in
onboarding_wrk.lua): a compiled client that costs the measured machine much less CPU
per request than this Python one.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aiohttp
import anyio
import anyio.abc
import orjson

from . import common
from .common import Result
from .service_proc import ROOT, CpuWindow, cpu_seconds, own_cpu_seconds


def sign_up_body(tag: str, i: int) -> bytes:
    return orjson.dumps(
        {"email": f"{tag}-{i}@example.com", "tenant_name": f"Bench {tag} {i}", "plan": "free"}
    )


def sign_up_headers(tag: str, i: int) -> dict[str, str]:
    """A fresh Idempotency-Key per sign-up, as a browser's form sends (and as the wrk
    load sends: the same requests from either generator)."""
    return {"Content-Type": "application/json", "Idempotency-Key": f"key-{tag}-{i}"}


async def load_open(base_url: str, rate: float, seconds: float, warmup: float, tag: str) -> Result:
    """(a): requests due at fixed times, whatever the earlier ones do."""
    n_warm = round(rate * warmup)
    n = n_warm + round(rate * seconds)
    interval = 1.0 / rate
    latency: list[float | None] = [None] * n
    lag: list[float] = [0.0] * n
    done_at: list[float] = [0.0] * n
    outcomes: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=0)
    # This process's CPU over the load itself (its imports and start-up left out): the
    # generator's share of the machine, per request sent.
    cpu_before = cpu_seconds(os.getpid())
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as http:

        async def one(i: int, due: float) -> None:
            lag[i] = time.perf_counter() - due
            try:
                async with http.post(
                    "/v1/onboardings", data=sign_up_body(tag, i), headers=sign_up_headers(tag, i)
                ) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if i >= n_warm:
                    outcomes[type(exc).__name__] += 1
                return
            end = time.perf_counter()
            if i >= n_warm:
                outcomes[str(status)] += 1
            if status == 202:
                latency[i] = end - due
                done_at[i] = end

        async with anyio.create_task_group() as tg:
            start = time.perf_counter() + 0.05
            for i in range(n):
                due = start + i * interval
                delay = due - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(one, i, due)
    load_cpu = cpu_seconds(os.getpid()) - cpu_before
    measured_start = start + n_warm * interval
    ok = [x for x in latency[n_warm:] if x is not None]
    last = max(done_at[n_warm:], default=measured_start)
    return {
        "generator": "python",
        "sent": n - n_warm,
        "warmup_sent": n_warm,
        "outcomes": dict(outcomes),
        "latency_s": ok,
        "send_lag_s": lag[n_warm:],
        "window_s": last - measured_start,
        "load_cpu_s": load_cpu,
        "cpu_ms_per_request": round(load_cpu * 1000 / n, 3) if n else None,
    }


WRK_SCRIPT = ROOT / "bench" / "onboarding_wrk.lua"
# Seconds wrk goes on after the last request is due, for the last answers: one later
# than that counts as unanswered (an error).
WRK_TAIL_S = 3.0
# Seconds from wrk's start to the first due request (onboarding_wrk.lua's setup).
WRK_LEAD_S = 0.5
_WRK_JSON = b"BENCH_JSON "


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_connections(rate: float) -> int:
    """wrk's connections for `rate`: a connection carries one request at a time, so this
    many cover 200 ms of answers in flight (at least 32) before a send is late.  A late
    send still counts from its due time."""
    return max(32, math.ceil(rate * 0.2))


async def load_open_wrk(
    base_url: str,
    rate: float,
    seconds: float,
    warmup: float,
    tag: str,
    *,
    connections: int | None = None,
    window: CpuWindow | None = None,
) -> Result:
    """(a) with wrk (onboarding_wrk.lua): the same schedule, requests and figures as
    `load_open`, and wrk's CPU time (it is this process's child; its rusage once it
    ended).  `window`, when given, is started at the first due request and stopped just
    after the last (wrk's tail, idle, left out), wrk's CPU among its figures as `load`;
    its figures come back as `cpu_window`."""
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    n_warm = round(rate * warmup)
    n = n_warm + round(rate * seconds)
    threads = 1  # one thread sends 1,000/s with CPU to spare; fewer wake-ups than two
    conns = connections or wrk_connections(rate)
    duration = math.ceil(WRK_LEAD_S + n / rate + WRK_TAIL_S)
    env = os.environ | {
        "BENCH_RATE": repr(rate),
        "BENCH_COUNT": str(n),
        "BENCH_WARMUP_COUNT": str(n_warm),
        "BENCH_TAG": tag,
        "BENCH_THREADS": str(threads),
    }
    argv = [wrk, f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--timeout", "30s"]
    argv += ["-s", str(WRK_SCRIPT), base_url]
    out, err = bytearray(), bytearray()
    usage: Result | None = None

    async def collect(stream: anyio.abc.ByteReceiveStream, into: bytearray) -> None:
        async for chunk in stream:
            into += chunk

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    async with await anyio.open_process(argv, env=env) as proc, anyio.create_task_group() as tg:
        assert proc.stdout is not None and proc.stderr is not None
        tg.start_soon(collect, proc.stdout, out)
        tg.start_soon(collect, proc.stderr, err)
        if window is not None:
            window.extra["load"] = proc.pid
            await anyio.sleep(WRK_LEAD_S)
            window.start()
            # The schedule, and a tenth of a second for the last answers.
            await anyio.sleep(n / rate + 0.1)
            usage = window.stop()
        await proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {err.decode()[-2000:]}")
    line = next((x for x in bytes(out).splitlines() if x.startswith(_WRK_JSON)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result line: {out.decode()[-2000:]}")
    raw = orjson.loads(line[len(_WRK_JSON) :])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    answered = sum(raw["outcomes"].values())
    outcomes: dict[str, int] = dict(raw["outcomes"])
    if raw["sent"] > answered:
        outcomes[f"no answer within {WRK_TAIL_S:g} s of the schedule's end"] = (
            raw["sent"] - answered
        )
    return {
        "generator": "wrk",
        "wrk": {
            "connections": conns,
            "threads": threads,
            "duration_s": duration,
            "requests": raw["wrk_requests"],
            "errors": raw["wrk_errors"],
            "latency_from_write_ms": {
                k: round(v / 1000, 2) for k, v in raw["wrk_latency_us"].items()
            },
        },
        "sent": raw["sent"],
        "warmup_sent": raw["warmup_sent"],
        "warmup_outcomes": raw["warmup_outcomes"],
        "outcomes": outcomes,
        "latency_s": [x / 1e6 for x in raw["latency_us"]],
        "send_lag_s": [x / 1e6 for x in raw["send_lag_us"]],
        "window_s": raw["window_s"],
        "cpu_s": cpu,
        "cpu_window": usage,
        "load_cpu_s": cpu,
        "cpu_ms_per_request": round(cpu * 1000 / n, 3) if n else None,
    }


def _frame_fields(frame: bytes) -> tuple[str, Any]:
    event, data = "", None
    for line in frame.split(b"\n"):
        if line.startswith(b"event: "):
            event = line[7:].decode()
        elif line.startswith(b"data: "):
            data = orjson.loads(line[6:])
    return event, data


def _ts(at: Any) -> float:
    return datetime.fromisoformat(str(at)).timestamp()


async def load_follow(base_url: str, count: int, rate: float, tag: str) -> Result:
    """(b): sign up, follow the stream to `onboarding.completed`."""
    total: list[float] = []
    post: list[float] = []
    server_side: list[float] = []
    to_client: list[float] = []
    outcomes: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=120, sock_read=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as http:

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                async with http.post(
                    "/v1/onboardings", data=sign_up_body(tag, i), headers=sign_up_headers(tag, i)
                ) as r:
                    body = await r.read()
                    if r.status != 202:
                        outcomes[f"POST {r.status}"] += 1
                        return
                t_accept = time.perf_counter()
                accepted_at: float | None = None
                async with http.get(orjson.loads(body)["events_url"]) as stream:
                    if stream.status != 200:
                        outcomes[f"GET {stream.status}"] += 1
                        return
                    while True:
                        frame = await stream.content.readuntil(b"\n\n")
                        now_wall, now = time.time(), time.perf_counter()
                        if not frame:
                            outcomes["stream ended early"] += 1
                            return
                        event, data = _frame_fields(frame)
                        if event == "onboarding.accepted":
                            accepted_at = _ts(data["at"])
                        elif event == "onboarding.failed":
                            outcomes["failed"] += 1
                            return
                        elif event == "onboarding.completed":
                            total.append(now - t0)
                            post.append(t_accept - t0)
                            done = _ts(data["at"])
                            to_client.append(now_wall - done)
                            if accepted_at is not None:
                                server_side.append(done - accepted_at)
                            outcomes["completed"] += 1
                            return
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                outcomes[type(exc).__name__] += 1

        async with anyio.create_task_group() as tg:
            start = time.perf_counter()
            for i in range(count):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(one, i)
    return {
        "outcomes": dict(outcomes),
        "total_s": total,
        "post_s": post,
        "server_side_s": server_side,
        "completed_at_to_client_s": to_client,
    }


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.onboarding --load")
    p.add_argument("mode", choices=("open", "follow"))
    p.add_argument("--base-url", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--tag", required=True)
    a = p.parse_args(argv)
    if a.mode == "open":
        out = common.run_async(load_open, a.base_url, a.rate, a.seconds, a.warmup, a.tag)
    else:
        out = common.run_async(load_follow, a.base_url, a.count, a.rate, a.tag)
    out["cpu_s"] = own_cpu_seconds()
    sys.stdout.buffer.write(orjson.dumps(out))
    sys.stdout.flush()
    return 0
