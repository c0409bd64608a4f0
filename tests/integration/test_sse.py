"""Status streams: replay, resume, the end of a stream, slow clients, shutdown, and a
hub that misses nothing however transactions interleave."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg
import pytest

from tenantry import roles
from tenantry.app import Service
from tenantry.db import Executor
from tenantry.subscriber import KEEPALIVE, Subscriber
from tenantry.subscriber import Frame as QueuedFrame
from tests.helpers import (
    Frame,
    background_service,
    service_settings,
    sse_frames,
    wait_lock_waiter,
)

SIGN_UP = {"email": "lin@example.com", "tenant_name": "Streams Ltd", "plan": "free"}


@pytest.fixture
async def svc(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[Service]:
    # No worker for the onboarding queue: the tests write the events themselves.
    settings = service_settings(tmp_path, queues={"other": 1})
    async with background_service(settings, app_url, pool, worker_pool) as s:
        yield s


async def accepted(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.post("/v1/onboardings", json=SIGN_UP) as r:
        assert r.status == 202
        body: dict[str, Any] = await r.json()
        return body


async def emit(
    admin: Executor,
    body: dict[str, Any],
    version: int,
    event_type: str = "onboarding.step_completed",
) -> None:
    """Another writer appends the onboarding's next event (as provisioning would)."""
    await admin.execute(
        "SELECT tenantry.emit($1::uuid, 'onboarding', $2, $3, $4::jsonb, $5)",
        uuid.UUID(body["tenant_id"]),
        body["id"],
        event_type,
        {"step": f"s{version}"},
        version,
    )


class Stream:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self._frames = sse_frames(resp).__aiter__()

    async def next_event(self, timeout: float = 10) -> Frame:
        with anyio.fail_after(timeout):
            async for f in self._frames:
                if f.event is not None:
                    return f
        raise EOFError("the stream ended")

    async def ended(self, timeout: float = 10) -> bool:
        with anyio.fail_after(timeout):
            async for f in self._frames:
                assert f.event is None, f"unexpected event {f}"
        return True


async def test_replay_then_live_then_resume_then_the_end(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    body = await accepted(http)
    async with http.get(body["events_url"]) as r:
        s = Stream(r)
        assert (await s.next_event()).id == "1"  # replayed
        await emit(admin_pool, body, 2)
        await emit(admin_pool, body, 3)
        assert [(await s.next_event()).id for _ in range(2)] == ["2", "3"]  # live
    # Disconnected; an event happens meanwhile; the client resumes after 3.
    await emit(admin_pool, body, 4)
    async with http.get(body["events_url"], headers={"Last-Event-ID": "3"}) as r:
        s = Stream(r)
        f4 = await s.next_event()
        assert (f4.id, f4.data["step"]) == ("4", "s4")
        await emit(admin_pool, body, 5)
        assert (await s.next_event()).id == "5"
        await emit(admin_pool, body, 6, "onboarding.completed")
        end = await s.next_event()
        assert (end.id, end.event, end.data["version"]) == ("6", "onboarding.completed", 6)
        assert await s.ended()  # the server closes the stream after the terminal event
    async with http.get(body["events_url"], headers={"Last-Event-ID": "6"}) as r:
        assert r.status == 204  # EventSource stops reconnecting on 204
    # An earlier position still replays, up to the end.
    async with http.get(body["events_url"], params={"last_event_id": "4"}) as r:
        frames = [f async for f in sse_frames(r) if f.event]
    assert [f.id for f in frames] == ["5", "6"]


async def test_the_header_wins_over_the_query_and_bad_ids_are_refused(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    body = await accepted(http)
    await emit(admin_pool, body, 2)
    async with http.get(
        body["events_url"] + "&last_event_id=0", headers={"Last-Event-ID": "1"}
    ) as r:
        assert (await Stream(r).next_event()).id == "2"
    for bad in ("-1", "x", "1.5", "9" * 12):
        async with http.get(body["events_url"], headers={"Last-Event-ID": bad}) as r:
            assert r.status == 400, bad
            assert r.headers["Content-Type"] == "application/problem+json"


async def test_every_client_of_one_onboarding_gets_each_event_once(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    body = await accepted(http)
    async with http.get(body["events_url"]) as r1, http.get(body["events_url"]) as r2:
        s1, s2 = Stream(r1), Stream(r2)
        assert (await s1.next_event()).id == (await s2.next_event()).id == "1"
        for v in (2, 3, 4):
            await emit(admin_pool, body, v)
        got1 = [(await s1.next_event()).id for _ in range(3)]
        got2 = [(await s2.next_event()).id for _ in range(3)]
    assert got1 == got2 == ["2", "3", "4"]


async def test_shutdown_closes_every_stream_at_once(
    svc: Service, http: aiohttp.ClientSession
) -> None:
    body = await accepted(http)
    async with http.get(body["events_url"]) as r:
        s = Stream(r)
        await s.next_event()
        svc.hub.close_all()
        assert await s.ended(timeout=5)
    # A stream opened while shutting down ends at once too (the client goes elsewhere).
    async with http.get(body["events_url"], headers={"Last-Event-ID": "1"}) as r:
        assert await Stream(r).ended(timeout=5)


async def test_the_hub_encodes_an_event_once_for_all_its_clients(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    body = await accepted(http)
    tid, key = uuid.UUID(body["tenant_id"]), body["id"]
    with svc.hub.subscribe(tid, key) as a, svc.hub.subscribe(tid, key) as b:
        await emit(admin_pool, body, 2)
        seen_a = await _until(a, lambda seen: any(f[0] == 2 for f in seen))
        seen_b = await _until(b, lambda seen: any(f[0] == 2 for f in seen))
        # (Version 1 may come too: the hub re-reads recent rows; streams drop repeats.)
        fa, fb = ([f for f in seen if f[0] == 2] for seen in (seen_a, seen_b))
        assert len(fa) == len(fb) == 1
        assert fa[0][2] is fb[0][2]  # one bytes object, shared
        assert fa[0][1] is False  # not terminal


async def test_a_client_that_does_not_keep_up_is_cut_off(
    tmp_path: Path,
    app_url: str,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:
    settings = service_settings(tmp_path, queues={"other": 1}, sse_queue_size=2)
    async with (
        background_service(settings, app_url, pool, worker_pool) as svc,
        aiohttp.ClientSession(f"http://127.0.0.1:{svc.http.port}") as http,
    ):
        body = await accepted(http)
        aborted: list[bool] = []
        cut = anyio.Event()

        def abort() -> None:
            aborted.append(True)
            cut.set()

        with svc.hub.subscribe(uuid.UUID(body["tenant_id"]), body["id"], abort) as slow:
            for v in (2, 3, 4):
                await emit(admin_pool, body, v)
            # Nobody drains this stream: the third frame finds its queue full.
            with anyio.fail_after(10):
                await cut.wait()
            assert slow.closed and slow.reason == "slow client" and aborted == [True]
            assert len(slow.frames) == 2  # bounded: what came after never queued
            # Cut once, counted once, however many events come before it is gone.
            for v in (5, 6):
                await emit(admin_pool, body, v)
            await svc.hub.wait_reads(svc.hub.reads + 2)
            assert svc.hub.slow_cut == 1 and aborted == [True]


async def test_the_hub_misses_no_event_of_a_transaction_that_commits_late(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    """Outbox ids are taken before commit: a transaction holding a lower id can commit
    after a higher id was read.  Following by the snapshot horizon still delivers it."""
    early, late = await accepted(http), await accepted(http)
    async with (
        http.get(early["events_url"]) as r_early,
        http.get(late["events_url"]) as r_late,
        admin_pool.acquire() as slow_conn,
    ):
        s_early, s_late = Stream(r_early), Stream(r_late)
        await s_early.next_event()
        await s_late.next_event()
        tx = slow_conn.transaction()
        await tx.start()
        await emit(slow_conn, early, 2)  # lower id, not committed yet
        await emit(admin_pool, late, 2)  # higher id, committed now
        assert (await s_late.next_event()).id == "2"
        reads = svc.hub.reads
        await svc.hub.wait_reads(reads + 2)  # the hub has moved on past the higher id
        await tx.commit()
        assert (await s_early.next_event()).id == "2"


async def test_a_subscriber_queue_is_bounded_and_keepalives_count() -> None:
    aborted: list[int] = []
    sub = Subscriber((uuid.uuid4(), "x"), 2, lambda: aborted.append(1))
    waiting = sub.wait()
    assert not waiting.done()
    sub.push(0, False, KEEPALIVE)
    assert waiting.done()  # the writer wakes
    sub.push(1, False, b"one")
    assert not sub.closed and sub.wait().done()
    assert sub.drain() == [(0, False, KEEPALIVE), (1, False, b"one")]
    assert not sub.wait().done()  # nothing queued: the writer waits
    for v in (2, 3, 4):
        sub.push(v, False, b"%d" % v)
    assert sub.closed and sub.reason == "slow client" and aborted == [1]
    sub.push(5, True, b"late")
    assert [f[0] for f in sub.frames] == [2, 3]
    assert sub.wait().done()  # closed: the writer does not wait


async def _until(
    sub: Subscriber, predicate: Callable[[list[QueuedFrame]], bool], timeout: float = 10
) -> list[QueuedFrame]:
    """Take the subscriber's frames as it is woken for them (each push wakes it) until
    `predicate` holds for those taken so far; those frames."""
    seen: list[QueuedFrame] = []
    with anyio.fail_after(timeout):
        while not predicate(seen):
            await sub.wait()
            seen += sub.drain()
    return seen


async def test_an_idle_stream_gets_keepalive_comments(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    settings = service_settings(tmp_path, queues={"other": 1}, sse_keepalive=0.05)
    async with (
        background_service(settings, app_url, pool, worker_pool) as svc,
        aiohttp.ClientSession(f"http://127.0.0.1:{svc.http.port}") as http,
    ):
        body = await accepted(http)
        async with http.get(body["events_url"]) as r:
            comments = 0
            with anyio.fail_after(10):
                async for f in sse_frames(r):
                    comments += f.comment == "keepalive"
                    if comments == 2:
                        break
    assert comments == 2


async def _raw_stream(port: int, path: str, version: str, rcvbuf: int = 0) -> socket.socket:
    """A stream opened over a plain socket (`rcvbuf`: a small receive buffer, set before
    connecting, for a client that stops reading)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, f"GET {path} HTTP/{version}\r\nHost: t\r\n\r\n".encode())
    return sock


async def streams_ended(svc: Service, http: aiohttp.ClientSession, within: float) -> str:
    """Wait (woken by the hub's reads, one per poll) until the hub holds no stream, at
    most `within` seconds; then the service's /metrics text."""
    with anyio.fail_after(within):
        while svc.hub.clients:
            await svc.hub.wait_reads(svc.hub.reads + 1)
    async with http.get("/metrics") as r:
        return await r.text()


async def _read_until(sock: socket.socket, marker: bytes, got: bytearray) -> bytes:
    """Read into `got` until it holds `marker`; all read so far."""
    loop = asyncio.get_running_loop()
    with anyio.fail_after(10):
        while marker not in got:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise EOFError(f"the stream ended before {marker!r}: {bytes(got)!r}")
            got += data
    return bytes(got)


async def test_an_http_1_0_client_is_streamed_without_chunks(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    """Chunked coding is HTTP/1.1's: an HTTP/1.0 client's frames are written by its
    stream's task as they are (the hub writes chunks only to chunked responses), and
    its stream ends with its connection."""
    body = await accepted(http)
    assert svc.http.port is not None
    sock = await _raw_stream(svc.http.port, body["events_url"], "1.0")
    try:
        got = bytearray()
        head = await _read_until(sock, b"event: onboarding.accepted", got)
        assert b"transfer-encoding" not in head.lower()
        await emit(admin_pool, body, 2)
        text = await _read_until(sock, b"id: 2\nevent: onboarding.step_completed\n", got)
        assert b"\r\n" not in text.split(b"\r\n\r\n", 1)[1]  # no chunk sizes in the body
    finally:
        sock.close()


async def test_a_stream_written_by_the_hub_is_cut_off_when_its_client_stops_reading(
    tmp_path: Path,
    app_url: str,
    pool: asyncpg.Pool,
    worker_pool: asyncpg.Pool,
    admin_pool: asyncpg.Pool,
) -> None:
    """The hub writes an attached stream's frames to its transport itself; once the
    transport holds more than its high-water mark (the client reads nothing), frames
    queue, and a client `sse_queue_size` frames behind is cut off as before."""
    settings = service_settings(tmp_path, queues={"other": 1}, sse_queue_size=2)
    async with (
        background_service(settings, app_url, pool, worker_pool) as svc,
        aiohttp.ClientSession(f"http://127.0.0.1:{svc.http.port}") as http,
    ):
        body = await accepted(http)
        assert svc.http.port is not None
        sock = await _raw_stream(svc.http.port, body["events_url"], "1.1", rcvbuf=4096)
        try:
            await _read_until(sock, b"event: onboarding.accepted", bytearray())
            # From here on the client reads nothing.  Each event is 64 KiB: a few fill
            # the socket buffers and the transport's high-water mark.
            big = {"filler": "x" * 65536}
            version = 1
            with anyio.fail_after(30):
                while svc.hub.slow_cut == 0:
                    for _ in range(8):
                        version += 1
                        await admin_pool.execute(
                            "SELECT tenantry.emit($1::uuid, 'onboarding', $2,"
                            " 'onboarding.step_completed', $3::jsonb, $4)",
                            uuid.UUID(body["tenant_id"]),
                            body["id"],
                            big,
                            version,
                        )
                    await svc.hub.wait_reads(svc.hub.reads + 2)
            assert svc.hub.slow_cut == 1
            # Cut off: its connection is aborted and its stream is gone from the hub.
            with anyio.fail_after(10):
                while svc.hub.clients:
                    await svc.hub.wait_reads(svc.hub.reads + 1)
        finally:
            sock.close()


async def test_a_head_request_gets_the_headers_and_no_body(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    """HEAD answers as GET would, without a body: nothing of a stream (no retry line, no
    replay, no chunk the hub writes) follows its headers, so the connection is free for
    the client's next request."""
    body = await accepted(http)
    assert svc.http.port is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", svc.http.port))
        head_request = f"HEAD {body['events_url']} HTTP/1.1\r\nHost: t\r\n\r\n"
        await loop.sock_sendall(sock, head_request.encode())
        got = bytearray()
        head = await _read_until(sock, b"\r\n\r\n", got)
        assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head
        await emit(admin_pool, body, 2)  # an event the hub would write to a stream
        # The next request on the same connection: its answer is the next thing read.
        status_path = body["events_url"].replace("/events?", "?")
        await loop.sock_sendall(sock, f"GET {status_path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        after = bytearray(got.split(b"\r\n\r\n", 1)[1])
        with anyio.fail_after(10):
            while len(after) < len(b"HTTP/1.1 200 "):
                data = await loop.sock_recv(sock, 65536)
                assert data, f"the connection closed after {bytes(after)!r}"
                after += data
        assert after.startswith(b"HTTP/1.1 200 "), bytes(after[:200])
    finally:
        sock.close()


async def test_a_client_that_closes_an_idle_stream_is_let_go_at_once(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    """A browser closing a quiet stream (a tab closed, a reconnect storm) ends it when
    its connection is lost, not at the next keepalive write: with the keepalive an
    hour away, the stream, its subscription and the gauge are gone within seconds."""
    settings = service_settings(tmp_path, queues={"other": 1}, sse_keepalive=3600.0)
    async with (
        background_service(settings, app_url, pool, worker_pool) as svc,
        aiohttp.ClientSession(f"http://127.0.0.1:{svc.http.port}") as http,
    ):
        body = await accepted(http)
        assert svc.http.port is not None
        sock = await _raw_stream(svc.http.port, body["events_url"], "1.1")
        try:
            # Its replay read: from here on the stream is idle, written by the hub.
            await _read_until(sock, b"event: onboarding.accepted", bytearray())
            # Two reads of the hub later, nothing it had read (the accepted event, again)
            # is still on its way to the stream: the next write is the keepalive's.
            await svc.hub.wait_reads(svc.hub.reads + 2)
            assert svc.hub.clients == 1
        finally:
            sock.close()
        # Well under the keepalive interval: the lost connection itself ends it.
        text = await streams_ended(svc, http, within=5)
        assert "\ntenantry_sse_streams 0.0\n" in text


async def test_a_client_gone_before_its_stream_began_is_not_a_server_error(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    """A client that leaves while its stream's replay is read (a reload, a reconnect
    storm) was counted as a 503 once the replay came back: writing the headers to the
    closed connection raised an OSError, which the service takes for the database
    being away (a warning saying so, for each such client).  It is counted as 499."""
    body = await accepted(http)
    assert svc.http.port is not None
    async with admin_pool.acquire() as locker, locker.transaction():
        # The replay's read waits behind this lock until the client has gone.
        await locker.execute("LOCK TABLE tenantry.outbox IN ACCESS EXCLUSIVE MODE")
        sock = await _raw_stream(svc.http.port, body["events_url"], "1.1")
        await wait_lock_waiter(admin_pool, user=roles.DEFAULT_LOGIN)
        assert svc.hub.clients == 1
        sock.close()
    text = await streams_ended(svc, http, within=5)
    answered = [ln for ln in text.splitlines() if ln.startswith("tenantry_http_requests_total")]
    stream = [line for line in answered if "/events" in line]
    assert len(stream) == 1 and 'status="499"' in stream[0], stream


async def test_a_client_shown_steps_a_crash_lost_waits_for_them_to_be_done_again(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    """Regression (attack): the first group of steps commits without waiting for the
    disk, so a crash of the database may lose steps a stream had shown.  The client
    resumed from its last event, which the log no longer held, and was refused (400:
    "not an event of this stream"), which ends a browser's EventSource for good.  Now
    the stream is served, and waits until provisioning has done them again; then it
    goes on after the client's last event."""
    body = await accepted(http)
    await emit(admin_pool, body, 2)  # what the log holds after the crash: 1 and 2
    async with http.get(body["events_url"], headers={"Last-Event-ID": "4"}) as r:
        assert r.status == 200
        s = Stream(r)
        await emit(admin_pool, body, 3)  # done again
        await emit(admin_pool, body, 4)
        await emit(admin_pool, body, 5)
        assert (await s.next_event()).id == "5"
    # An id above what a crash can take back (the first group's versions: 2-6) is still
    # refused.
    async with http.get(body["events_url"], headers={"Last-Event-ID": "7"}) as r:
        assert r.status == 400


async def test_a_client_shown_steps_a_crash_lost_gets_the_end_that_came_instead(
    svc: Service, http: aiohttp.ClientSession, admin_pool: asyncpg.Pool
) -> None:
    """Done again after the crash, the onboarding ended below the client's last event
    (it failed): the client gets that end, not a stream that waits for ever."""
    body = await accepted(http)
    await admin_pool.execute(
        "UPDATE tenantry.onboardings SET state = 'failed', version = 2,"
        " failure_reason = 'email_rejected' WHERE id = $1",
        uuid.UUID(body["id"]),
    )
    await emit(admin_pool, body, 2, "onboarding.failed")
    async with http.get(body["events_url"], headers={"Last-Event-ID": "4"}) as r:
        assert r.status == 200
        s = Stream(r)
        end = await s.next_event()
        assert (end.id, end.event) == ("2", "onboarding.failed")
        assert await s.ended()
