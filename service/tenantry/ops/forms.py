"""The dashboard's input: query strings and form fields read into typed values, each
refusal an `Invalid` naming the field (a 422 page), never a database error.  What the
database cannot hold (a NUL byte, a number past bigint, a date past its range) is
refused here, before any statement."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ..errors import Invalid

BIGINT_MAX = 2**63 - 1
TEXT_MAX = 200

Source = Mapping[str, Any]


def text(src: Source, name: str) -> str | None:
    """A filter's text, trimmed (None: not given)."""
    raw = str(src.get(name, "")).strip()
    if not raw:
        return None
    if "\x00" in raw:
        raise Invalid(name, "must not contain a NUL character")
    if len(raw) > TEXT_MAX:
        raise Invalid(name, f"must be at most {TEXT_MAX} characters")
    return raw


def uuid_of(src: Source, name: str) -> uuid.UUID | None:
    raw = text(src, name)
    if raw is None:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise Invalid(name, "not a UUID") from exc


def choice(src: Source, name: str, choices: Sequence[str]) -> str | None:
    raw = text(src, name)
    if raw is not None and raw not in choices:
        raise Invalid(name, f"one of {', '.join(choices)}")
    return raw


def required_choice(src: Source, name: str, choices: Sequence[str]) -> str:
    found = choice(src, name, choices)
    if found is None:
        raise Invalid(name, f"required: one of {', '.join(choices)}")
    return found


def whole(raw: str, name: str, low: int = 0, high: int = BIGINT_MAX) -> int:
    """A whole number written in ASCII digits (`isdigit` admits ², which int() does
    not), within [low, high]."""
    if not (raw.isascii() and raw.isdigit()):
        raise Invalid(name, "a whole number")
    value = int(raw)
    if not low <= value <= high:
        raise Invalid(name, f"a whole number from {low} to {high}")
    return value


def whole_of(src: Source, name: str) -> int | None:
    raw = text(src, name)
    return None if raw is None else whole(raw, name)


def moment(raw: str, name: str) -> datetime:
    """An ISO 8601 time with its offset, within what PostgreSQL holds."""
    try:
        value = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise Invalid(name, "an ISO 8601 time") from exc
    if value.tzinfo is None:
        raise Invalid(name, "an ISO 8601 time with its offset")
    try:
        value.timestamp()  # out of range in UTC (year 1 at +14:00): refused here
    except (OverflowError, ValueError) as exc:
        raise Invalid(name, "a time out of range") from exc
    if not 1 < value.year < 9999:
        raise Invalid(name, "a time out of range")
    return value
