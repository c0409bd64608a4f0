"""The load side of bench.sse: the onboardings it streams (written straight into the
database, with their first event), the load processes holding the streams (`python -m
bench.sse --load ...`: each stream's first event awaited, then every event's latency
recorded from the `sent` in its payload), and the open-loop producer of events.
"""

from __future__ import annotations

import argparse
import gc
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import anyio
import asyncpg
import orjson

from tenantry.onboarding.tokens import Signer

from . import common
from .common import Result
from .service_proc import LoadProcess, emit_line, own_cpu_seconds, raise_nofile, read_command

BATCH = 2000

CREATE = """
WITH o AS (
    INSERT INTO tenantry.onboardings (tenant_id, id, email, tenant_name, plan)
    SELECT u.t, u.i, 'sse-' || u.n || '@example.com', 'SSE bench ' || u.n, 'free'
      FROM unnest($1::uuid[], $2::uuid[], $3::integer[]) AS u(t, i, n)
    RETURNING tenant_id, id, created_at
)
SELECT o.tenant_id, o.id, o.created_at,
       tenantry.emit(o.tenant_id, 'onboarding', o.id::text, 'onboarding.accepted',
                     '{"state": "accepted"}'::jsonb, 1) AS event_id
  FROM o
"""
EMIT = (
    "SELECT tenantry.emit($1::uuid, 'onboarding', $2::text, 'onboarding.step_completed',"
    " $3::jsonb, $4::integer)"
)


@dataclass(frozen=True)
class Stream:
    tenant_id: uuid.UUID
    onboarding_id: uuid.UUID
    created_at: datetime

    def path(self, signer: Signer) -> str:
        token = signer.issue(self.onboarding_id, self.tenant_id, self.created_at)
        return f"/v1/onboardings/{self.onboarding_id}/events?token={token}"


async def create_onboardings(conn: asyncpg.Connection, n: int) -> list[Stream]:
    streams: list[Stream] = []
    for start in range(0, n, BATCH):
        size = min(BATCH, n - start)
        tenants = [uuid.uuid4() for _ in range(size)]
        ids = [uuid.uuid4() for _ in range(size)]
        async with conn.transaction():
            rows = await conn.fetch(CREATE, tenants, ids, list(range(start, start + size)))
        streams += [Stream(r["tenant_id"], r["id"], r["created_at"]) for r in rows]
    await conn.execute("VACUUM ANALYZE tenantry.onboardings, tenantry.outbox")
    return streams


async def warm_up(base_url: str, paths: list[str]) -> None:
    """Open a few streams and close them: the code paths of a stream are loaded before
    the baseline RSS is taken."""
    async with aiohttp.ClientSession(base_url) as http:
        for path in paths:
            async with http.get(path) as resp:
                while b"event: onboarding.accepted" not in await resp.content.readuntil(b"\n\n"):
                    pass


# --- the load process: streams ------------------------------------------------------------


class Clients:
    """This process's streams: connect them, then record each event's latency."""

    def __init__(self, paths: list[str], concurrency: int) -> None:
        self.paths = paths
        self.sem = anyio.Semaphore(concurrency)
        self.connect_s: list[float] = []
        self.failed: dict[int, str] = {}  # local index -> why
        self.received: list[tuple[int, float]] = []  # (seq, now - sent)
        self.keepalives = 0
        self.ended = 0  # streams the server ended before the stop
        self.attempted = anyio.Event()
        self.stopping = False

    async def _open(self, http: aiohttp.ClientSession, index: int) -> aiohttp.ClientResponse | None:
        """GET a stream and read it up to its first event (the replayed version 1, after
        `retry:`); None when that failed (recorded)."""
        try:
            resp = await http.get(self.paths[index])
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.failed[index] = type(exc).__name__
            return None
        try:
            if resp.status != 200:
                self.failed[index] = f"HTTP {resp.status}"
            else:
                while b"event: onboarding.accepted" not in (
                    frame := await resp.content.readuntil(b"\n\n")
                ):
                    if not frame:
                        self.failed[index] = "ended"
                        break
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.failed[index] = type(exc).__name__
        if index in self.failed:
            resp.release()
            return None
        return resp

    async def stream(self, http: aiohttp.ClientSession, index: int) -> None:
        async with self.sem:
            t0 = time.perf_counter()
            resp = await self._open(http, index)
            if resp is not None:
                self.connect_s.append(time.perf_counter() - t0)
            if len(self.connect_s) + len(self.failed) == len(self.paths):
                self.attempted.set()
        if resp is None:
            return
        try:
            while frame := await resp.content.readuntil(b"\n\n"):
                now = time.time()
                if frame[:1] == b":":
                    self.keepalives += 1
                    continue
                at = frame.find(b"data: ")
                if at < 0:
                    continue
                data = orjson.loads(frame[at + 6 : frame.index(b"\n", at)])
                seq = data.get("seq")
                if seq is not None:
                    self.received.append((seq, now - data["sent"]))
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass
        finally:
            resp.release()
        if not self.stopping:
            self.ended += 1

    def counts(self) -> Result:
        return {"received": len(self.received), "keepalives": self.keepalives, "ended": self.ended}


async def load_streams(base_url: str, paths: list[str], concurrency: int, source: str) -> None:
    """Protocol on stdin/stdout, one line each: -> ready; `connect` -> connected;
    `count` -> counts (repeatable); `stop` -> done (with every receipt)."""
    raise_nofile(len(paths) + 100)
    clients = Clients(paths, concurrency)
    connector = aiohttp.TCPConnector(
        limit=0, local_addr=(source, 0) if source else None, enable_cleanup_closed=False
    )
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
    async with (
        aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as http,
        anyio.create_task_group() as tg,
    ):
        emit_line({"event": "ready", "streams": len(paths)})
        if await read_command() != "connect":
            tg.cancel_scope.cancel()
            return
        t0 = time.perf_counter()
        for i in range(len(paths)):
            tg.start_soon(clients.stream, http, i)
        await clients.attempted.wait()
        # The streams are open: from here on this process only receives.  Its collector
        # is kept out of the measurement: with 10,000 client streams in one process,
        # its older-generation collections stopped it for 30-100 ms a few times a run,
        # and every event that arrived meanwhile was timed as late (a browser holds
        # one stream, not 10,000).  What is alive now is frozen, and nothing is
        # collected until the stop (the receipts are all that grows meanwhile).
        gc.collect()
        gc.freeze()
        gc.disable()
        emit_line(
            {
                "event": "connected",
                "seconds": time.perf_counter() - t0,
                "connect_s": clients.connect_s,
                "failed": list(clients.failed.items()),
            }
        )
        while (cmd := await read_command()) == "count":
            emit_line({"event": "counts", **clients.counts()})
        clients.stopping = True
        gc.enable()
        emit_line(
            {
                "event": "done",
                **clients.counts(),
                "receipts": clients.received,
                "cpu_s": own_cpu_seconds(),
                "command": cmd,
            }
        )
        tg.cancel_scope.cancel()


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sse --load")
    p.add_argument("--base-url", required=True)
    p.add_argument("--paths", required=True, help="a file: one events path per line")
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--source", default="", help="local address to connect from")
    a = p.parse_args(argv)
    paths = Path(a.paths).read_text().split()
    common.run_async(load_streams, a.base_url, paths, a.concurrency, a.source)
    return 0


# --- the parent's side ---------------------------------------------------------------------


async def start(base_url: str, paths_file: Path, concurrency: int, source: str) -> LoadProcess:
    """A load process for the streams listed in `paths_file`, connecting from `source`."""
    argv = ["--base-url", base_url, "--paths", str(paths_file)]
    argv += ["--concurrency", str(concurrency), "--source", source]
    return await LoadProcess.start("bench.sse", argv)


async def produce(
    pool: asyncpg.Pool,
    *,
    streams: list[Stream],
    order: list[int],
    rate: float,
    seconds: float,
    sent_at: list[float],
    committed_at: list[float],
) -> Counter[str]:
    """Open loop: event i due at start + i / rate, to stream order[i % n], version
    2 + i // n; each its own transaction.  One writer per aggregate, as in the service:
    an onboarding's next event is sent once its previous one committed (the hub drops
    a version older than one it has already fanned out)."""
    n_events = round(rate * seconds)
    n = len(order)
    errors: Counter[str] = Counter()
    done = [anyio.Event() for _ in range(n_events)]

    async def send(i: int) -> None:
        try:
            await _send(i)
        finally:
            done[i].set()

    async def _send(i: int) -> None:
        s = streams[order[i % n]]
        version = 2 + i // n
        if i >= n:
            await done[i - n].wait()
        async with pool.acquire() as conn:
            sent = time.time()
            try:
                await conn.fetchval(
                    EMIT, s.tenant_id, str(s.onboarding_id), {"seq": i, "sent": sent}, version
                )
            except asyncpg.PostgresError as exc:
                errors[type(exc).__name__] += 1
                return
            committed_at[i] = time.time()
            sent_at[i] = sent

    async with anyio.create_task_group() as tg:
        start = time.perf_counter()
        for i in range(n_events):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            tg.start_soon(send, i)
    return errors


async def total_counts(loads: list[LoadProcess]) -> Result:
    for lp in loads:
        await lp.send("count")
    totals: Counter[str] = Counter()
    for lp in loads:
        msg = await lp.receive("counts")
        for k in ("received", "keepalives", "ended"):
            totals[k] += int(msg[k])
    return dict(totals)
