"""A webhook receiver on loopback (aiohttp), for the tests and the benchmarks: each path
answers as the test sets it (a status, Retry-After, an abort header, a hang, a reset, a
redirect, a slow or endless body), and every request is kept in arrival order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook

Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    def json(self) -> Any:
        return orjson.loads(self.body)

    def verify(self, secret: str) -> Any:
        """The payload, verified with the independent `standardwebhooks` package
        (raises WebhookVerificationError otherwise)."""
        return Webhook(secret).verify(self.body, self.headers)


def answer(
    status: int = 204, headers: dict[str, str] | None = None, body: bytes = b""
) -> Behaviour:
    async def respond(_: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers=headers, body=body)

    return respond


async def hang(_: web.Request) -> web.StreamResponse:
    await asyncio.Event().wait()  # until the client gives up and the server cancels
    raise AssertionError("unreachable")


async def reset(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.abort()  # RST, no response
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


def redirect(to: str) -> Behaviour:
    async def respond(_: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": to})

    return respond


async def endless_body(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(status=200)
    await resp.prepare(request)
    while True:
        await resp.write(b"x" * 65536)


async def slow_body(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(status=200)
    await resp.prepare(request)
    while True:
        await resp.write(b".")
        await asyncio.sleep(0.5)


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.behaviours: dict[str, Behaviour] = {}
        self.port = 0
        self._arrived = asyncio.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str, behaviour: Behaviour) -> None:
        self.behaviours[path] = behaviour

    def hold(self, path: str) -> asyncio.Event:
        """`path` answers 204, each request only once the returned event is set."""
        release = asyncio.Event()

        async def held(_: web.Request) -> web.StreamResponse:
            await release.wait()
            return web.Response(status=204)

        self.on(path, held)
        return release

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_count(self, path: str, n: int, timeout: float = 20.0) -> list[Received]:
        await self.wait_for(lambda: len(self.at(path)) >= n, timeout)
        return self.at(path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Received(request.path, {k.lower(): v for k, v in request.headers.items()}, body)
        )
        self._arrived.set()
        behaviour = self.behaviours.get(request.path, answer(204))
        return await behaviour(request)


@asynccontextmanager
async def running_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver._handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = runner.addresses[0][1]
    try:
        yield receiver
    finally:
        await runner.cleanup()
