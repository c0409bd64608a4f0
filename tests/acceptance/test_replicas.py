"""Three real `tenantry run` replicas behind a round-robin proxy (tests/rrproxy.py), as a
load balancer would run them: sign-ups spread over all three, a stream resumes on
another replica, every job, periodic period and webhook delivery happens once; then the
replicas are restarted one by one (SIGTERM, exit, start, ready) while sign-ups keep
coming, and nothing is lost, doubled or left unfinished.

The client is a well-behaved one: it retries a request only when the answer carries
`Retry-After` (a draining replica's 503, the proxy's 502 for a replica that is gone),
after the seconds it says, with the same `Idempotency-Key`; it resumes a stream that
ends early with `Last-Event-ID`, as EventSource does.  Anything else it is answered
fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tenantry.jobs import queue as jobs
from tenantry.onboarding.model import STEPS
from tenantry.ops import operators as ops
from tenantry.tenants import store
from tests.acceptance.process import ServiceProcess
from tests.helpers import (
    TENANT_A,
    TEST_SECRET_KEY,
    TEST_TOKEN_SECRET,
    Frame,
    eventually,
    sse_frames,
)
from tests.receiver import Receiver, running_receiver
from tests.rrproxy import RoundRobinProxy

SLOTS = 3
EVENTS_PER_ONBOARDING = len(STEPS) + 1  # accepted, one per step (the last: completed)
# A modest load while the replicas restart: sign-ups (each followed over its stream),
# jobs and webhook events per second.
RATE = 6.0
# How long each replica's last job keeps it draining after SIGTERM: requests reach it
# meanwhile (the proxy still routes to it, as a load balancer does until it notices).
DRAIN_SECONDS = 1.5


def replica_env(data_dir: Path, slot: int) -> dict[str, str]:
    return {
        "TENANTRY_HANDLERS": "tests.acceptance.replica_handlers:registry",
        # One data folder for all (a shared volume): each welcome email is one file.
        "TENANTRY_DATA_DIR": str(data_dir),
        "TENANTRY_TOKEN_SECRET": TEST_TOKEN_SECRET,
        "TENANTRY_SECRET_KEY": TEST_SECRET_KEY,
        "TENANTRY_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
        "TENANTRY_WEBHOOK_ALLOW_HTTP": "true",
        # Every sign-up comes from the proxy's address.
        "TENANTRY_SIGNUP_RATE": "10000",
        "TENANTRY_SIGNUP_BURST": "10000",
        # A queue of this slot's own: the test can give one replica a job to finish.
        "TENANTRY_QUEUES": f"default=10,slot{slot}=1",
        "TENANTRY_SHUTDOWN_GRACE": "15",
        "TENANTRY_MAINTENANCE_INTERVAL": "0.5",
        "TENANTRY_LOG_LEVEL": "info",
    }


@dataclass
class Replica:
    slot: int
    database_url: str
    data_dir: Path
    proc: ServiceProcess | None = None
    port: int = 0
    generations: list[ServiceProcess] = field(default_factory=list)
    # More of the environment (a test's own settings).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, http: aiohttp.ClientSession) -> None:
        self.proc = await ServiceProcess.start(
            self.database_url, "--no-migrate", **replica_env(self.data_dir, self.slot), **self.env
        )
        self.generations.append(self.proc)
        self.port = await self.proc.started()

        async def ready() -> bool:
            async with http.get(f"{self.base}/readyz") as r:
                return r.status == 200

        await eventually(ready, timeout=30, every=0.05)

    async def stop(self) -> None:
        assert self.proc is not None
        self.proc.signal(signal.SIGTERM)
        assert await self.proc.wait_exit() == 0, self.proc.raw[-20:]

    async def metrics(self, http: aiohttp.ClientSession) -> dict[tuple[str, Any], float]:
        async with http.get(f"{self.base}/metrics") as r:
            assert r.status == 200
            text = await r.text()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@dataclass
class Refusal:
    status: int
    retry_after: str | None
    upstream: str | None
    path: str


class Client:
    """What a browser (the sign-up page and its EventSource) does, through the proxy."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base
        self.refusals: list[Refusal] = []
        self._n = itertools.count()

    async def _refused(self, r: aiohttp.ClientResponse) -> None:
        """A refusal: recorded, then waited out as it says, or the test fails."""
        self.refusals.append(
            Refusal(r.status, r.headers.get("Retry-After"), r.headers.get("X-Upstream"), r.url.path)
        )
        retry_after = r.headers.get("Retry-After")
        if retry_after is None or r.status not in (502, 503):
            raise AssertionError(f"{r.method} {r.url.path}: {r.status} {await r.text()}")
        await anyio.sleep(float(retry_after))

    async def sign_up(self) -> tuple[dict[str, Any], str]:
        """POST until accepted: the answer, and the replica that accepted it (behind
        the proxy)."""
        n = next(self._n)
        body = {"email": f"user{n}@example.com", "tenant_name": f"Replica Load {n}", "plan": "free"}
        key = str(uuid.uuid4())
        while True:
            async with self.http.post(
                f"{self.base}/v1/onboardings", json=body, headers={"Idempotency-Key": key}
            ) as r:
                if r.status == 202:
                    answer: dict[str, Any] = await r.json()
                    return answer, r.headers.get("X-Upstream", "")
                await self._refused(r)

    async def follow(self, events_url: str, frames: list[Frame] | None = None) -> list[Frame]:
        """The stream to its end, resuming after its last event each time it ends early."""
        frames = [] if frames is None else frames
        while not frames or frames[-1].event not in ("onboarding.completed", "onboarding.failed"):
            headers = {"Last-Event-ID": frames[-1].id or ""} if frames else {}
            async with self.http.get(f"{self.base}{events_url}", headers=headers) as r:
                if r.status == 204:
                    break  # EventSource stops: the end was seen (checked by the caller)
                if r.status != 200:
                    await self._refused(r)
                    continue
                # Cut mid-stream: what arrived counts, and the stream resumes after it.
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    async for f in sse_frames(r):
                        if f.event:
                            frames.append(f)
        return frames


async def sign_up_and_follow(client: Client) -> tuple[dict[str, Any], list[Frame]]:
    answer, _ = await client.sign_up()
    return answer, await client.follow(answer["events_url"])


def assert_whole(frames: list[Frame]) -> None:
    """Every event of the onboarding once, in order, ending completed."""
    assert [f.id for f in frames] == [str(v) for v in range(1, EVENTS_PER_ONBOARDING + 1)], [
        (f.id, f.event) for f in frames
    ]
    assert frames[-1].event == "onboarding.completed"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as r:
        yield r


async def emit_event(admin: asyncpg.Pool, tenant: uuid.UUID, n: int) -> None:
    await admin.execute(
        "SELECT tenantry.emit($1, 'order', $2, 'order.placed', jsonb_build_object('n', $3::int))",
        tenant,
        str(uuid.uuid4()),
        n,
    )


@pytest.mark.timeout(150)
async def test_three_replicas_behind_a_proxy_through_rolling_restarts(
    database_url: str,
    admin_pool: asyncpg.Pool,
    pool: asyncpg.Pool,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    await admin_pool.execute(
        "CREATE TABLE public.replica_runs (job_id bigint, kind text, phase text, period text,"
        " at timestamptz DEFAULT clock_timestamp());"
        " GRANT INSERT ON public.replica_runs TO tenantry_service"
    )
    replicas = [Replica(slot, database_url, tmp_path) for slot in range(SLOTS)]
    proxy = RoundRobinProxy(SLOTS)
    record_jobs: list[int] = []
    linger_jobs: list[int] = []
    emitted = 0
    async with proxy.running(), aiohttp.ClientSession() as http:
        try:
            async with anyio.create_task_group() as tg:
                for replica in replicas:
                    tg.start_soon(replica.start, http)
            for replica in replicas:
                proxy.set_upstream(replica.slot, replica.base)
            client = Client(http, proxy.url)
            hooks_tenant = (await store.create_tenant(admin_pool, name="Hooks Ltd")).id
            key = (await store.create_key(admin_pool, hooks_tenant)).secret
            async with http.post(
                f"{proxy.url}/v1/webhook-endpoints",
                json={"url": receiver.url("/hooks")},
                headers={"Authorization": f"Bearer {key}"},
            ) as r:
                assert r.status == 201, await r.text()

            # --- Spread: sign-ups over all three; each /metrics counts its own. -------
            accepted_by = [(await client.sign_up())[1] for _ in range(2 * SLOTS)]
            assert sorted(set(accepted_by)) == [str(s) for s in range(SLOTS)]
            for replica in replicas:
                got = await replica.metrics(http)
                mine = got[
                    (
                        "tenantry_http_requests_total",
                        (("method", "POST"), ("route", "/v1/onboardings"), ("status", "202")),
                    )
                ]
                assert mine == accepted_by.count(str(replica.slot))

            # --- A stream resumes on another replica, without gap or duplicate. -------
            answer, _ = await client.sign_up()
            async with http.get(f"{proxy.url}{answer['events_url']}") as r:
                assert r.status == 200
                first_upstream = r.headers["X-Upstream"]
                start = [f async for f in _until_event(sse_frames(r))]
            async with http.get(
                f"{proxy.url}{answer['events_url']}", headers={"Last-Event-ID": start[-1].id or ""}
            ) as r:
                assert r.status == 200
                assert r.headers["X-Upstream"] != first_upstream
                rest = [f async for f in sse_frames(r) if f.event]
            assert_whole(start + rest)

            # --- Rolling restarts under load. -----------------------------------------
            done = anyio.Event()
            flows: list[asyncio.Task[tuple[dict[str, Any], list[Frame]]]] = []

            async def load() -> None:
                nonlocal emitted
                while not done.is_set():
                    flows.append(asyncio.create_task(sign_up_and_follow(client)))
                    record_jobs.append(
                        await jobs.enqueue(pool, tenant_id=TENANT_A, kind="replica.record")
                    )
                    await emit_event(admin_pool, hooks_tenant, emitted)
                    emitted += 1
                    await anyio.sleep(1 / RATE)

            # The periodic job runs from the first boundary after its deployment on.
            await eventually(_ticked(admin_pool), timeout=10)
            restarts_began = await admin_pool.fetchval("SELECT now()")
            async with anyio.create_task_group() as tg:
                tg.start_soon(load)
                for replica in replicas:
                    # A job only this replica runs: it drains for that long after SIGTERM.
                    job = await jobs.enqueue(
                        pool,
                        tenant_id=TENANT_A,
                        kind="replica.linger",
                        queue=f"slot{replica.slot}",
                        payload={"seconds": DRAIN_SECONDS},
                    )
                    linger_jobs.append(job)
                    await eventually(_started(admin_pool, job), timeout=20)
                    await replica.stop()
                    # Gone: out of the rotation (the proxy would also notice on its own).
                    proxy.set_upstream(replica.slot, None)
                    await replica.start(http)
                    proxy.set_upstream(replica.slot, replica.base)
                done.set()
            restarts_ended = await admin_pool.fetchval("SELECT now()")
            with anyio.fail_after(60):
                outcomes = await asyncio.gather(*flows)

            # --- Everything happened, once. --------------------------------------------
            async def all_settled() -> bool:
                left = await admin_pool.fetchval(
                    "SELECT count(*) FROM tenantry.jobs WHERE kind <> 'replica.tick'"
                )
                delivered = await admin_pool.fetchval(
                    "SELECT count(*) FROM tenantry.webhook_deliveries WHERE state = 'delivered'"
                )
                return bool(left == 0 and delivered == emitted)

            await eventually(all_settled, timeout=30, every=0.1)
            metrics_after = [await r.metrics(http) for r in replicas]
        finally:
            for replica in replicas:
                for proc in replica.generations:
                    if proc.proc.returncode is None:
                        proc.signal(signal.SIGTERM)
            for replica in replicas:
                for proc in replica.generations:
                    try:
                        await proc.wait_exit(timeout=20)
                    finally:
                        await proc.kill()

    # Sign-ups: every 202 ended completed, each streamed whole through the restarts.
    for _, followed in outcomes:
        assert_whole(followed)
    ids = {uuid.UUID(a["id"]) for a, _ in outcomes}
    states = await admin_pool.fetch("SELECT id, state FROM tenantry.onboardings")
    assert {r["state"] for r in states} == {"completed"}
    assert ids <= {r["id"] for r in states}
    assert len(states) == len(outcomes) + 2 * SLOTS + 1  # and no sign-up made twice
    assert len(list((tmp_path / "mail").glob("*.eml"))) == len(states)
    # Refusals: only ever with Retry-After, and the draining replicas did refuse.
    assert client.refusals, "no request reached a draining replica"
    assert all(r.retry_after is not None for r in client.refusals), client.refusals
    assert any(r.status == 503 for r in client.refusals), client.refusals
    # Jobs: each started once and completed once.
    runs = await admin_pool.fetch(
        "SELECT job_id, kind, phase, period FROM public.replica_runs ORDER BY at"
    )
    for kind, enqueued in (("replica.record", record_jobs), ("replica.linger", linger_jobs)):
        for phase in ("started", "completed"):
            seen = sorted(r["job_id"] for r in runs if r["kind"] == kind and r["phase"] == phase)
            assert seen == sorted(enqueued), (kind, phase)
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.dead_jobs") == 0
    # Periodic: each period once, none skipped, though every replica restarted.
    ticks = [r["period"] for r in runs if r["kind"] == "replica.tick" and r["phase"] == "started"]
    assert len(ticks) == len(set(ticks)), ticks
    periods = sorted(datetime.fromisoformat(p) for p in ticks)
    assert all((b - a).total_seconds() == 1 for a, b in itertools.pairwise(periods)), periods
    # ... from before the first restart to the period the last one ended in.
    assert periods[0] <= restarts_began, (periods, restarts_began)
    assert periods[-1] >= restarts_ended - timedelta(seconds=1), (periods, restarts_ended)
    # Webhooks: each event delivered once to the endpoint.
    hooks = receiver.at("/hooks")
    assert len(hooks) == len({h.webhook_id for h in hooks}) == emitted
    assert sorted(h.json()["data"]["n"] for h in hooks) == list(range(emitted))
    # Each new process answers /metrics with its own counts.
    for got in metrics_after:
        assert any(name == "tenantry_http_requests_total" for name, _ in got)


async def _until_event(frames: AsyncIterator[Frame]) -> AsyncIterator[Frame]:
    """The stream's frames up to its first event (the stream is then left)."""
    async for f in frames:
        if f.event:
            yield f
            return


def _started(admin: asyncpg.Pool, job_id: int) -> Any:
    async def check() -> bool:
        n = await admin.fetchval(
            "SELECT count(*) FROM public.replica_runs WHERE job_id = $1 AND phase = 'started'",
            job_id,
        )
        return bool(n)

    return check


@pytest.mark.timeout(60)
async def test_a_draining_replica_refuses_new_requests_and_ends_its_streams_cleanly(
    database_url: str, admin_pool: asyncpg.Pool, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """From SIGTERM to its exit (here: while its last job finishes), a replica answers
    new requests 503 problem JSON with Retry-After and closes their connection; its
    probes and /metrics still answer; a stream open at the signal ends cleanly (a
    complete chunked body, not a reset), so the client resumes elsewhere."""
    await admin_pool.execute(
        "CREATE TABLE public.replica_runs (job_id bigint, kind text, phase text, period text,"
        " at timestamptz DEFAULT clock_timestamp());"
        " GRANT INSERT ON public.replica_runs TO tenantry_service"
    )
    replica = Replica(0, database_url, tmp_path)
    async with aiohttp.ClientSession() as http:
        await replica.start(http)
        assert replica.proc is not None
        try:
            # Provisioning paused: the sign-up stays `accepted`, so its stream is still
            # open at the signal (it ended with the onboarding's completion before the
            # signal, and the late sign-up below could beat the drain).
            await admin_pool.execute(
                "SELECT tenantry.set_queue_control('default', true, NULL, false, 'test')"
            )
            client = Client(http, replica.base)
            answer, _ = await client.sign_up()
            job = await jobs.enqueue(
                pool,
                tenant_id=TENANT_A,
                kind="replica.linger",
                queue="slot0",
                payload={"seconds": 600},
            )
            await eventually(_started(admin_pool, job), timeout=20)
            async with http.get(
                f"{replica.base}{answer['events_url']}", headers={"Last-Event-ID": "1"}
            ) as stream:
                assert stream.status == 200
                replica.proc.signal(signal.SIGTERM)
                with anyio.fail_after(10):
                    # Read to its end: a reset would raise ClientPayloadError here.
                    frames = [f async for f in sse_frames(stream)]
                # Ended by the drain, not by the onboarding's end.
                assert all(f.event != "onboarding.completed" for f in frames)
            async with http.post(
                f"{replica.base}/v1/onboardings",
                json={"email": "late@example.com", "tenant_name": "Too Late", "plan": "free"},
            ) as r:
                assert r.status == 503
                assert r.headers["Retry-After"] == "1"
                assert r.headers["Connection"] == "close"
                assert r.content_type == "application/problem+json"
                assert (await r.json())["status"] == 503
            async with http.get(f"{replica.base}{answer['events_url']}") as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
            async with http.get(f"{replica.base}/readyz") as r:
                assert r.status == 503
            for path in ("/healthz", "/metrics"):
                async with http.get(f"{replica.base}{path}") as r:
                    assert r.status == 200, path
            replica.proc.signal(signal.SIGTERM)  # no need to wait out the job
            assert await replica.proc.wait_exit() == 0
        finally:
            await replica.proc.kill()
    # Nothing the refused sign-up could have written.
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.onboardings") == 1


@pytest.mark.timeout(60)
async def test_a_request_whose_body_is_still_arriving_at_sigterm_is_answered(
    database_url: str, admin_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Nothing runs, so the process has nothing else to wait for: a sign-up that got in
    before SIGTERM, its body still on the way (a slow client), is read to its end and
    answered before the process closes its connections (it was cut: no answer at all,
    the handler cancelled after the HTTP server's 2 s)."""
    replica = Replica(0, database_url, tmp_path)
    async with aiohttp.ClientSession() as http:
        await replica.start(http)
        assert replica.proc is not None
        try:
            body = json.dumps(
                {"email": "slow@example.com", "tenant_name": "Slow Inc", "plan": "free"}
            ).encode()
            head = (
                "POST /v1/onboardings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
            writer.write(head + body[:10])
            await writer.drain()
            # A round trip through the server's loop: the slow request's head is read.
            async with http.get(f"{replica.base}/healthz") as r:
                assert r.status == 200
            replica.proc.signal(signal.SIGTERM)
            line = await replica.proc.wait_log("http_draining")
            assert line["requests"] == 1
            writer.write(body[10:])
            await writer.drain()
            with anyio.fail_after(10):
                answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 202 "), answer[:300]
            assert await replica.proc.wait_exit() == 0
        finally:
            await replica.proc.kill()
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.onboardings") == 1


@pytest.mark.timeout(60)
async def test_a_draining_replica_ends_the_dashboards_stream_and_answers_preflights(
    database_url: str,
    admin_pool: asyncpg.Pool,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    """At SIGTERM the dashboard's live stream (/ops/events) ends at once and cleanly, as
    the tenants' streams do (it stayed open until the exit, then was cut mid-chunk);
    and a cross-origin page's preflight is still answered, so that the page reads the
    503 and its Retry-After that its request then gets (a refused preflight is only a
    network error to the page: it cannot see why, nor when to retry)."""
    origin = "https://app.example.com"
    await admin_pool.execute(
        "CREATE TABLE public.replica_runs (job_id bigint, kind text, phase text, period text,"
        " at timestamptz DEFAULT clock_timestamp());"
        " GRANT INSERT ON public.replica_runs TO tenantry_service"
    )
    replica = Replica(0, database_url, tmp_path, env={"TENANTRY_CORS_ORIGINS": origin})
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        await replica.start(http)
        assert replica.proc is not None
        try:
            key = await ops.add(worker_pool, "alice", "read")
            async with http.post(
                f"{replica.base}/ops/sign-in", data={"key": key}, allow_redirects=False
            ) as r:
                assert r.status == 303
            job = await jobs.enqueue(
                pool,
                tenant_id=TENANT_A,
                kind="replica.linger",
                queue="slot0",
                payload={"seconds": 600},
            )
            await eventually(_started(admin_pool, job), timeout=20)
            async with http.get(f"{replica.base}/ops/events") as stream:
                assert stream.status == 200
                assert await stream.content.readline() == b"retry: 3000\n"
                replica.proc.signal(signal.SIGTERM)
                with anyio.fail_after(10):
                    # Read to its end: a reset would raise ClientPayloadError here.
                    await stream.read()
            async with http.options(
                f"{replica.base}/v1/onboardings",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type, idempotency-key",
                },
            ) as r:
                assert r.status == 200
                assert r.headers["Access-Control-Allow-Origin"] == origin
                assert r.headers["Connection"] == "close"
            async with http.post(
                f"{replica.base}/v1/onboardings",
                json={"email": "late@example.com", "tenant_name": "Too Late", "plan": "free"},
                headers={"Origin": origin},
            ) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                assert r.headers["Access-Control-Allow-Origin"] == origin
                assert "Retry-After" in r.headers["Access-Control-Expose-Headers"]
            replica.proc.signal(signal.SIGTERM)  # no need to wait out the job
            assert await replica.proc.wait_exit() == 0
        finally:
            await replica.proc.kill()


def _ticked(admin: asyncpg.Pool) -> Any:
    async def check() -> bool:
        n = await admin.fetchval(
            "SELECT count(*) FROM public.replica_runs WHERE kind = 'replica.tick'"
        )
        return bool(n)

    return check
