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

The same handlers also tell a request's handler, at once, that its client's connection
is lost (`end_with_connection`): an idle event stream ends then, not at its next write.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    DecompressSizeError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .. import logging as log
from .problems import problem

# What the client sent wrong, by the parser's exception, in our words: the parser's own
# messages quote the start of the line they refuse, which may hold a status token or an
# API key, so neither the log nor the answer repeats them.
_REFUSALS: tuple[tuple[type[Exception], str], ...] = (
    (LineTooLong, "a line of the request is too long"),
    (BadHttpMethod, "the method is not one this server knows"),
    (BadStatusLine, "the request line is malformed"),
    (InvalidHeader, "a header is malformed"),
    (InvalidURLError, "the request's address is malformed"),
    (TransferEncodingError, "the body's chunked encoding is broken"),
    (ContentEncodingError, "the body cannot be decompressed (gzip, deflate and br are read)"),
    (ContentLengthError, "the body does not match its Content-Length"),
    (DecompressSizeError, "the body is too large once decompressed"),
)


def refusal(exc: BaseException | None) -> str:
    """What is wrong with a request the parser refused, without any of its bytes."""
    for kind, what in _REFUSALS:
        if isinstance(exc, kind):
            return what
    return "the request is malformed"


class EndsWithConnection(Protocol):
    """What a request's handler wants told when its client's connection is lost while
    the request is handled (an event stream: nobody will read it any more)."""

    def connection_lost(self) -> None: ...


_ENDS_WITH_CONNECTION = web.RequestKey[EndsWithConnection]("ends_with_connection")


def end_with_connection(request: web.Request, what: EndsWithConnection) -> None:
    """Have `what.connection_lost()` called as soon as the request's connection is lost
    (at once if it is already), rather than at the handler's next write.

    aiohttp does not tell a handler that its client left (`handler_cancellation`
    cancels every handler of the server, including those in the middle of a
    transaction, and it is off): an idle event stream learnt it only when its next
    keepalive found the transport closed, up to its interval later, and meanwhile held
    its subscription and about 16 KiB.  The connection's protocol (the handler class
    below) is told at once, by asyncio.  What is registered is kept in the request's
    own mapping, which holds the request id already: no object, timer or task more per
    stream."""
    transport = request.transport
    if transport is None or transport.is_closing():
        what.connection_lost()
    else:
        request[_ENDS_WITH_CONNECTION] = what


class _ProblemRequestHandler(RequestHandler):
    __slots__ = ()

    def connection_lost(self, exc: BaseException | None) -> None:
        # The request being handled (aiohttp's own attribute, set for as long as its
        # handler runs; a private one: test_sse.py's disconnect tests fail if an
        # upgrade renames it), taken before aiohttp's own handling of the loss.
        request = self._current_request
        super().connection_lost(exc)
        if request is not None:
            told: EndsWithConnection | None = request.get(_ENDS_WITH_CONNECTION)
            if told is not None:
                told.connection_lost()

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
        logger = log.get("http")
        if status >= 500:
            logger.error("http_protocol_error", status=status, client=request.remote, exc_info=exc)
            response = problem(status, "the request could not be completed; try again later")
        else:
            reason = refusal(exc)
            # A client's malformed request: worth a line, not a traceback.
            logger.info(
                "http_request_refused",
                status=status,
                reason=reason,
                error=type(exc).__name__ if exc is not None else None,
                client=request.remote,
            )
            response = problem(status, f"the request could not be read: {reason}")
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A body the handler never read that turns out undecodable while the connection
        drains it, after the answer: the client's fault, said in one line."""
        exc = kw.get("exc_info")
        if isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            log.get("http").info("http_body_unreadable", reason=refusal(cause))
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
