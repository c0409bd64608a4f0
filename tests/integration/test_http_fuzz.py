"""Arbitrary requests at the HTTP edge: every error is problem JSON, none is a 500.

The requests are well-formed HTTP/1.1 (the parser's own refusals are documented in the
README as the one exception), sent over a raw socket so that nothing between the test
and the server tidies them up: any standard method, known and unknown paths with odd
encodings, odd or conflicting headers (tokens, ranges, origins, encodings, request
ids), and bodies of any kind.  The generator is seeded: a failure names its seed and
request, and `TENANTRY_FUZZ_SEED` replays it."""

from __future__ import annotations

import asyncio
import os
import random
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
import pytest
import structlog
from structlog.contextvars import merge_contextvars

from tenantry import logging as log
from tenantry.app import Service
from tests.helpers import background_service, service_settings

REQUESTS = 2_000
SEED = int(os.environ.get("TENANTRY_FUZZ_SEED", "20261201"))
ORIGIN = "http://app.example"

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]
ROUTES = [
    "/",
    "/healthz",
    "/readyz",
    "/favicon.ico",
    "/favicon.svg",
    "/v1/onboardings",
    "/v1/onboardings/{id}",
    "/v1/onboardings/{id}/events",
    "/v1/tenant",
    "/v1",
    "/v2/onboardings",
    "/static/../../etc/passwd",
    "/index.html",
]


def _segment(rnd: random.Random) -> str:
    choices = [
        str(uuid.uuid4()),
        "not-a-uuid",
        "%00",
        "%ff%fe",
        "%2e%2e",
        "..",
        "a" * rnd.randint(1, 3000),
        "%E2%80%AE",
        "~",
        "",
        "%25",
    ]
    return rnd.choice(choices)


def _path(rnd: random.Random) -> str:
    path = rnd.choice(ROUTES).replace("{id}", _segment(rnd))
    if rnd.random() < 0.3:
        path += "/" + _segment(rnd)
    if rnd.random() < 0.1:
        path = "/" + path
    if rnd.random() < 0.4:
        query = rnd.choice(
            [
                "token=junk",
                "token=",
                "token=a&token=b",
                "last_event_id=-1",
                "last_event_id=99999999999",
                "last_event_id=%C2%B2",
                "x=%00",
                "&&&",
                "token=" + "t" * 5000,
            ]
        )
        path += "?" + query
    return path


def _headers(rnd: random.Random) -> list[tuple[str, str]]:
    pool: list[tuple[str, str]] = [
        ("Authorization", rnd.choice(["Bearer junk", "Bearer ", "Basic Zm9vOmJhcg==", "x"])),
        ("Authorization", "Bearer tnt_" + str(uuid.uuid4()) + "_" + "A" * 43),
        (
            "Content-Type",
            rnd.choice(
                [
                    "application/json",
                    "text/plain",
                    "application/x-www-form-urlencoded",
                    "application/problem+json",
                    "multipart/form-data; boundary=x",
                    "application/json; charset=latin-1",
                    "",
                ]
            ),
        ),
        ("Range", rnd.choice(["bytes=0-1", "bytes=999999-", "bytes=5-2", "lines=1", "bytes"])),
        ("Origin", rnd.choice([ORIGIN, "http://evil.example", "null", ""])),
        ("Access-Control-Request-Method", rnd.choice(["POST", "GET", "DELETE", "FROB"])),
        ("Access-Control-Request-Headers", rnd.choice(["content-type", "x-evil", ""])),
        ("Last-Event-ID", rnd.choice(["1", "-1", "abc", "²", "9" * 40, ""])),
        ("X-Request-ID", rnd.choice(["req-1", "a b", "x" * 500, "", "é"])),
        ("Idempotency-Key", rnd.choice(["k", "", "ü", "k" * 300, str(uuid.uuid4())])),
        ("Accept", rnd.choice(["*/*", "text/event-stream", "application/json", "nonsense"])),
        ("Content-Encoding", rnd.choice(["gzip", "br", "deflate", "identity", "junk"])),
        ("If-None-Match", '"x"'),
        ("X-Forwarded-For", rnd.choice(["1.2.3.4", "junk", "::1, 10.0.0.1"])),
    ]
    return rnd.sample(pool, rnd.randint(0, 6))


def _body(rnd: random.Random) -> bytes:
    return rnd.choice(
        [
            b"",
            b"{}",
            b"null",
            b"[]",
            orjson.dumps({"email": "a@b.co", "tenant_name": "Fuzz Co", "plan": "free"}),
            orjson.dumps({"email": 1, "tenant_name": None, "plan": ["free"]}),
            b'{"email": "\\u0000@x.y"}',
            b'{"a":' * 600 + b"1" + b"}" * 600,
            b"\xff\xfe\x00",
            bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 64))),
            b"x" * 20_000,
        ]
    )


def _request(rnd: random.Random) -> bytes:
    method = rnd.choice(METHODS)
    head = [f"{method} {_path(rnd)} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    headers = _headers(rnd)
    body = _body(rnd) if method not in ("GET", "HEAD", "TRACE") or rnd.random() < 0.1 else b""
    if rnd.random() < 0.1:  # a sign-up, or nearly one: the application's own answers
        head[0] = "POST /v1/onboardings HTTP/1.1"
        headers = [h for h in headers if h[0] not in ("Content-Type", "Content-Encoding")]
        headers.append(("Content-Type", "application/json"))
        body = rnd.choice(
            [
                orjson.dumps({"email": "a@b.co", "tenant_name": "Fuzz Co", "plan": "free"}),
                orjson.dumps({"email": "a@b", "tenant_name": "x", "plan": "gold"}),
                b'{"email": "\\ud800@b.co", "tenant_name": "\\u0000abc", "plan": ""}',
            ]
        )
    head += [f"{k}: {v}" for k, v in headers]
    if body:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + body


async def _send(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        status_line = (await reader.readline()).decode("latin-1")
        headers: dict[str, str] = {}
        while (line := (await reader.readline()).decode("latin-1").strip()) != "":
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("content-type", "").startswith("text/event-stream"):
            body = b""  # a stream that was granted: not an error, and it would not end
        else:
            body = await reader.read()
        return int(status_line.split(" ", 2)[1]), headers, body
    finally:
        writer.close()


@pytest.fixture
async def svc(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[Service]:
    settings = service_settings(
        tmp_path, queues={"other": 1}, signup_rate=1000, signup_burst=1000, cors_origins=(ORIGIN,)
    )
    async with background_service(settings, app_url, pool, worker_pool) as s:
        yield s


async def test_arbitrary_requests_get_problem_json_errors_and_never_a_500(svc: Service) -> None:
    port = svc.http.port
    assert port is not None
    rnd = random.Random(SEED)
    requests = [_request(rnd) for _ in range(REQUESTS)]
    limit = asyncio.Semaphore(16)

    async def one(raw: bytes) -> tuple[bytes, int, dict[str, str], bytes]:
        async with limit:
            return (raw, *await _send(port, raw))

    answers = await asyncio.gather(*(one(raw) for raw in requests))
    statuses = Counter(status for _, status, _, _ in answers)
    wrong = [
        (raw[:200], status, headers.get("content-type"), body[:200])
        for raw, status, headers, body in answers
        if not _not_ready(raw, status, headers)
        and (
            status >= 500
            or (status >= 400 and headers.get("content-type") != "application/problem+json")
        )
    ]
    assert wrong == [], f"seed {SEED}: {len(wrong)} of {REQUESTS} wrong ({statuses}): {wrong[:5]}"
    # The fuzz reached the application's own answers, not just its refusals.
    assert {200, 202, 401, 404, 405, 422} <= set(statuses), statuses


def _not_ready(raw: bytes, status: int, headers: dict[str, str]) -> bool:
    """The readiness probe's own "not ready" (documented: 503 and its checks as JSON),
    not an error: a busy machine can make one of its checks fail for a moment (CI,
    2026-12-08: one HEAD /readyz of 2,000 requests, two test workers beside)."""
    path = raw.split(b" ", 2)[1] if raw.count(b" ") >= 2 else b""
    return (
        path.split(b"?")[0] == b"/readyz"
        and status == 503
        and headers.get("content-type") == "application/json"
    )


PARSER_REFUSES = {
    "an unknown method": b"FROB / HTTP/1.1\r\nHost: x\r\n\r\n",
    "a lower-case method": b"get / HTTP/1.1\r\nHost: x\r\n\r\n",
    "a control character in a header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
    "a header line too long": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
    "a request line too long": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "too many headers": b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 200 + b"\r\n",
    "a broken chunk": b"POST /v1/onboardings HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    "a body that is not gzip": b"POST /v1/onboardings HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
    b'Content-Length: 7\r\n\r\n{"a":1}',
    "a body that is not brotli": b"POST /v1/onboardings HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/json\r\nContent-Encoding: br\r\n"
    b'Content-Length: 7\r\n\r\n{"a":1}',
    "not HTTP at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
}


@pytest.mark.parametrize("raw", PARSER_REFUSES.values(), ids=PARSER_REFUSES.keys())
async def test_what_the_parser_refuses_is_a_problem_too(svc: Service, raw: bytes) -> None:
    """Regression: aiohttp's parser answered these itself, `400` in text/plain (and a
    body in brotli asked the client to install Brotli)."""
    port = svc.http.port
    assert port is not None
    status, headers, body = await _send(port, raw)
    assert status == 400
    assert headers["content-type"] == "application/problem+json"
    problem = orjson.loads(body)
    assert problem["status"] == 400 and problem["title"] == "Bad Request"
    assert re.match(r"^the request (body )?could not be read", problem["detail"])
    assert "install" not in problem["detail"].lower()


SECRET = "tnt_0b0e9c39-6f0a-4c8e-9a51-1f4c39a5c7d2_KEYSECRETKEYSECRET"


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v1/onboardings/x?token="
        + SECRET.encode()
        + b"&ref="
        + b"x" * 8200
        + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/tenant HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + SECRET.encode()
        + b"y" * 8200
        + b"\r\n\r\n",
        b"GET /?token=" + SECRET.encode() + b" HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /?token="
        + SECRET.encode()
        + b" HTTP/1.1\r\nHost: x\r\nX-A: \x01"
        + SECRET.encode()
        + b"\r\n\r\n",
    ],
    ids=["long request line", "long header", "bad version", "control character"],
)
async def test_a_refused_request_never_echoes_a_secret(svc: Service, raw: bytes) -> None:
    """Regression (review): the parser's message quotes the start of the line it
    refuses, and `http_request_refused` and the answer's detail passed it on: a status
    token or an API key reached the log."""
    port = svc.http.port
    assert port is not None
    log.configure("info")
    try:
        with structlog.testing.capture_logs(processors=[merge_contextvars]) as logs:
            status, headers, body = await _send(port, raw)
    finally:
        log.configure(os.environ.get("TENANTRY_TEST_LOG_LEVEL", "warning"))
    assert status == 400 and headers["content-type"] == "application/problem+json"
    assert "KEYSECRET" not in body.decode("utf-8", "replace")
    assert "KEYSECRET" not in repr(logs)
    # Only the refusal's own lines: the service's other coroutines (the listener
    # reconnecting, the maintenance loop) may log while the capture is open.
    http_lines = [e["event"] for e in logs if str(e["event"]).startswith("http_")]
    assert http_lines == ["http_request_refused"]


async def test_a_refused_preflight_says_why(svc: Service) -> None:
    """Regression (review): a preflight from an origin not listed was a problem whose
    detail was only "Forbidden"."""
    port = svc.http.port
    assert port is not None
    raw = (
        b"OPTIONS /v1/onboardings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Origin: http://evil.example\r\n"
        b"Access-Control-Request-Method: POST\r\n\r\n"
    )
    status, headers, body = await _send(port, raw)
    assert status == 403 and headers["content-type"] == "application/problem+json"
    detail = orjson.loads(body)["detail"]
    assert "http://evil.example" in detail and "not allowed" in detail, detail
