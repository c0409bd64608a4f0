"""JSON answers: RFC 9457 problem details (every error the HTTP edge returns) and plain
JSON bodies."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..errors import InvalidRequest

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    422: "Unprocessable Content",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def problem(
    status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    body = {"type": "about:blank", "title": _TITLES.get(status, "Error"), "status": status}
    body["detail"] = detail
    body.update(extra)
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/problem+json",
        headers=headers,
    )


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def invalid_problem(exc: InvalidRequest) -> web.Response:
    """422 naming each field at fault (`errors[].field`, and a JSON pointer to it)."""
    errors = [
        {"field": e.field, "pointer": f"#/{e.field}" if e.field else "#", "detail": e.message}
        for e in exc.errors
    ]
    return problem(422, "the request has invalid fields", errors=errors)


async def read_json(request: web.Request, max_bytes: int) -> Any:
    """The request's JSON body, or the problem to answer instead (415 for another media
    type, 413 past `max_bytes`, 400 for what is not JSON)."""
    if request.content_type != "application/json" and not request.content_type.endswith("+json"):
        return problem(415, "send the body as application/json")
    if request.content_length is not None and request.content_length > max_bytes:
        return problem(413, f"the body must be at most {max_bytes} bytes")
    # read(n) returns what has arrived so far: read until the end, or past the cap.
    raw = bytearray()
    while chunk := await request.content.read(max_bytes + 1 - len(raw)):
        raw += chunk
        if len(raw) > max_bytes:
            return problem(413, f"the body must be at most {max_bytes} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return problem(400, "the body is not valid JSON")
