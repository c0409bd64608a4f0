"""What tells open dashboards that something changed: every wake-up the listener hears
(jobs enqueued, events appended, webhooks, queue controls) and every new database
reading of the metrics pokes the feed; each open page's stream waits on it.  A poke is
a counter increment when no page is open, so the job path pays nothing for it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import anyio


class Feed:
    def __init__(self) -> None:
        self.generation = 0
        self._listeners = 0
        self._changed = asyncio.Event()
        # Set at shutdown: every open page's stream ends (the page reconnects, to
        # another process).
        self.closed = False

    def close(self) -> None:
        self.closed = True
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def poke(self, *_: object) -> None:
        self.generation += 1
        if self._listeners:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    @contextmanager
    def listening(self) -> Iterator[None]:
        self._listeners += 1
        try:
            yield
        finally:
            self._listeners -= 1

    async def wait_past(self, generation: int, within: float) -> bool:
        """True once the feed has moved past `generation` (or is closed); False after
        `within` seconds."""
        with anyio.move_on_after(within):
            while self.generation == generation and not self.closed:
                await self._changed.wait()
            return True
        return False
