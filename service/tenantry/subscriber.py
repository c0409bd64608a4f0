"""One client's event stream as the SSE hub serves it: its frames (encoded once per
event, for every stream that follows the event's aggregate), its bounded queue, and
the writes the hub makes to its connection itself once its writer has attached it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from .outbox.store import Event

if TYPE_CHECKING:
    from .hub import Hub

StreamKey = tuple[uuid.UUID, str]  # (tenant id, aggregate id)

KEEPALIVE = b": keepalive\n\n"


def encode(event: Event) -> bytes:
    """One SSE frame: `id:` the aggregate version, `event:` the type, `data:` the JSON
    text as the database rendered it (one line: JSON text escapes line breaks, and
    types are names without them, by a CHECK)."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event.version,
        event.type.encode(),
        event.data.encode(),
    )


def chunk(frame: bytes) -> bytes:
    """A frame as one chunk of HTTP/1.1's chunked transfer coding: what goes on the wire
    of a stream the hub writes to directly (see Subscriber.attach)."""
    return b"%x\r\n%s\r\n" % (len(frame), frame)


KEEPALIVE_CHUNK = chunk(KEEPALIVE)

Frame = tuple[int, bool, bytes]  # (version, terminal, the encoded frame)
SLOW_CLIENT = "slow client"
CLIENT_GONE = "client gone"


class Subscriber:
    """One client's stream, registered with its hub while used as a context manager
    (`with hub.subscribe(...) as sub:`).

    Until its writer attaches a transport, what the hub hands over is queued (at most
    `limit` frames; version 0 is a keepalive) for the writer to write.  Once attached
    (`attach`), the hub writes each frame straight to the transport while the
    transport takes it without pushing back and nothing is queued: no task wakes per
    event or keepalive, and nothing new outlives the write, so an idle stream makes
    no work for the garbage collector.  A transport that pushes back (more than its
    high-water mark buffered: a client that does not read) gets its frames queued
    again, for the writer to write as the transport drains; a client `limit` frames
    behind is cut off.

    Twenty thousand of these live in one process, so each is small: a list for the
    queue (a deque allocates a 64-slot block at once, about 600 bytes a stream) and,
    while the writer waits, one future (an asyncio.Event holds a deque of waiters
    besides, and a generator-based context manager a suspended frame)."""

    __slots__ = (
        "_abort",
        "_high",
        "_hub",
        "_waiter",
        "closed",
        "due",
        "frames",
        "key",
        "limit",
        "reason",
        "sent",
        "transport",
    )

    def __init__(
        self,
        key: StreamKey,
        limit: int,
        abort: Callable[[], None] | None,
        hub: Hub | None = None,
    ) -> None:
        self.due = 0.0  # when a keepalive is due if nothing else is written (monotonic)
        self.key = key
        self.limit = limit
        self.frames: list[Frame] = []
        self.closed = False
        self.reason = ""
        self.sent = 0  # the last version written to the client
        self.transport: asyncio.WriteTransport | None = None
        self._high = 0
        self._abort = abort
        self._hub = hub
        self._waiter: asyncio.Future[None] | None = None

    def __enter__(self) -> Subscriber:
        assert self._hub is not None, "made by Hub.subscribe"
        self._hub._add(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._hub is not None
        self._hub._remove(self)

    def attach(self, transport: asyncio.WriteTransport) -> None:
        """From now on the hub writes frames to `transport` itself, each as one chunk
        of the chunked transfer coding (the response's, which the writer enabled and
        whose headers are out), whenever nothing is queued: the writer calls this with
        the queue empty, between two of its own writes."""
        assert not self.frames
        self.transport = transport
        self._high = transport.get_write_buffer_limits()[1]

    def push(self, version: int, terminal: bool, frame: bytes, wire: bytes | None = None) -> bool:
        """Hand a frame over (`wire`: the same as a chunk, when the caller has it);
        False if the stream took it not (closed, or cut off now)."""
        if self.closed:
            return False
        t = self.transport
        if t is not None and not self.frames:
            if t.is_closing():
                self.close(CLIENT_GONE)
                return False
            if t.get_write_buffer_size() < self._high:
                if version:
                    if version <= self.sent:
                        return True  # the replay wrote it
                    self.sent = version
                t.write(wire if wire is not None else chunk(frame))
                if terminal:
                    self.close("terminal event")
                return True
        if len(self.frames) >= self.limit:
            # The client is not reading: its writer is stuck in a drain, so waking it
            # is not enough; abort the connection (it resumes from its last id).
            self.close(SLOW_CLIENT)
            if self._abort is not None:
                self._abort()
            return False
        self.frames.append((version, terminal, frame))
        self._wake()
        return True

    def connection_lost(self) -> None:
        """The client's connection is gone (http.protocol.end_with_connection): the
        stream ends now, whatever it was waiting for."""
        self.close(CLIENT_GONE)

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed, self.reason = True, reason
            self._wake()

    def wait(self) -> asyncio.Future[None]:
        """Done once a frame is queued or the stream is closed (at once if either is
        so already).  One waiter at a time: the stream's writer."""
        waiter = self._waiter
        if waiter is None or waiter.done():  # (done: woken, or cancelled by a timeout)
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        if self.frames or self.closed:
            waiter.set_result(None)
        return waiter

    def next_frame(self) -> Frame | None:
        """The oldest frame queued, taken off the queue (None: none).  The writer takes
        one at a time, so that the hub queues behind a frame the writer still writes
        instead of writing past it."""
        return self.frames.pop(0) if self.frames else None

    def drain(self) -> list[Frame]:
        """The frames queued so far, oldest first; the queue starts empty again."""
        frames = self.frames
        if frames:
            self.frames = []
        return frames

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
