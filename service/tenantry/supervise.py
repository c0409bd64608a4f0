"""Keeping components alive, and knowing whether they can work.

A long-running loop that meets an error no one foresaw (asyncpg's InternalClientError
on a connection whose backend was terminated was one) must not end the process: it
took the worker's task group, then the whole service, down.  `supervise` logs the error
and starts the loop again after a backoff.  `Health` collects what the components say
about their ability to work; `/readyz` answers 503 while any of them reports a problem.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from . import logging as log
from .clock import Random, system_random
from .safetext import safe_text


class Health:
    """Named problems, set and cleared by the components that have them."""

    def __init__(self) -> None:
        self._problems: dict[str, str] = {}

    def failing(self, name: str, why: str) -> None:
        self._problems[name] = safe_text(why)[:300]

    def ok(self, name: str) -> None:
        self._problems.pop(name, None)

    @property
    def problems(self) -> dict[str, str]:
        return dict(self._problems)


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    health: Health | None = None,
    rnd: Random | None = None,
    max_delay: float = 5.0,
) -> None:
    """Run `run()` until it returns; after an exception, log it and run it again after
    a jittered, growing delay.  Cancellation passes through."""
    logger = log.get("supervisor")
    rnd = rnd or system_random()
    delay = 0.1
    while True:
        try:
            await run()
            return
        except Exception as exc:
            logger.exception("component_crashed", task=name, error=safe_text(repr(exc)))
            if health is not None:
                health.failing(name, f"crashed: {exc!r}")
        await anyio.sleep(delay * (0.5 + rnd.random()))
        delay = min(delay * 2, max_delay)
        if health is not None:
            health.ok(name)
        logger.info("component_restarted", task=name)
