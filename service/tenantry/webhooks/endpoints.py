"""A tenant's webhook endpoints: register, read, change, rotate the secret, test,
delete.  Every operation runs in the tenant's context, so row-level security confines
it to the tenant's own endpoints."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..errors import Conflict, Invalid, InvalidRequest, NotFound
from ..outbox import store as outbox
from ..sql import queries_for
from ..tenancy import tenant_tx
from ..timefmt import utc_text
from . import secrets
from .guard import Guard
from .model import EndpointSpec, schedule_list
from .secrets import SecretBox

Q = queries_for(__file__)
AGGREGATE = "webhook_endpoint"
TEST_EVENT = "webhook.test"
HISTORY = 50


@dataclass(frozen=True)
class EndpointRules:
    """What the service allows: plain http (besides https), how many endpoints a
    tenant may have, how long a rotated-out secret keeps signing."""

    allow_http: bool = False
    max_per_tenant: int = 50
    rotation_grace_seconds: float = 86_400.0


def _time(value: Any) -> str | None:
    return None if value is None else utc_text(value)


def view(row: asyncpg.Record) -> dict[str, Any]:
    """An endpoint as the API shows it: never its secret."""
    return {
        "id": str(row["id"]),
        "url": row["url"],
        "description": row["description"],
        "event_types": list(row["event_types"]),
        "headers": row["headers"],
        "rate_limit": row["rate_limit"],
        "timeout_seconds": row["timeout_seconds"],
        "retry_schedule": schedule_list(row["retry_schedule"]),
        "enabled": row["enabled"],
        "disabled_reason": row["disabled_reason"],
        "disabled_at": _time(row["disabled_at"]),
        "circuit": {
            "state": row["circuit_state"],
            "consecutive_failures": row["circuit_failures"],
            "opened_at": _time(row["circuit_opened_at"]),
            "retry_at": _time(row["circuit_retry_at"]),
        },
        "last_success_at": _time(row["last_success_at"]),
        "failing_since": _time(row["failing_since"]),
        "previous_secret_expires_at": _time(row["previous_secret_until"]),
        "created_at": utc_text(row["created_at"]),
        "updated_at": utc_text(row["updated_at"]),
    }


class Endpoints:
    """The endpoint operations, with what they need: the tenant login's pool, the
    secret box, the address guard and the service's rules."""

    def __init__(self, pool: asyncpg.Pool, box: SecretBox, guard: Guard, rules: EndpointRules):
        self.pool = pool
        self.box = box
        self.guard = guard
        self.rules = rules

    async def _check_url(self, url: str) -> None:
        try:
            await self.guard.check_url(url, allow_http=self.rules.allow_http)
        except Invalid as exc:
            raise InvalidRequest([exc]) from None

    async def create(
        self,
        tenant_id: uuid.UUID,
        spec: EndpointSpec,
    ) -> tuple[dict[str, Any], str]:
        """The new endpoint and its secret (generated unless the spec gives one), which is
        shown in full only now and on rotation."""
        assert spec.url is not None
        await self._check_url(spec.url)
        secret = spec.secret or secrets.generate()
        endpoint_id = uuid.uuid4()
        async with tenant_tx(self.pool, tenant_id, index_plans=True) as tx:
            await tx.execute(Q["lock_tenant_endpoints"], tenant_id)
            if await tx.fetchval(Q["count_endpoints"], tenant_id) >= self.rules.max_per_tenant:
                raise Conflict(f"a tenant may have at most {self.rules.max_per_tenant} endpoints")
            row = await tx.fetchrow(
                Q["insert_endpoint"],
                tenant_id,
                endpoint_id,
                spec.url,
                spec.description,
                list(spec.event_types),
                dict(spec.headers),
                spec.rate_limit,
                spec.timeout_seconds,
                schedule_list(spec.retry_schedule),
                self.box.seal(tenant_id, endpoint_id, secret),
            )
        assert row is not None  # INSERT ... RETURNING
        return view(row), secret

    async def list_endpoints(self, tenant_id: uuid.UUID, limit: int = 1000) -> list[dict[str, Any]]:
        async with tenant_tx(self.pool, tenant_id, index_plans=True) as tx:
            return [view(r) for r in await tx.fetch(Q["list_endpoints"], tenant_id, limit)]

    async def get(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> dict[str, Any]:
        """The endpoint, with its history: the circuit's changes and its disabling, as
        the outbox has them (oldest first, the last `HISTORY` of them)."""
        async with tenant_tx(self.pool, tenant_id, index_plans=True) as tx:
            row = await tx.fetchrow(Q["get_endpoint"], tenant_id, endpoint_id)
            if row is None:
                raise NotFound(f"no webhook endpoint {endpoint_id}")
            events = await tx.fetch(Q["endpoint_history"], tenant_id, str(endpoint_id), HISTORY)
        history = [
            {
                "type": ev["event_type"],
                "at": utc_text(ev["created_at"]),
                "circuit": ev["payload"].get("circuit"),
                "consecutive_failures": ev["payload"].get("consecutive_failures"),
                "reason": ev["payload"].get("reason"),
            }
            for ev in reversed(events)
        ]
        return {**view(row), "history": history}

    async def update(
        self,
        tenant_id: uuid.UUID,
        endpoint_id: uuid.UUID,
        patch: EndpointSpec,
    ) -> dict[str, Any]:
        """Change the fields the patch gives; `enabled: true` re-enables a disabled
        endpoint with a closed circuit."""
        if "url" in patch.given and patch.url is not None:
            await self._check_url(patch.url)
        async with tenant_tx(self.pool, tenant_id, index_plans=True) as tx:
            row = await tx.fetchrow(Q["lock_endpoint"], tenant_id, endpoint_id)
            if row is None:
                raise NotFound(f"no webhook endpoint {endpoint_id}")

            def pick(name: str, current: Any) -> Any:
                return getattr(patch, name) if name in patch.given else current

            row = await tx.fetchrow(
                Q["update_endpoint"],
                tenant_id,
                endpoint_id,
                pick("url", row["url"]),
                pick("description", row["description"]),
                list(pick("event_types", row["event_types"])),
                dict(pick("headers", row["headers"])),
                pick("rate_limit", row["rate_limit"]),
                pick("timeout_seconds", row["timeout_seconds"]),
                schedule_list(pick("retry_schedule", row["retry_schedule"])),
                pick("enabled", row["enabled"]),
                "disabled by the tenant",
            )
        assert row is not None  # the row is locked: it is still there
        return view(row)

    async def rotate_secret(
        self,
        tenant_id: uuid.UUID,
        endpoint_id: uuid.UUID,
        secret: str | None = None,
    ) -> tuple[dict[str, Any], str]:
        """A new secret (generated unless given); the current one keeps signing beside it
        for the grace period, so receivers can switch without losing a delivery."""
        new = secret or secrets.generate()
        async with tenant_tx(self.pool, tenant_id, index_plans=True) as tx:
            row = await tx.fetchrow(
                Q["rotate_secret"],
                tenant_id,
                endpoint_id,
                self.box.seal(tenant_id, endpoint_id, new),
                self.rules.rotation_grace_seconds,
            )
        if row is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}")
        return view(row), new

    async def delete(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> int:
        """Delete the endpoint; its waiting deliveries are cancelled with the reason.
        Returns how many."""
        async with tenant_tx(self.pool, tenant_id, index_plans=True) as tx:
            if await tx.fetchval(Q["delete_endpoint"], tenant_id, endpoint_id) is None:
                raise NotFound(f"no webhook endpoint {endpoint_id}")
            status = await tx.execute(Q["cancel_endpoint_deliveries"], tenant_id, endpoint_id)
        return int(status.split()[-1])

    async def send_test(
        self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID
    ) -> tuple[uuid.UUID, int]:
        """Append a `webhook.test` event for this endpoint only, with its delivery; returns
        (delivery id, event id)."""
        async with tenant_tx(self.pool, tenant_id, index_plans=True) as tx:
            row = await tx.fetchrow(Q["get_endpoint"], tenant_id, endpoint_id)
            if row is None:
                raise NotFound(f"no webhook endpoint {endpoint_id}")
            if not row["enabled"]:
                raise Conflict("the endpoint is disabled: enable it (PATCH enabled=true) first")
            event_id = await outbox.emit(
                tx,
                tenant_id=tenant_id,
                aggregate_type=AGGREGATE,
                aggregate_id=str(endpoint_id),
                event_type=TEST_EVENT,
                payload={"endpoint_id": str(endpoint_id), "message": "a test event from Tenantry"},
            )
            delivery_id: uuid.UUID = await tx.fetchval(
                Q["insert_test_delivery"], tenant_id, endpoint_id, event_id
            )
            await tx.execute(Q["wake_deliverers"])
        return delivery_id, event_id
