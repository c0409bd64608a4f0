"""What operators see and do across tenants (the CLI now, the dashboard later): the
deliveries and endpoints of every tenant, one delivery with its attempts, replay and
discard of one or of every delivery a filter selects, and the numbers behind
`tenantry jobs stats`.  Needs the worker's login (tenantry_operator)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from ..db import Conn
from ..errors import NotFound
from ..sql import queries_for

Q = queries_for(__file__)


@dataclass(frozen=True)
class DeliveryMatch:
    """A filter over every tenant's deliveries (None: any)."""

    state: str | None = None
    tenant_id: uuid.UUID | None = None
    endpoint_id: uuid.UUID | None = None
    event_type: str | None = None


async def deliveries(conn: Conn, match: DeliveryMatch, limit: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        Q["ops_deliveries"],
        match.state,
        match.tenant_id,
        match.endpoint_id,
        match.event_type,
        limit,
    )
    return [dict(r) for r in rows]


async def delivery(conn: Conn, delivery_id: uuid.UUID) -> dict[str, Any]:
    found = await conn.fetchval(Q["ops_delivery"], delivery_id)
    if found is None:
        raise NotFound(f"no webhook delivery {delivery_id}")
    return dict(found)


async def act(
    conn: Conn,
    action: str,
    *,
    delivery_id: uuid.UUID | None = None,
    match: DeliveryMatch | None = None,
    only_count: bool = False,
) -> int:
    """`replay` or `discard` the delivery `delivery_id`, or every one `match` selects;
    with `only_count`, how many that would be, changing nothing."""
    m = match or DeliveryMatch()
    n: int = await conn.fetchval(
        Q["ops_act"],
        action,
        delivery_id,
        m.state,
        m.tenant_id,
        m.endpoint_id,
        m.event_type,
        only_count,
    )
    return n


async def endpoints(conn: Conn, tenant_id: uuid.UUID | None, limit: int) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(Q["ops_endpoints"], tenant_id, limit)]


async def stats(conn: Conn) -> dict[str, Any]:
    row = await conn.fetchrow(Q["ops_stats"])
    assert row is not None
    return dict(row)
