"""An endpoint as a tenant describes it: parsing and validating the JSON of the
create and update routes (and the CLI's options), each error naming its field."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..errors import Invalid, InvalidRequest
from . import secrets
from .policy import check_schedule

DESCRIPTION_MAX = 500
EVENT_TYPES_MAX = 100
HEADERS_MAX = 20
HEADER_VALUE_MAX = 1000
RATE_LIMIT_MAX = 10_000
TIMEOUT_MAX = 60

# Matched whole (fullmatch): `$` would let a final newline through.
EVENT_TYPE = re.compile(r"\*|[A-Za-z0-9_:-][A-Za-z0-9_.:-]{0,199}(\.\*)?")
HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}")
# An event type as the outbox allows it (outbox_event_type): for filters.
EVENT_TYPE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
# What the delivery sets itself, or what would change how the request travels.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "expect",
        "user-agent",
        "proxy-authorization",
        "proxy-connection",
    }
)

CREATE_FIELDS = frozenset(
    {
        "url",
        "event_types",
        "description",
        "headers",
        "rate_limit",
        "secret",
        "timeout_seconds",
        "retry_schedule",
    }
)
PATCH_FIELDS = (CREATE_FIELDS - {"secret"}) | {"enabled"}


@dataclass(frozen=True)
class EndpointSpec:
    """Every settable field; in a patch, `given` names those the request set."""

    url: str | None = None
    event_types: tuple[str, ...] = ()
    description: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    rate_limit: int | None = None
    timeout_seconds: int | None = None
    retry_schedule: tuple[int, ...] | None = None
    secret: str | None = None
    enabled: bool | None = None
    given: frozenset[str] = frozenset()


def _event_types(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Invalid("event_types", "must be a list of event types")
    if len(value) > EVENT_TYPES_MAX:
        raise Invalid("event_types", f"must list at most {EVENT_TYPES_MAX} types")
    types: list[str] = []
    for item in value:
        if not isinstance(item, str) or not EVENT_TYPE.fullmatch(item):
            shown = repr(item)[:60]
            raise Invalid(
                "event_types",
                f"{shown} is not an event type: letters, digits and . _ : - (up to 200),"
                " optionally ending in .* for a prefix (invoice.*), or * for all",
            )
        if item not in types:
            types.append(item)
    return tuple(types)


def _headers(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Invalid("headers", "must be an object of header names to values")
    if len(value) > HEADERS_MAX:
        raise Invalid("headers", f"must hold at most {HEADERS_MAX} headers")
    headers: dict[str, str] = {}
    for name, val in value.items():
        if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
            raise Invalid("headers", f"{name[:60]!r} is not a header name")
        lowered = name.lower()
        if lowered in RESERVED_HEADERS or lowered.startswith("webhook-"):
            raise Invalid("headers", f"{name} is set by the delivery itself")
        if not isinstance(val, str):
            raise Invalid("headers", f"the value of {name} must be a string")
        if len(val) > HEADER_VALUE_MAX or any(ord(c) < 0x20 or ord(c) == 0x7F for c in val):
            raise Invalid(
                "headers",
                f"the value of {name} must be at most {HEADER_VALUE_MAX} characters"
                " without control characters",
            )
        if lowered in (k.lower() for k in headers):
            raise Invalid("headers", f"{name} is given twice")
        headers[name] = val
    return headers


def _integral(value: Any) -> int | None:
    """`value` as an int when it is a whole JSON number, however it was written: JSON
    has one number type, so 49.0 is 49 (as JSON Schema's `integer`, which the OpenAPI
    document states, has it).  None for anything else, booleans included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():  # not inf, not NaN
        return int(value)
    return None


def _whole(name: str, value: Any, low: int, high: int) -> int:
    number = _integral(value)
    if number is None:
        raise Invalid(name, "must be a whole number")
    if not low <= number <= high:
        raise Invalid(name, f"must be from {low} to {high}")
    return number


def _schedule(value: Any) -> tuple[int, ...]:
    delays = [_integral(v) for v in value] if isinstance(value, list) else [None]
    if any(d is None for d in delays):
        raise Invalid("retry_schedule", "must be a list of whole seconds")
    whole = [d for d in delays if d is not None]
    try:
        check_schedule(whole)
    except ValueError as exc:
        raise Invalid("retry_schedule", str(exc)) from None
    return tuple(whole)


def parse_endpoint(body: Any, *, patch: bool = False) -> EndpointSpec:
    """The create (or, with `patch`, update) request's fields; `InvalidRequest` naming
    every field at fault.  The URL's reachability is checked by the guard, later."""
    if not isinstance(body, dict):
        raise InvalidRequest([Invalid("", "the body must be a JSON object")])
    allowed = PATCH_FIELDS if patch else CREATE_FIELDS
    errors = [Invalid(str(k)[:50], "unknown field") for k in body if k not in allowed]
    values: dict[str, Any] = {}

    def take(name: str, parse: Any) -> None:
        if name not in body:
            return
        raw = body[name]
        try:
            values[name] = parse(raw)
        except Invalid as exc:
            errors.append(exc)

    if not patch and "url" not in body:
        errors.append(Invalid("url", "is required"))
    take("url", _url)
    take("event_types", _event_types)
    take("description", lambda v: _string("description", v, DESCRIPTION_MAX, empty=True))
    take("headers", _headers)
    take("rate_limit", lambda v: None if v is None else _whole("rate_limit", v, 1, RATE_LIMIT_MAX))
    take(
        "timeout_seconds",
        lambda v: None if v is None else _whole("timeout_seconds", v, 1, TIMEOUT_MAX),
    )
    take("retry_schedule", lambda v: None if v is None else _schedule(v))
    take("secret", lambda v: None if v is None else _secret(v))
    take("enabled", _enabled)
    if errors:
        raise InvalidRequest(errors)
    return EndpointSpec(**values, given=frozenset(values))


def _string(name: str, value: Any, most: int, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise Invalid(name, "must be a string")
    if not empty and not value.strip():
        raise Invalid(name, "must not be empty")
    if len(value) > most:
        raise Invalid(name, f"must be at most {most} characters")
    if "\x00" in value:
        raise Invalid(name, "must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(name, "must be valid Unicode text") from None
    return value


def _url(value: Any) -> str:
    """The URL as given, its scheme in lower case (HTTP://x and http://x are one URL;
    the database's check, like the guard, reads the scheme in lower case)."""
    text = _string("url", value, 2000)
    scheme, sep, rest = text.partition("://")
    return f"{scheme.lower()}{sep}{rest}" if sep else text


def _secret(value: Any) -> str:
    secrets.key_bytes(value)  # raises Invalid("secret", ...)
    return str(value)


def _enabled(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("enabled", "must be true or false")
    return value


def schedule_list(schedule: Sequence[int] | None) -> list[int] | None:
    return None if schedule is None else list(schedule)


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def parse_time(value: Any, name: str) -> datetime:
    """An RFC 3339 time with its offset (`2026-12-01T07:51:00Z`), in UTC; `Invalid`
    naming `name` for anything else (the other ISO 8601 forms included), or a time
    outside the years 1 to 9999 in UTC."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise Invalid(name, "must be an RFC 3339 time with its offset (2026-12-01T07:51:00Z)")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise Invalid(name, "is not an RFC 3339 time (e.g. 2026-12-01T07:51:00Z)") from None
    if when.tzinfo is None:
        raise Invalid(name, "must give its offset (Z for UTC)")
    try:
        return when.astimezone(UTC)
    except OverflowError:
        raise Invalid(name, "is outside the years 1 to 9999 in UTC") from None


def event_type_filter(value: str, name: str = "event_type") -> str:
    if not EVENT_TYPE_NAME.fullmatch(value):
        raise Invalid(name, "is not an event type (letters, digits and . _ : -, up to 200)")
    return value
