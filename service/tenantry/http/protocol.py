"""What aiohttp answers on its own, before a request reaches the application, answered as
the application would: problem JSON.

aiohttp's HTTP parser refuses some requests itself (a method it does not know, control
characters in a header, a line too long, a body that cannot be decompressed as it
arrives) and its protocol answers them with `400` in `text/plain`, logging a traceback
for each at error level.  A client of this service expects every error as problem JSON,
and an operator does not want a traceback for a client's malformed request.  aiohttp
builds those answers in `RequestHandler.handle_error`; the runner here makes its server
create handlers that override it.  That is an aiohttp extension point rather than a
documented API: `tests/integration/test_http_fuzz.py` sends such requests through the
real server, so an aiohttp upgrade that changes it fails the suite, not a client.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .. import logging as log
from ..safetext import safe_text
from .problems import problem

_log = log.get("http")


def _first_line(text: str) -> str:
    """The parser's messages span lines (the bytes, a caret under the fault): the first
    one says what is wrong."""
    return safe_text(text.strip().splitlines()[0] if text.strip() else "")[:200]


class _ProblemRequestHandler(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of an answer is out: no second one can follow (as aiohttp does).
            raise ConnectionError("the response is partly sent; cannot answer the error")
        if status >= 500:
            _log.error("http_protocol_error", status=status, client=request.remote, exc_info=exc)
            response = problem(status, "the request could not be completed; try again later")
        else:
            reason = _first_line(message or (str(exc) if exc is not None else ""))
            # A client's malformed request: worth a line, not a traceback.
            _log.info("http_request_refused", status=status, reason=reason, client=request.remote)
            response = problem(
                status,
                f"the request could not be read: {reason}"
                if reason
                else "the request could not be read",
            )
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A body the handler never read that turns out undecodable while the connection
        drains it, after the answer: the client's fault, said in one line."""
        exc = kw.get("exc_info")
        if isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            _log.info("http_body_unreadable", reason=_first_line(str(cause)))
            return
        super().log_exception(*args, **kw)


class _ProblemServer(web.Server):
    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        # Same slots, one method more: the handler aiohttp built, answering as above.
        handler.__class__ = _ProblemRequestHandler
        return handler


class ProblemAppRunner(web.AppRunner):
    """An AppRunner whose connections answer aiohttp's own errors as problem JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _ProblemServer
        return server
