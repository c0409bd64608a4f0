"""Per-client token buckets for the public sign-up endpoint.

In process memory: each process behind a load balancer limits on its own, so the
effective limit is per process.  Good enough to turn away a client hammering the
endpoint; not an accounting system.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_clients: int = 100_000,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._max = max_clients
        self._now = now
        # client -> (tokens, at); least recently seen first, so the oldest go first when
        # the table is full (a flood of distinct addresses cannot grow memory).
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, client: str) -> float:
        """Take a token: 0.0 when allowed, else the seconds until one is available."""
        now = self._now()
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait

    @staticmethod
    def retry_after(wait: float) -> str:
        return str(max(1, math.ceil(wait)))
