"""A round-robin HTTP proxy on loopback (aiohttp), standing in for the load balancer in
front of several `tenantry run` replicas (tests/acceptance/test_replicas.py).

It spreads requests and retries nothing: the client sees what the replica answered,
and a response body (an event stream) is passed on chunk by chunk as it arrives, never
buffered.  Two things it does as a real proxy with passive health checks would:

- a replica it cannot reach (connection refused: the process is gone; or cut before it
  answered) gets `502` problem JSON with `Retry-After: 1`, and is left out of the
  rotation until `set_upstream` puts it back (a new process, once ready);
- every answer carries `X-Upstream: <slot>`, the replica that gave it, so that a test
  can tell where a request went.

Each request goes over a connection of its own to the replica: a pooled keep-alive
connection that the replica closes as it stops would make a request vanish unanswered
(neither side can tell whether it was read), which a per-request connection avoids.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

# Headers that belong to one hop (RFC 9110, 7.6.1), never passed on.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
PROXY_RETRY_AFTER = "1"


@dataclass(frozen=True)
class Answer:
    """One request as the proxy passed it on: where it went and what came back (502:
    the proxy's own, the replica could not be reached)."""

    slot: int | None
    method: str
    path: str
    status: int


class RoundRobinProxy:
    def __init__(self, slots: int) -> None:
        self._upstreams: list[str | None] = [None] * slots
        self._turn = itertools.count()
        self.answers: list[Answer] = []
        self.port = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_upstream(self, slot: int, base_url: str | None) -> None:
        """Route to `base_url` in `slot` (None: out of the rotation)."""
        self._upstreams[slot] = base_url

    def _pick(self) -> tuple[int, str] | None:
        n = len(self._upstreams)
        for _ in range(n):
            slot = next(self._turn) % n
            base = self._upstreams[slot]
            if base is not None:
                return slot, base
        return None

    def _refuse(self, request: web.Request, slot: int | None, detail: str) -> web.Response:
        self.answers.append(Answer(slot, request.method, request.path, 502))
        body = {"type": "about:blank", "title": "Bad Gateway", "status": 502, "detail": detail}
        headers = {"Retry-After": PROXY_RETRY_AFTER}
        if slot is not None:
            headers["X-Upstream"] = str(slot)
        return web.Response(
            status=502,
            body=orjson.dumps(body),
            content_type="application/problem+json",
            headers=headers,
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        picked = self._pick()
        if picked is None:
            return self._refuse(request, None, "no replica is in the rotation")
        slot, base = picked
        headers = CIMultiDict(
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() != "host"
        )
        if request.remote:
            headers["X-Forwarded-For"] = request.remote
        body = await request.read()
        try:
            upstream = await self._session.request(
                request.method,
                base + request.path_qs,
                headers=headers,
                data=body or None,
                allow_redirects=False,
            )
        except (aiohttp.ClientConnectionError, OSError) as exc:
            # Passive health check: the process is gone (or went while it read this
            # request); out of the rotation until the test puts a new one in.
            if self._upstreams[slot] == base:
                self._upstreams[slot] = None
            return self._refuse(request, slot, f"replica {slot} unreachable: {exc!r}")
        async with upstream:
            self.answers.append(Answer(slot, request.method, request.path, upstream.status))
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    response.headers.add(k, v)
            response.headers["X-Upstream"] = str(slot)
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                # The replica cut the body short: so does the proxy (the client sees a
                # broken response, not a complete one).
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            return response

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RoundRobinProxy]:
        # No total timeout: event streams stay open for as long as the replica keeps
        # them.  auto_decompress off: bodies pass through as the replica encoded them.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
            yield self
        finally:
            await runner.cleanup()
            await self._session.close()
