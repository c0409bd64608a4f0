"""Injected time and randomness, so tests can assert exact schedules without sleeping."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class Random(Protocol):
    def random(self) -> float: ...


def system_random() -> Random:
    return random.SystemRandom()
