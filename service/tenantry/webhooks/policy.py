"""What an attempt's outcome means for its delivery: delivered, retried (when), or
dead-lettered; pure functions of the attempt, the schedule and injected randomness.

Classification (Standard Webhooks and Svix practice): a 2xx is delivered; 410 Gone
disables the endpoint (the delivery waits, parked, for it to be enabled again); a
response header `webhook-delivery: abort-message` ends the delivery's retries (dead,
reason `aborted`); 429 and 503 honour `Retry-After`, clamped between the schedule's
next delay and twice it; any other response, a timeout, or a DNS, connection or TLS
error is retried on the schedule; after its last attempt a delivery is dead-lettered,
never dropped.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ..clock import Random

# Seconds before each attempt: the first at once, then 5 s, 5 min, 30 min, 2 h, 5 h,
# 10 h, 14 h, 20 h and 24 h (ten attempts over about three days).
DEFAULT_SCHEDULE: tuple[int, ...] = (
    0,
    5,
    300,
    1800,
    7200,
    18000,
    36000,
    50400,
    72000,
    86400,
)
JITTER = 0.2
ABORT_HEADER = "webhook-delivery"
ABORT_VALUE = "abort-message"


@dataclass(frozen=True, slots=True)
class Decision:
    result: str  # delivered, failed, gone, aborted, refused
    success: bool
    next_state: str  # delivered, pending, dead
    next_attempt_at: datetime | None
    reason: str | None


def parse_schedule(raw: str) -> tuple[int, ...]:
    """`0,5,300` -> (0, 5, 300); ValueError unless 1 to 30 whole seconds, each 0 to 7
    days."""
    try:
        delays = tuple(int(p.strip()) for p in raw.split(",") if p.strip())
    except ValueError:
        raise ValueError("must be whole seconds separated by commas, e.g. 0,5,300") from None
    check_schedule(delays)
    return delays


def check_schedule(delays: Sequence[int]) -> None:
    if not 1 <= len(delays) <= 30:
        raise ValueError("must list 1 to 30 delays")
    if any(not 0 <= d <= 7 * 86400 for d in delays):
        raise ValueError("each delay must be 0 to 604800 seconds (7 days)")


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """A `Retry-After` header (seconds or an HTTP date) in seconds from `now`."""
    if not value:
        return None
    value = value.strip()
    # isdigit() alone admits "²" and "①", which float() refuses: ASCII digits only.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - now).total_seconds(), 0.0)


def next_delay(schedule: Sequence[int], attempts: int, rng: Random) -> float | None:
    """Seconds until the attempt after attempt number `attempts` (1-based), with ±20%
    jitter (so that a receiver's outage does not end in a synchronized stampede), or
    None when the schedule is used up."""
    if attempts >= len(schedule):
        return None
    base = schedule[attempts]
    return base * (1 + JITTER * (2 * rng.random() - 1))


def decide(
    *,
    attempts: int,
    schedule: Sequence[int],
    status: int | None,
    headers: Mapping[str, str],
    error_class: str | None,
    now: datetime,
    rng: Random,
) -> Decision:
    """The delivery's next state after its attempt number `attempts` (1-based) ended
    with `status` (None: no response, `error_class` says why)."""
    if status is not None and 200 <= status < 300:
        return Decision("delivered", True, "delivered", None, None)
    if status is not None and headers.get(ABORT_HEADER, "").strip().lower() == ABORT_VALUE:
        return Decision("aborted", False, "dead", None, "aborted")
    result = "gone" if status == 410 else "refused" if error_class == "refused" else "failed"
    delay = next_delay(schedule, attempts, rng)
    if delay is None:
        return Decision(result, False, "dead", None, "exhausted")
    if status in (429, 503):
        asked = retry_after_seconds(headers.get("retry-after"), now)
        scheduled = float(schedule[attempts])
        if asked is not None:
            delay = min(max(asked, scheduled), 2 * scheduled)
    return Decision(result, False, "pending", now + timedelta(seconds=delay), None)
