"""The SSE hub: one per process, it follows the outbox for every stream this process
serves and fans each event out to the streams of its aggregate.

Wake-ups come from the listener's one connection (NOTIFY on `tenantry_outbox`); each
wake-up is one query for all subscribed aggregates (`outbox.follow`, which reads what
the previous read's snapshot could not see: nothing committed since is missed, nothing
is read twice); after the last of a run of wake-ups, one trailing read once the
throttle window has passed, and a jittered poll in case a notification was lost.
An event is encoded once, however many clients follow it.  Every client has a bounded
queue: one that cannot keep up is disconnected and resumes from its last event id,
instead of growing the process's memory.
"""

from __future__ import annotations

import gc
import heapq
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus
from asyncpg.pool import PoolConnectionProxy

from . import logging as log
from .clock import Clock, Random, SystemClock, system_random
from .outbox import store as outbox
from .outbox.store import Event
from .safetext import safe_text
from .subscriber import (
    KEEPALIVE,
    KEEPALIVE_CHUNK,
    SLOW_CLIENT,
    StreamKey,
    Subscriber,
    chunk,
    encode,
)

# Errors that mean the database is away or the connection broke: expected, no traceback.
_CONNECTION_TROUBLE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

# A read returning more than this many rows is worth a warning: the hub fell behind
# (the database was away for a while, or a burst of events).
_LARGE_READ = 10_000

# With no stream to serve, a read only moves the snapshot forward (so that the first
# read after a stream opens has little to catch up on): at most one read per this many
# seconds while wake-ups come, and one per poll after them.  Under a steady flow of
# events a process without streams (a worker, or a web process between visitors) took a
# snapshot on every notification and once more after each: 4-6% of its CPU while it
# provisioned sign-ups.
IDLE_REFRESH_S = 0.1


# Why a stream ends when the server may have handed out transaction ids again (below).
IDS_WENT_BACK = "the database lost its latest transactions: resume from the last event"


def _xmax(snapshot: str) -> int:
    """The first transaction id a snapshot ("xmin:xmax:xip,...") saw as not yet given."""
    return int(snapshot.split(":", 2)[1])


def _ids_may_have_gone_back(previous: outbox.Position | None, now: outbox.Position) -> bool:
    """Whether the server may give out transaction ids that `previous` saw as given (see
    outbox.Position): its epoch changed (a crash's recovery, another server), or, for
    good measure, it gives out ids below the previous snapshot's."""
    return previous is not None and (
        now.server_epoch != previous.server_epoch or _xmax(now.snapshot) < _xmax(previous.snapshot)
    )


def _each(subs: Subscriber | set[Subscriber]) -> tuple[Subscriber, ...]:
    """The streams of an aggregate, as a copy: pushing may end one (a slow client)."""
    return (subs,) if isinstance(subs, Subscriber) else tuple(subs)


class CollectorTuning:
    """The garbage collector's settings for a process that holds many streams, and
    only while it does.

    With 20,000 open streams, a full collection walked every one of them: 2.3 s with
    the loop stopped, every 20-30 s under 1,000 events/s, because objects in flight for
    a moment (queued frames, futures) outlived the young collections (every 700
    allocations) and piled up in the old generation.  Above `above` streams: what is
    alive then is frozen out of the collector's sight (gc.freeze: mostly the streams,
    which live long anyway), and young collections come every 50,000 allocations, so
    that short-lived objects die young.  Below `above / 2` the defaults come back: the
    collector is process-wide, and a process that mostly runs handlers should not run
    them under settings made for streams.  (The measured effect: README, Benchmarks.)"""

    def __init__(self, *, enabled: bool, above: int = 1000) -> None:
        self._enabled = enabled
        self._above = above
        self._defaults = gc.get_threshold()
        self._frozen_at = 0
        self.active = False

    def update(self, streams: int) -> None:
        if not self._enabled:
            return
        if not self.active and streams > self._above:
            self.active = True
            self._freeze(streams)
            gc.set_threshold(50_000, 20, 10)
            log.get("sse_hub").info("collector_tuned", streams=streams)
        elif self.active and streams > 2 * self._frozen_at:
            self._freeze(streams)  # the streams opened since are long-lived too
        elif self.active and streams < self._above // 2:
            self.active = False
            gc.set_threshold(*self._defaults)
            gc.unfreeze()
            log.get("sse_hub").info("collector_restored", streams=streams)

    def _freeze(self, streams: int) -> None:
        gc.freeze()
        self._frozen_at = streams


class Hub:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        aggregate_type: str,
        terminal_events: tuple[str, ...],
        queue_size: int = 64,
        keepalive: float = 15.0,
        poll_interval: float = 1.0,
        trail: float = 0.01,
        rnd: Random | None = None,
        tune_collector: bool = True,
        idle_refresh: float = IDLE_REFRESH_S,
        clock: Clock | None = None,
    ) -> None:
        self._pool = pool  # the worker's login: following the log is cross-tenant
        self._aggregate = aggregate_type
        self._terminal = terminal_events
        self._queue_size = queue_size
        self._keepalive = keepalive
        self._poll = poll_interval
        self._trail = trail
        self._rnd = rnd or system_random()
        self._idle_refresh = idle_refresh
        self._clock: Clock = clock or SystemClock()
        self._read_at = 0.0  # when the last read completed (clock.monotonic)
        # The streams of each aggregate: one stream as itself, more as a set (nearly
        # every aggregate has one follower: a set each would be 200 bytes a stream).
        self._subs: dict[StreamKey, Subscriber | set[Subscriber]] = {}
        self._clients = 0
        self._collector = CollectorTuning(enabled=tune_collector)
        self._seen: dict[StreamKey, int] = {}  # the last version fanned out per aggregate
        # (when a keepalive is due, tie-breaker, stream): closed streams drop out when
        # they come up.
        # Lists, not tuples: an entry is updated and pushed back as it is, not made anew
        # for each keepalive (a new object outliving the young collections, per stream
        # and keepalive, is work for the collector).
        self._due: list[list[Any]] = []
        self._seq = 0
        self._wake = anyio.Event()
        # The snapshot of the last read, and the server's epoch then (None: no read yet).
        self._position: outbox.Position | None = None
        # The connection reads go through while notifications come (None: in the pool).
        self._conn: PoolConnectionProxy | None = None
        self.reads = 0  # completed reads (tests wait on it)
        self.wake_ups = 0  # notifications taken by the loop (tests wait on it)
        self._woken = anyio.Event()
        self.events_pushed = 0  # events handed to streams (metrics)
        self.slow_cut = 0  # streams closed for not reading (metrics)
        self._read_done = anyio.Event()
        self.closing = False
        self._log = log.get("sse_hub")

    # --- the listener's callbacks -------------------------------------------------------

    def notify(self, _payload: str) -> None:
        self._wake.set()

    def resync(self) -> None:
        self._wake.set()

    # --- subscribers ----------------------------------------------------------------------

    @property
    def clients(self) -> int:
        return self._clients

    def subscribe(
        self, tenant_id: uuid.UUID, aggregate_id: str, abort: Callable[[], None] | None = None
    ) -> Subscriber:
        """A stream of the aggregate's events, registered while used as a context
        manager (`with hub.subscribe(...) as sub:`).  Register first, replay after:
        whatever commits after the replay's snapshot reaches the subscriber through the
        hub, and what both deliver is dropped by version."""
        return Subscriber((tenant_id, aggregate_id), self._queue_size, abort, self)

    def _add(self, sub: Subscriber) -> None:
        # A random phase: streams opened together do not all want a keepalive together.
        sub.due = time.monotonic() + self._keepalive * (0.5 + 0.5 * self._rnd.random())
        self._seq += 1
        heapq.heappush(self._due, [sub.due, self._seq, sub])
        if self.closing:
            sub.close("shutting down")
        others = self._subs.get(sub.key)
        if others is None:
            self._subs[sub.key] = sub
        elif isinstance(others, Subscriber):
            self._subs[sub.key] = {others, sub}
        else:
            others.add(sub)
        self._clients += 1
        self._collector.update(self._clients)

    def _remove(self, sub: Subscriber) -> None:
        sub.closed = True  # its keepalive entry drops out when it comes up
        # ... and holds on to no connection, nor its writer's future, meanwhile.
        sub._abort = sub.transport = sub._waiter = None
        self._clients -= 1
        self._collector.update(self._clients)
        subs = self._subs.get(sub.key)
        if isinstance(subs, set):
            subs.discard(sub)
            if len(subs) == 1:
                self._subs[sub.key] = next(iter(subs))
        elif subs is sub:
            del self._subs[sub.key]
            self._seen.pop(sub.key, None)

    def close_all(self, reason: str = "shutting down") -> None:
        """Shutdown: every stream ends now (clients reconnect to another process)."""
        self.closing = True
        for subs in self._subs.values():
            for sub in _each(subs):
                sub.close(reason)

    def _resume_all(self) -> int:
        """End every stream, for its client to resume from its last event (not a
        shutdown: streams opened from now on are served).  Returns how many ended.  The
        versions fanned out so far are forgotten: a lost one comes again, and a stream
        of its aggregate that opens before the ended one has gone must get it."""
        self._seen.clear()
        ended = 0
        for subs in list(self._subs.values()):
            for sub in _each(subs):
                if not sub.closed:
                    sub.close(IDS_WENT_BACK)
                    ended += 1
        return ended

    async def wait_reads(self, n: int) -> None:
        while self.reads < n:
            self._read_done = anyio.Event()
            await self._read_done.wait()

    async def wait_wake_ups(self, n: int) -> None:
        while self.wake_ups < n:
            self._woken = anyio.Event()
            await self._woken.wait()

    # --- the loop ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Read after each notification; after the last of a run of them, once more
        when the trail has passed (the throttle kept quiet the transactions that
        inserted within its window after a notification); else poll.

        A read waits for nothing but the next notification: under a steady flow of
        events they come every few milliseconds, and reading at once keeps the time
        from commit to client at about that (a fixed sleep of `trail` after each
        notified read added it to half the events).  While notifications come, the
        hub keeps its connection (no acquire, and no reset on release, between two
        reads); it gives it back when they stop.  With no stream to serve, a wake-up
        within `idle_refresh` of the last read does not read (IDLE_REFRESH_S): the
        next wake-up after it does, or the poll."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keepalives)
                await self._read_safely()
                task_status.started()
                notified = False
                while True:
                    if notified:
                        wait = self._trail
                    else:
                        await self._release()
                        wait = self._poll * (0.75 + 0.5 * self._rnd.random())
                    with anyio.move_on_after(wait):
                        await self._wake.wait()
                    notified = self._wake.is_set()
                    self._wake = anyio.Event()
                    if notified:
                        self.wake_ups += 1
                        self._woken.set()
                    if self._read_lately_for_nobody():
                        # After a notification the next wait is the trail (the
                        # connection kept); after the trail, the poll.
                        continue
                    await self._read_safely()
        finally:
            with anyio.CancelScope(shield=True):
                await self._release()

    def _read_lately_for_nobody(self) -> bool:
        """No stream to serve, and the snapshot is younger than `idle_refresh`: a
        read now would only move it forward a little."""
        return (
            not self._subs
            and self._position is not None
            and self._clock.monotonic() - self._read_at < self._idle_refresh
        )

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await self._pool.release(conn)
            except Exception as exc:
                # A broken connection is closed by the pool; nothing else to do.
                self._log.warning("hub_release_failed", error=safe_text(str(exc)) or repr(exc))

    async def _read_safely(self) -> None:
        try:
            await self._read()
        except Exception as exc:
            # The database away, a connection broken, or a row no one foresaw: the hub
            # serves every tenant's streams and must go on.  The next read starts from
            # the same snapshot, so nothing is lost meanwhile (on another connection:
            # this one may be broken).
            self._log.warning("hub_read_failed", error=safe_text(str(exc)) or repr(exc))
            if not isinstance(exc, _CONNECTION_TROUBLE):
                self._log.exception("hub_read_crashed")
            await self._release()

    async def _read(self) -> None:
        if self._conn is None:
            self._conn = await self._pool.acquire()
        conn = self._conn
        previous = self._position
        if previous is None or not self._subs:
            # Nobody to deliver to: only move the snapshot, unless a stream subscribed
            # while it was taken.  That stream's replay may have read the database
            # before this snapshot, and what committed in between would be behind the
            # new one: keep the old (taken before that stream existed).  (None: the
            # first read, before the HTTP server starts.)
            fresh = await outbox.snapshot(conn)
            if self._position is None or not self._subs or _ids_may_have_gone_back(previous, fresh):
                self._position = fresh
            events: list[Event] = []
            position = self._position
        else:
            position, events = await outbox.follow(conn, previous.snapshot, self._aggregate)
        self._position = position
        if len(events) > _LARGE_READ:
            self._log.warning("hub_large_read", rows=len(events))
        self._fan_out(events)
        if _ids_may_have_gone_back(previous, position):
            # What was committed since under ids given again is behind the previous
            # snapshot and was not read: every stream ends, and its client resumes from
            # its last event, which the replay reads by version.  The hub follows from
            # the server's snapshot now.
            assert previous is not None
            ended = self._resume_all()
            self._log.warning(
                "hub_transaction_ids_went_back",
                epoch_before=previous.server_epoch,
                epoch_now=position.server_epoch,
                xmax_before=_xmax(previous.snapshot),
                xmax_now=_xmax(position.snapshot),
                streams_ended=ended,
            )
        self._read_at = self._clock.monotonic()
        self.reads += 1
        self._read_done.set()

    def _fan_out(self, events: list[Event]) -> None:
        for ev in events:
            key = (ev.tenant_id, ev.aggregate_id)
            subs = self._subs.get(key)
            # Versions of one aggregate commit in order when one writer holds the
            # aggregate's row lock while it writes them (the state machine does): a
            # version at or below the last one fanned out is a re-read.
            if not subs or ev.version <= self._seen.get(key, 0):
                continue
            self._seen[key] = ev.version
            terminal = ev.type in self._terminal
            frame = encode(ev)
            wire = chunk(frame)  # made once for all the streams that are written to
            quiet_until = time.monotonic() + self._keepalive
            for sub in _each(subs):
                if sub.closed:
                    continue  # (cut off already, and counted then)
                if sub.push(ev.version, terminal, frame, wire):
                    self.events_pushed += 1
                elif sub.reason == SLOW_CLIENT:
                    self.slow_cut += 1
                sub.due = quiet_until  # an event is as good as a keepalive

    async def _keepalives(self) -> None:
        """A keepalive to each stream that has been quiet for the interval.  The
        streams wait in a heap by when their keepalive is due, so a tick touches only
        the streams due in it (a pass over all 20,000 streams each second blocked the
        loop for up to 126 ms).  An event moves a stream's `due` without touching the
        heap: an entry found early is pushed back with its new time."""
        tick = min(0.1, self._keepalive / 15)
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            heap = self._due
            while heap and heap[0][0] <= now:
                entry = heapq.heappop(heap)
                sub: Subscriber = entry[2]
                if sub.closed:
                    continue
                if sub.due > now:  # written to since: due later
                    entry[0] = sub.due
                    heapq.heappush(heap, entry)
                    continue
                sub.due = entry[0] = now + self._keepalive
                heapq.heappush(heap, entry)
                if not sub.push(0, False, KEEPALIVE, KEEPALIVE_CHUNK) and sub.reason == SLOW_CLIENT:
                    self.slow_cut += 1
