"""Server-sent events at scale: --clients (20,000) concurrent streams on ONE `tenantry
run` process, its memory per idle stream, and status events commit -> client under load.

Set-up.  The onboardings are written straight into the database as the superuser (rows
in tenantry.onboardings plus their version-1 `onboarding.accepted` event through
tenantry.emit, in batches; no provisioning job), each with its status token signed here
with the service's TENANTRY_TOKEN_SECRET (service.onboarding.tokens.Signer).  The
service runs as bench.onboarding starts it (its own process, log level warning, the
default SSE settings unless --keepalive); the streams live in --load-processes (2)
separate processes (`python -m bench.sse --load ...`: aiohttp, no connection limit),
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
(b) latency.  --rate (1,000) events/s for --seconds (20), open loop, spread over the
    connected streams (a random order, round robin, each onboarding's next version),
    each `SELECT tenantry.emit(...)` in autocommit (its own transaction) on a pool of
    --pool superuser connections.  Its payload carries `sent` (time.time() just before
    the statement is sent) and a sequence number; the client parses the frame's data and
    takes now - sent: the headline, which covers the commit itself.  `commit returned ->
    client` subtracts the statement's round trip (the commit happened before it
    returned: a lower bound).  Lost: events committed but never received within
    --settle s after the last (expected 0).  The p99 of the events sent in each second
    (and the worst such second) shows whether latency comes in bursts: the keepalive
    round (every --keepalive s) writes a frame to every stream at once, and a full
    garbage collection of the service's heap stops its event loop.
(c) CPU.  The service's utime + stime over the event phase (first send to the last
    receipt) / events delivered, in microseconds; keepalive frames written meanwhile
    are reported beside it (they are part of that CPU).

Goals (DESIGN.md): p99 <= 50 ms commit -> client with 20k clients connected to one
process, none lost; <= 32 KiB per idle client including the hub.
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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import anyio
import anyio.abc
import asyncpg
import orjson
from anyio.streams.buffered import BufferedByteReceiveStream

from service import db
from service.onboarding.tokens import Signer

from . import common
from .common import Result, fmt_ms, progress
from .onboarding import (
    ROOT,
    CpuWindow,
    open_fds,
    own_cpu_seconds,
    postmaster_pid,
    raise_nofile,
    rss_kib,
    tenantry_service,
)

NAME = "sse"
GOAL_P99_MS = 50.0
GOAL_KIB_PER_CLIENT = 32.0
# Descriptors the service may open after start-up besides its streams (its pools grow
# to their maximum under the connect storm), with room to spare.
FD_SPARE = 32
BATCH = 2000
TOKEN_TTL = 86_400
WARMUP_STREAMS = 20
MAX_LINE = 256 * 1024 * 1024

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


def open_files_limit(pid: int) -> int:
    """A process's soft RLIMIT_NOFILE (/proc/<pid>/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError(f"no open-files limit for pid {pid}")


def _emit(out: Result) -> None:
    sys.stdout.buffer.write(orjson.dumps(out) + b"\n")
    sys.stdout.flush()


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


async def _command() -> str:
    line = await anyio.to_thread.run_sync(sys.stdin.readline)
    return str(line).strip()


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
        _emit({"event": "ready", "streams": len(paths)})
        if await _command() != "connect":
            tg.cancel_scope.cancel()
            return
        t0 = time.perf_counter()
        for i in range(len(paths)):
            tg.start_soon(clients.stream, http, i)
        await clients.attempted.wait()
        _emit(
            {
                "event": "connected",
                "seconds": time.perf_counter() - t0,
                "connect_s": clients.connect_s,
                "failed": list(clients.failed.items()),
            }
        )
        while (cmd := await _command()) == "count":
            _emit({"event": "counts", **clients.counts()})
        clients.stopping = True
        _emit(
            {
                "event": "done",
                **clients.counts(),
                "receipts": clients.received,
                "cpu_s": own_cpu_seconds(),
                "command": cmd,
            }
        )
        tg.cancel_scope.cancel()


def load_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sse --load")
    p.add_argument("--base-url", required=True)
    p.add_argument("--paths", required=True, help="a file: one events path per line")
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--source", default="", help="local address to connect from")
    a = p.parse_args(argv)
    paths = Path(a.paths).read_text().split()
    common.run_async(load_streams, a.base_url, paths, a.concurrency, a.source)
    return 0


class LoadProcess:
    """The parent's side of one load process."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        self._out = BufferedByteReceiveStream(proc.stdout)
        self._in = proc.stdin

    @classmethod
    async def start(
        cls, base_url: str, paths_file: Path, concurrency: int, source: str
    ) -> LoadProcess:
        argv = ["--base-url", base_url, "--paths", str(paths_file)]
        argv += ["--concurrency", str(concurrency), "--source", source]
        proc = await anyio.open_process(
            [sys.executable, "-m", "bench.sse", "--load", *argv], cwd=ROOT, stderr=None
        )
        return cls(proc)

    async def send(self, command: str) -> None:
        await self._in.send(command.encode() + b"\n")

    async def receive(self, event: str) -> Result:
        line = await self._out.receive_until(b"\n", MAX_LINE)
        msg: Result = orjson.loads(line)
        if msg.get("event") != event:
            raise RuntimeError(f"load process: expected {event!r}, got {msg.get('event')!r}")
        return msg

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            if self.proc.returncode is None:
                with anyio.move_on_after(30):
                    await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            await self.proc.aclose()


# --- the benchmark ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clients", type=int, default=None, help="concurrent streams (20000; quick 2000)"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second (1000)")
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
    env = {"TENANTRY_TOKEN_SECRET": secret}
    if args.keepalive is not None:
        env["TENANTRY_SSE_KEEPALIVE"] = f"{args.keepalive:g}"
    try:
        async with common.fresh_database(server_url, "sse") as url:
            conn = await db.connect(url)
            try:
                progress(f"sse: creating {clients:,} onboardings with their first event")
                streams = await create_onboardings(conn, clients)
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
    await warm_up(base_url, paths[:WARMUP_STREAMS])
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
                await LoadProcess.start(base_url, f, args.connect_concurrency, f"127.0.0.{i + 2}")
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
        before = await total_counts(loads)
        cpu = CpuWindow(pid, await postmaster_pid(url))
        for i, lp in enumerate(loads):
            cpu.extra[f"load{i}"] = lp.proc.pid
        progress(f"sse: {args.rate:g} events/s for {seconds:g} s")
        cpu.start()
        errors = await produce(
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
            counts = await total_counts(loads)
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
    if not s.get("n"):
        return f"  {label:<28} no samples"
    return (
        f"  {label:<28} p50 {fmt_ms(s['p50']):>7}  p90 {fmt_ms(s['p90']):>7}"
        f"  p99 {fmt_ms(s['p99']):>7}  max {fmt_ms(s['max']):>8} ms  (n={s['n']:,})"
    )


def _cores(cpu: Result) -> str:
    c = cpu["cores"]
    keys = [k for k in c if k not in ("other", "machine")] + ["other", "machine"]
    cores = ", ".join(f"{k} {c[k]:.2f}" for k in keys if k in c)
    return f"  CPU, cores used over {cpu['window_s']:g} s: {cores} (of {cpu['machine_cores']})"


def render(result: Result) -> str:
    lines = common.header(
        result,
        f"sse: {result['clients']:,} concurrent streams on one `tenantry run` process,"
        f" clients in {result['load_processes']} separate processes",
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
    lines.append(_cores(c["cpu"]))
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
        lines.append(_cores(lt["cpu"]))
    return "\n".join(lines)


BENCH = common.Bench(NAME, __doc__ or NAME, add_arguments, run, render)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--load"]:
        return load_main(args[1:])
    return common.main(BENCH, args)


if __name__ == "__main__":
    raise SystemExit(main())
