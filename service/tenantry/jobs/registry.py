"""Handlers and their policies.

The application builds a `Registry`, decorates its handlers, and points
TENANTRY_HANDLERS at it (`pkg.module:registry`, like `module:app` for ASGI servers).
"""

from __future__ import annotations

import contextlib
import importlib
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from croniter import croniter

from ..errors import ConfigError
from ..tenancy import SYSTEM_TENANT, parse_tenant_id

if TYPE_CHECKING:
    from .model import Job

Handler = Callable[["Job"], Awaitable[None]]

# The kind of a job's dead-letter hook job: the job's kind with this suffix.
DEAD_HOOK_SUFFIX = ":on_dead"
_KIND_MAX = 200


@dataclass(frozen=True)
class Policy:
    """How a kind's jobs are retried: up to `max_attempts` runs; after the n-th failed
    one, a random delay of up to min(`backoff_cap`, `backoff_base` * 2**(n-1)) seconds
    ("full jitter"); each run may take `timeout` seconds (None: TENANTRY_JOB_TIMEOUT)."""

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


@dataclass(frozen=True)
class DeadLetter:
    """A job that was dead-lettered, as its kind's `on_dead` hook receives it."""

    job_id: int
    tenant_id: uuid.UUID
    kind: str
    payload: Any  # decoded; its JSON text when it cannot be (what may have killed it)
    # exhausted (its attempts used up, a time-out or a crash on the last one included),
    # permanent (PermanentFailure), cancelled (Cancel)
    reason: str
    error: str
    attempts: int
    created_at: str

    @classmethod
    def from_hook_job(cls, job: Job) -> DeadLetter:
        p = job.payload
        # The dead job's payload comes as its JSON text (tenantry.record_job_outcomes);
        # one that cannot be decoded (what may have killed the job) is given as text.
        payload: Any = p.get("payload")
        if isinstance(payload, str):
            with contextlib.suppress(orjson.JSONDecodeError):
                payload = orjson.loads(payload)
        return cls(
            job_id=int(p["job_id"]),
            tenant_id=job.tenant_id,
            kind=str(p["kind"]),
            payload=payload,
            reason=str(p["reason"]),
            error=str(p.get("error") or ""),
            attempts=int(p.get("attempts") or 0),
            created_at=str(p.get("created_at") or ""),
        )


OnDead = Callable[["Job", DeadLetter], Awaitable[None]]


@dataclass(frozen=True)
class Periodic:
    """When a periodic handler is due (a cron expression or a fixed interval), and
    where its jobs go (the tenant, the system tenant by default, and the queue)."""

    cron: str | None = None
    every: timedelta | None = None
    tenant_id: uuid.UUID = SYSTEM_TENANT
    queue: str = "default"
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
    policy: Policy
    periodic: Periodic | None
    # The kind of the job that runs this kind's dead-letter hook, if it has one.
    dead_hook_kind: str | None = None


class Registry:
    """The job kinds a process can run, each with its handler and policy.  Register with
    the `handler` decorator (or `add`); point `TENANTRY_HANDLERS` at the registry
    (`myapp.jobs:registry`) for `tenantry run` to run them."""

    def __init__(self) -> None:
        self._by_kind: dict[str, Registration] = {}

    def handler(
        self,
        kind: str,
        *,
        policy: Policy | None = None,
        cron: str | None = None,
        every: timedelta | None = None,
        periodic_tenant: uuid.UUID | str = SYSTEM_TENANT,
        periodic_queue: str = "default",
        on_dead: OnDead | None = None,
    ) -> Callable[[Handler], Handler]:
        """Register the decorated function as the handler of `kind`.

        `cron=` or `every=` make it periodic: one job per period, in `periodic_queue`,
        for `periodic_tenant` (the system tenant, the nil UUID, by default).
        `on_dead(job, dead)` runs when a job of this kind is dead-lettered for any
        reason: its attempts exhausted (a time-out or a crash on the last one
        included), a PermanentFailure, a Cancel.  It runs as a job of its own, retried
        with this kind's policy, enqueued in the transaction that buries the job."""

        def register(fn: Handler) -> Handler:
            self.add(
                kind,
                fn,
                policy=policy,
                cron=cron,
                every=every,
                periodic_tenant=periodic_tenant,
                periodic_queue=periodic_queue,
                on_dead=on_dead,
            )
            return fn

        return register

    def add(
        self,
        kind: str,
        fn: Handler,
        *,
        policy: Policy | None = None,
        cron: str | None = None,
        every: timedelta | None = None,
        periodic_tenant: uuid.UUID | str = SYSTEM_TENANT,
        periodic_queue: str = "default",
        on_dead: OnDead | None = None,
    ) -> None:
        """Register `fn` as the handler of `kind` (the `handler` decorator's options)."""
        if not kind or len(kind) > _KIND_MAX - len(DEAD_HOOK_SUFFIX):
            raise ValueError(f"a kind is 1 to {_KIND_MAX - len(DEAD_HOOK_SUFFIX)} characters")
        if kind.endswith(DEAD_HOOK_SUFFIX):
            raise ValueError(f"kinds ending in {DEAD_HOOK_SUFFIX!r} are the dead-letter hooks'")
        periodic = None
        if cron is not None or every is not None:
            periodic = Periodic(
                cron=cron,
                every=every,
                tenant_id=parse_tenant_id(periodic_tenant),
                queue=periodic_queue,
            )
        pol = policy or Policy()
        hook_kind = kind + DEAD_HOOK_SUFFIX if on_dead is not None else None
        self._put(Registration(kind, fn, pol, periodic, hook_kind))
        if on_dead is not None:
            assert hook_kind is not None

            async def run_hook(job: Job, hook: OnDead = on_dead) -> None:
                await hook(job, DeadLetter.from_hook_job(job))

            self._put(Registration(hook_kind, run_hook, pol, None))

    def _put(self, reg: Registration) -> None:
        if reg.kind in self._by_kind:
            raise ValueError(f"job kind {reg.kind!r} is registered twice")
        self._by_kind[reg.kind] = reg

    def get(self, kind: str) -> Registration | None:
        return self._by_kind.get(kind)

    def kinds(self) -> list[str]:
        return sorted(self._by_kind)

    def periodic(self) -> list[Registration]:
        return [r for r in self._by_kind.values() if r.periodic is not None]

    def merge(self, other: Registry) -> None:
        for reg in other._by_kind.values():
            self._put(reg)


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
