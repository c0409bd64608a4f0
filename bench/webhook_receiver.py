"""The receiving side of bench.webhooks, in a process of its own (`python -m
bench.webhooks --load --port P`): an aiohttp server on loopback that answers 204 and
notes when each event first arrived (wall clock, comparable with the producer's commit
times on the same machine), keyed by the `seq` in the event's data.  Requests to a path
starting with /hang are held until the sender gives up.

Protocol on stdin/stdout, one line each: -> ready; `count` -> counts (repeatable);
`stop` -> done (with every arrival and this process's CPU seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence

import anyio
import orjson
from aiohttp import web

from . import common
from .service_proc import emit_line, own_cpu_seconds, read_command


class Arrivals:
    def __init__(self) -> None:
        self.first: dict[int, float] = {}
        self.requests = 0
        self.hanging = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests += 1
        if request.path.startswith("/hang"):
            self.hanging += 1
            await asyncio.Event().wait()
        seq = orjson.loads(body)["data"].get("seq")
        if isinstance(seq, int):
            self.first.setdefault(seq, time.time())
        return web.Response(status=204)


async def serve(port: int) -> None:
    arrivals = Arrivals()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", arrivals.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    emit_line({"event": "ready", "port": port})
    try:
        while (cmd := await read_command()) == "count":
            emit_line(
                {
                    "event": "counts",
                    "received": len(arrivals.first),
                    "requests": arrivals.requests,
                    "hanging": arrivals.hanging,
                }
            )
        emit_line(
            {
                "event": "done",
                "arrivals": {str(k): v for k, v in arrivals.first.items()},
                "requests": arrivals.requests,
                "cpu_s": own_cpu_seconds(),
                "command": cmd,
            }
        )
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.webhooks --load")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    common.run_async(serve, a.port)
    return 0
