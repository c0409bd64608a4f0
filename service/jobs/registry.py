"""Handlers and their policies.

The application builds a `Registry`, decorates its handlers, and points
TENANTRY_HANDLERS at it (`pkg.module:registry`, like `module:app` for ASGI servers).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from croniter import croniter

from ..errors import ConfigError

if TYPE_CHECKING:
    from .model import Job

Handler = Callable[["Job"], Awaitable[None]]


@dataclass(frozen=True)
class Policy:
    max_attempts: int = 25
    backoff_base: float = 1.0
    backoff_cap: float = 3600.0
    timeout: float | None = None  # None: the process default (TENANTRY_JOB_TIMEOUT)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.backoff_base <= 0 or self.backoff_cap < self.backoff_base:
            raise ValueError("need 0 < backoff_base <= backoff_cap")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be > 0")


NIL_TENANT = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class Periodic:
    """When a periodic handler is due: a cron expression or a fixed interval."""

    cron: str | None = None
    every: timedelta | None = None
    tenant_id: str = NIL_TENANT
    payload: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ValueError("a periodic handler needs exactly one of cron= or every=")
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise ValueError(f"invalid cron expression {self.cron!r}")
        if self.every is not None and self.every.total_seconds() < 1:
            raise ValueError("every= must be at least one second")

    def period_start(self, now: datetime) -> datetime:
        """The start of the period containing `now` (the dedup key of its run)."""
        if self.cron is not None:
            itr = croniter(self.cron, now)
            start: datetime = itr.get_prev(datetime)
            # croniter's get_prev is strictly before `now`; `now` itself may be a boundary.
            nxt: datetime = croniter(self.cron, start).get_next(datetime)
            return nxt if nxt <= now else start
        assert self.every is not None
        step = self.every.total_seconds()
        epoch = now.timestamp()
        return datetime.fromtimestamp(epoch - (epoch % step), tz=now.tzinfo)

    def next_after(self, start: datetime) -> datetime:
        if self.cron is not None:
            nxt: datetime = croniter(self.cron, start).get_next(datetime)
            return nxt
        assert self.every is not None
        return start + self.every


@dataclass(frozen=True)
class Registration:
    kind: str
    handler: Handler
    queue: str
    policy: Policy
    periodic: Periodic | None


class Registry:
    def __init__(self) -> None:
        self._by_kind: dict[str, Registration] = {}

    def handler(
        self,
        kind: str,
        *,
        queue: str = "default",
        policy: Policy | None = None,
        cron: str | None = None,
        every: timedelta | None = None,
        periodic_tenant: str = NIL_TENANT,
    ) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.add(
                kind,
                fn,
                queue=queue,
                policy=policy,
                cron=cron,
                every=every,
                periodic_tenant=periodic_tenant,
            )
            return fn

        return register

    def add(
        self,
        kind: str,
        fn: Handler,
        *,
        queue: str = "default",
        policy: Policy | None = None,
        cron: str | None = None,
        every: timedelta | None = None,
        periodic_tenant: str = NIL_TENANT,
    ) -> None:
        if kind in self._by_kind:
            raise ValueError(f"job kind {kind!r} is registered twice")
        periodic = None
        if cron is not None or every is not None:
            periodic = Periodic(cron=cron, every=every, tenant_id=periodic_tenant)
        self._by_kind[kind] = Registration(kind, fn, queue, policy or Policy(), periodic)

    def get(self, kind: str) -> Registration | None:
        return self._by_kind.get(kind)

    def kinds(self) -> list[str]:
        return sorted(self._by_kind)

    def periodic(self) -> list[Registration]:
        return [r for r in self._by_kind.values() if r.periodic is not None]

    def merge(self, other: Registry) -> None:
        for reg in other._by_kind.values():
            if reg.kind in self._by_kind:
                raise ValueError(f"job kind {reg.kind!r} is registered twice")
            self._by_kind[reg.kind] = reg


def load(specs: Iterable[str]) -> Registry:
    """Import `pkg.module:attr` specs and merge their registries into one."""
    merged = Registry()
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"TENANTRY_HANDLERS: cannot import {module_name!r}: {exc}") from exc
        obj = getattr(module, attr, None)
        if not isinstance(obj, Registry):
            raise ConfigError(
                f"TENANTRY_HANDLERS: {spec!r} is not a tenantry Registry (got {type(obj).__name__})"
            )
        try:
            merged.merge(obj)
        except ValueError as exc:
            raise ConfigError(f"TENANTRY_HANDLERS: {exc}") from exc
    return merged
