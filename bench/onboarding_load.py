"""The load process of bench.onboarding (`python -m bench.onboarding --load open|follow
...`): (a) POSTs on an open-loop schedule, (b) sign-ups each followed over its events
stream to `onboarding.completed`.  It prints one JSON object, its CPU time included.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aiohttp
import anyio
import orjson

from . import common
from .common import Result
from .service_proc import own_cpu_seconds


def sign_up_body(tag: str, i: int) -> bytes:
    return orjson.dumps(
        {"email": f"{tag}-{i}@example.com", "tenant_name": f"Bench {tag} {i}", "plan": "free"}
    )


_JSON = {"Content-Type": "application/json"}


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
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as http:

        async def one(i: int, due: float) -> None:
            lag[i] = time.perf_counter() - due
            try:
                async with http.post(
                    "/v1/onboardings", data=sign_up_body(tag, i), headers=_JSON
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
    measured_start = start + n_warm * interval
    ok = [x for x in latency[n_warm:] if x is not None]
    last = max(done_at[n_warm:], default=measured_start)
    return {
        "sent": n - n_warm,
        "warmup_sent": n_warm,
        "outcomes": dict(outcomes),
        "latency_s": ok,
        "send_lag_s": lag[n_warm:],
        "window_s": last - measured_start,
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
                    "/v1/onboardings", data=sign_up_body(tag, i), headers=_JSON
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
