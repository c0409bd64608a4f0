"""A tenant's deliveries and their attempts: list (keyset-paged), show, replay one,
recover an endpoint's failed ones.  Run in the tenant's context."""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ..errors import Conflict, Invalid, NotFound
from ..sql import queries_for
from ..tenancy import tenant_tx
from ..timefmt import utc_text

Q = queries_for(__file__)
STATES = ("pending", "sending", "delivered", "dead", "cancelled")
PAGE_MAX = 100
# Past every real row: where the first page starts.
_END = (datetime(9999, 1, 1, tzinfo=UTC), uuid.UUID(int=(1 << 128) - 1))


@dataclass(frozen=True)
class DeliveryFilter:
    endpoint_id: uuid.UUID | None = None
    event_type: str | None = None
    state: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _time(value: datetime | None) -> str | None:
    return None if value is None else utc_text(value)


def msg_id(delivery_id: uuid.UUID) -> str:
    """The `webhook-id` a delivery is sent with, the same on every attempt."""
    return f"msg_{delivery_id.hex}"


def delivery_view(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "webhook_id": msg_id(row["id"]),
        "endpoint_id": str(row["endpoint_id"]),
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "state": row["state"],
        "attempts": row["attempts"],
        "next_attempt_at": _time(row["next_attempt_at"])
        if row["state"] in ("pending", "sending")
        else None,
        "last_status": row["last_status"],
        "last_error": row["last_error"],
        "reason": row["reason"],
        "created_at": utc_text(row["created_at"]),
        "updated_at": utc_text(row["updated_at"]),
        "finished_at": _time(row["finished_at"]),
    }


def attempt_view(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "attempt": row["attempt"],
        "attempted_at": utc_text(row["attempted_at"]),
        "url": row["url"],
        "result": row["result"],
        "request": {"headers": row["request_headers"], "body": row["request_body"]},
        "response": None
        if row["response_status"] is None
        else {
            "status": row["response_status"],
            "headers": row["response_headers"],
            "body": row["response_body"],
        },
        "duration_ms": round(row["duration_ms"], 3),
        "error_class": row["error_class"],
        "error": row["error"],
    }


def encode_cursor(created_at: datetime, delivery_id: uuid.UUID) -> str:
    raw = f"{created_at.astimezone(UTC).isoformat()}|{delivery_id}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii") + b"=" * (-len(cursor) % 4))
        when, _, ident = raw.decode("ascii").partition("|")
        at = datetime.fromisoformat(when)
        if at.tzinfo is None:
            raise ValueError("no offset")
        return at.astimezone(UTC), uuid.UUID(ident)
    except (ValueError, UnicodeError, binascii.Error, OverflowError):
        raise Invalid("cursor", "is not a cursor this API gave out") from None


async def list_deliveries(
    pool: asyncpg.Pool,
    tenant_id: uuid.UUID,
    filt: DeliveryFilter,
    *,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of deliveries, newest first, and the cursor of the next page (None at
    the end)."""
    after = decode_cursor(cursor) if cursor else _END
    if filt.until is not None and filt.until < after[0]:
        after = (filt.until, uuid.UUID(int=0))
    async with tenant_tx(pool, tenant_id, index_plans=True) as tx:
        rows = await tx.fetch(
            Q["list_deliveries"],
            tenant_id,
            after[0],
            after[1],
            filt.endpoint_id,
            filt.event_type,
            filt.state,
            filt.since,
            limit + 1,
        )
    page = rows[:limit]
    following = encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
    return [delivery_view(r) for r in page], following


async def get_delivery(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, delivery_id: uuid.UUID
) -> dict[str, Any]:
    """The delivery with every attempt on record, oldest first."""
    async with tenant_tx(pool, tenant_id, index_plans=True) as tx:
        row = await tx.fetchrow(Q["get_delivery"], tenant_id, delivery_id)
        if row is None:
            raise NotFound(f"no webhook delivery {delivery_id}")
        attempts = await tx.fetch(Q["delivery_attempts"], tenant_id, delivery_id)
    body = delivery_view(row)
    body["body"] = row["body"]
    body["attempt_log"] = [attempt_view(a) for a in attempts]
    return body


async def replay(pool: asyncpg.Pool, tenant_id: uuid.UUID, delivery_id: uuid.UUID) -> None:
    """Send a finished delivery (delivered, dead or cancelled) again, now."""
    async with tenant_tx(pool, tenant_id, index_plans=True) as tx:
        if await tx.fetchval(Q["replay_delivery"], tenant_id, delivery_id) is None:
            row = await tx.fetchrow(Q["get_delivery"], tenant_id, delivery_id)
            if row is None:
                raise NotFound(f"no webhook delivery {delivery_id}")
            if row["state"] in ("pending", "sending"):
                raise Conflict(f"the delivery is {row['state']}: it is still being delivered")
            raise Conflict("the delivery's endpoint was deleted")
        await tx.execute(Q["wake_deliverers"])


async def recover(
    pool: asyncpg.Pool,
    tenant_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    since: datetime,
    until: datetime | None,
) -> int:
    """Send again, now, every failed delivery of the endpoint created in the window
    (dead ones, and those waiting for a retry).  Returns how many."""
    async with tenant_tx(pool, tenant_id, index_plans=True) as tx:
        if await tx.fetchrow(Q["get_endpoint"], tenant_id, endpoint_id) is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}")
        status = await tx.execute(Q["recover_deliveries"], tenant_id, endpoint_id, since, until)
        count = int(status.split()[-1])
        if count:
            await tx.execute(Q["wake_deliverers"])
    return count
