"""Clients that behave like real ones, for tests that disturb the service while they
work: sign-ups that retry a 503 with their Idempotency-Key, status streams that
reconnect like a browser's EventSource (with Last-Event-ID), and a producer of jobs
whose handler records every run, so that "exactly once" can be counted."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
import asyncpg

from tenantry.jobs import queue as jobs
from tests.helpers import sse_frames

TERMINAL = ("onboarding.completed", "onboarding.failed")
RETRYABLE = (aiohttp.ClientError, OSError, TimeoutError)


@dataclass
class Browser:
    """Sign-ups and their streams, spread over `bases` (a load balancer's backends:
    `bases()` is asked again for each request, so a backend can come and go)."""

    bases: Callable[[], Sequence[str]]
    statuses: Counter[int] = field(default_factory=Counter)
    reconnects: int = 0

    def _base(self) -> str:
        return random.choice(list(self.bases()))

    async def sign_up(self, n: int, timeout: float = 60) -> dict[str, Any]:
        body = {"email": f"user{n}@example.com", "tenant_name": f"Tenant {n}", "plan": "free"}
        key = str(uuid.uuid4())
        delay = 0.05
        with anyio.fail_after(timeout):
            while True:
                try:
                    async with (
                        aiohttp.ClientSession() as http,
                        http.post(
                            f"{self._base()}/v1/onboardings",
                            json=body,
                            headers={"Idempotency-Key": key},
                        ) as r,
                    ):
                        self.statuses[r.status] += 1
                        if r.status == 202:
                            answer: dict[str, Any] = await r.json()
                            return answer
                        assert r.status == 503, f"sign-up answered {r.status}: {await r.text()}"
                except RETRYABLE:
                    self.statuses[0] += 1  # no answer at all (a process gone)
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def follow(self, answer: dict[str, Any], timeout: float = 90) -> list[str]:
        """The stream's event types, as an EventSource would have shown them: across
        reconnects, resumed from the last id, until the terminal event."""
        seen: list[str] = []
        last = "0"
        with anyio.fail_after(timeout):
            while True:
                try:
                    async with (
                        aiohttp.ClientSession() as http,
                        http.get(
                            f"{self._base()}{answer['events_url']}",
                            headers={"Last-Event-ID": last},
                        ) as r,
                    ):
                        self.statuses[r.status] += 1
                        if r.status == 204:
                            return seen  # the end was seen before
                        if r.status == 200:
                            async for f in sse_frames(r):
                                if f.event is None:
                                    continue
                                assert f.id is not None and int(f.id) > int(last), (f, last)
                                last = f.id
                                seen.append(f.event)
                                if f.event in TERMINAL:
                                    return seen
                        else:
                            assert r.status == 503, f"stream answered {r.status}"
                except RETRYABLE:
                    pass
                self.reconnects += 1
                await anyio.sleep(0.2 + random.random() * 0.3)  # EventSource's retry


@dataclass
class Producer:
    """Enqueues `record` jobs (tests.acceptance.handlers) numbered 0, 1, ..., retrying
    its own enqueue when the database is away, as a real producer would.  (When the
    answer to a COMMIT is lost, the retry makes a second job of the same number: the
    producer's own at-least-once, which the checks allow.)"""

    pool: asyncpg.Pool
    tenants: Sequence[uuid.UUID]
    count: int = 0

    async def run(self, count: int, every: float = 0.02) -> None:
        for i in range(count):
            tenant = self.tenants[i % len(self.tenants)]
            while True:
                try:
                    await jobs.enqueue(self.pool, tenant_id=tenant, kind="record", payload={"n": i})
                    break
                except Exception:  # the database away: what a real producer retries
                    await anyio.sleep(0.1)
            self.count = i + 1
            await anyio.sleep(every)


async def assert_no_effect_twice(admin: asyncpg.Pool | asyncpg.Connection) -> None:
    rows = await admin.fetch(
        "SELECT job_id, count(*) AS n FROM public.acceptance_log GROUP BY 1 HAVING count(*) > 1"
    )
    assert not rows, f"jobs whose effects happened more than once: {[tuple(r) for r in rows]}"


async def all_ran_once(admin: asyncpg.Pool | asyncpg.Connection, numbers: set[int]) -> bool:
    """Whether every job's effects happened exactly once (an assertion), and every
    number in `numbers` ran."""
    await assert_no_effect_twice(admin)
    ran = {r["n"] for r in await admin.fetch("SELECT DISTINCT n FROM public.acceptance_log")}
    return numbers <= ran


ACCEPTANCE_LOG = (
    "CREATE TABLE IF NOT EXISTS public.acceptance_log (job_id bigint, attempt int, n int);"
    " GRANT INSERT ON public.acceptance_log TO tenantry_service"
)
