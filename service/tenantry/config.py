"""Configuration from environment variables, validated once at startup.

Every variable is documented in the README's configuration table; a bad value stops
the process with a message naming the variable, never a traceback.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from .errors import ConfigError
from .tenancy import TENANT_CONTEXT_MODES
from .webhooks.policy import DEFAULT_SCHEDULE, parse_schedule

T = TypeVar("T")

_QUEUE_NAME_MAX = 100
_SECRET_VARS = frozenset(
    {
        "DATABASE_URL",
        "TENANTRY_ADMIN_URL",
        "TENANTRY_LISTEN_URL",
        "TENANTRY_WORKER_URL",
        "TENANTRY_METRICS_URL",
        "TENANTRY_SMTP_URL",
        "TENANTRY_TOKEN_SECRET",
        "TENANTRY_SECRET_KEY",
        "TENANTRY_ANALYTICS_URL",
    }
)


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    # Used only to migrate (create roles, own the schema); DATABASE_URL when unset.
    admin_url: str | None = None
    # The listener's own connection (LISTEN needs a session); DATABASE_URL when unset.
    listen_url: str | None = None
    # DATABASE_URL and TENANTRY_WORKER_URL go through a transaction-mode pooler
    # (PgBouncer): no prepared-statement cache, no session settings at connect.
    db_pooler_transaction: bool = False
    # The worker's login for the cross-tenant functions; derived from DATABASE_URL
    # (user + "_worker", same password) when unset.
    worker_url: str | None = None
    # The autoscaler's login (tenantry.worker_demand only), which `tenantry migrate`
    # creates when set; the service itself never connects with it.
    metrics_url: str | None = None
    data_dir: Path = Path(".tenantry")
    host: str = "127.0.0.1"
    # Print a one-time sign-in link to /ops at start (the embedded default only).
    ops_sign_in_link: bool = False
    port: int = 8080
    handlers: tuple[str, ...] = ()
    log_level: str = "info"
    # queue name -> concurrency (slots) in this process
    queues: Mapping[str, int] = field(default_factory=lambda: {"default": 10})
    # False: claim no jobs (an HTTP-only process; other processes work the queues).
    run_worker: bool = True
    # False: serve no public HTTP (the API, the sign-up page, /ops): a worker-only
    # process, with /healthz, /readyz and /metrics on its port for probes and scrapes.
    run_http: bool = True
    # running jobs one tenant may hold per queue in this process's claims (None: no cap)
    tenant_concurrency: int | None = None
    # rows claimed ahead of free slots, as a fraction of a queue's concurrency
    prefetch: float = 0.5
    poll_interval: float = 1.0
    lease_seconds: float = 30.0
    job_timeout: float = 300.0
    shutdown_grace: float = 25.0
    pool_size: int = 10
    counter_retention_days: int = 14
    maintenance_interval: float = 5.0
    migrate_on_start: bool = True
    # Onboarding: mail, status tokens, the public endpoint's rate limit, the streams.
    smtp_url: str | None = None
    mail_from: str = "Tenantry <no-reply@localhost>"
    token_secret: str | None = None
    token_ttl: int = 86_400
    signup_rate: float = 1.0  # requests per second per client, sustained
    signup_burst: int = 10
    onboarding_queue: str = "default"
    outbox_retention_days: int = 30
    idempotency_retention_hours: int = 24
    # Proxies whose X-Forwarded-For names the client (rate limits); none by default.
    trusted_proxies: str = ""
    sse_queue_size: int = 64
    sse_keepalive: float = 15.0
    # Tune the garbage collector while more than 1,000 streams are open (hub.py).
    sse_gc_tuning: bool = True
    # Seconds a job whose kind this process has no handler for is retried before it is
    # dead-lettered as `unknown_kind` (a rolling deploy: old processes meet new kinds).
    unknown_kind_retry: float = 3600.0
    # IPv6 clients are rate-limited by this prefix: one subscriber usually holds a whole
    # /64 and can pick any address in it.
    signup_ipv6_prefix: int = 64
    # Origins (scheme://host[:port], exactly) whose pages may call the public sign-up
    # routes from a browser (CORS).  None by default: same origin only.
    cors_origins: tuple[str, ...] = ()
    # Webhooks.  The key that encrypts the endpoints' signing secrets at rest (kept in
    # the data folder when unset).
    secret_key: str | None = None
    # Networks (CIDRs) webhooks may reach although they are not public; None: unset
    # (the embedded default then allows loopback), "" none.
    webhook_allow_networks: str | None = None
    webhook_allow_http: bool | None = None  # None: unset (true in the embedded default)
    webhook_concurrency: int = 128
    webhook_endpoint_concurrency: int = 4
    webhook_tenant_concurrency: int = 16
    webhook_timeout: int = 15
    webhook_retry_schedule: tuple[int, ...] = DEFAULT_SCHEDULE
    webhook_retention_days: int = 30
    webhook_log_body_bytes: int = 64 * 1024
    webhook_breaker_failures: int = 10
    webhook_breaker_ratio: float = 0.5
    webhook_breaker_volume: int = 20
    webhook_breaker_window: float = 60.0
    webhook_breaker_cooldown: float = 30.0
    webhook_disable_after: float = 5 * 86_400.0
    webhook_rotation_grace: float = 86_400.0
    webhook_max_endpoints: int = 50
    # Seconds between the metrics' database readings (queue depth, backlog age).
    metrics_interval: float = 5.0
    # A `tenant` label on the job metrics: one series per tenant (cardinality).
    metrics_tenant_labels: bool = False
    # Serve /metrics on this port (same host) instead of the service port.
    metrics_port: int | None = None
    # How a transaction names its tenant: set_config() or SET LOCAL (what Citus
    # propagates to its worker nodes; tenancy.py).
    tenant_context: str = "set_config"
    # Analytics: the read replica, logged in as the analyst's login (tenantry_analyst),
    # for the dashboard's analytics page and `tenantry analytics`; None: not set up.
    analytics_url: str | None = None
    # Read analytics from a primary too (a development machine without a standby).
    analytics_allow_primary: bool = False
    # Seconds between refreshes of the analytics views on the primary, across all
    # processes; 0: this process never refreshes them.  from_env: 300 where
    # TENANTRY_ANALYTICS_URL is set, else 0.
    analytics_refresh: float = 0.0

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


def _parse(env: Mapping[str, str], name: str, conv: Callable[[str], T], default: T) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return conv(raw.strip())
    except (ValueError, TypeError) as exc:
        # A secret (or a URL that may hold a password) is never echoed back.
        shown = name if name in _SECRET_VARS else f"{name}={raw!r}"
        raise ConfigError(f"{shown}: {exc}") from None


def _finite_float(raw: str) -> float:
    # float() also reads "nan" and "inf": as a timer, NaN compares false with
    # everything (a check never due, or always) and infinity never arrives.
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _positive_float(raw: str) -> float:
    value = _finite_float(raw)
    if not value > 0:
        raise ValueError("must be a number > 0")
    return value


def _non_negative_float(raw: str) -> float:
    value = _finite_float(raw)
    if value < 0:
        raise ValueError("must be a number >= 0")
    return value


# A refresh rebuilds every analytics view: not more often than a minute, and at least
# once a week (a larger figure is a typo, and the database's interval type ends).
_REFRESH_MIN_S, _REFRESH_MAX_S = 60.0, 7 * 86_400.0


def _refresh_interval(raw: str) -> float:
    value = _finite_float(raw)
    if value != 0 and not _REFRESH_MIN_S <= value <= _REFRESH_MAX_S:
        raise ValueError(f"must be 0 (never) or {_REFRESH_MIN_S:.0f}-{_REFRESH_MAX_S:.0f} seconds")
    return value


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 4:
        raise ValueError("must be a number from 0 to 4")
    return value


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("must be an integer > 0") from None
    if value <= 0:
        raise ValueError("must be an integer > 0")
    return value


def _count(raw: str) -> int:
    """A count of places (attempts in flight): 1 to 100,000, which the claim's integer
    arguments and a process's sockets can take."""
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("must be a whole number from 1 to 100000") from None
    if not 1 <= value <= 100_000:
        raise ValueError("must be a whole number from 1 to 100000")
    return value


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("must be a port number 0-65535") from None
    if not 0 <= value <= _PORT_MAX:
        raise ValueError("must be a port number 0-65535")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _pooler(raw: str) -> bool:
    """True for a transaction-mode pooler; a session-mode one needs nothing."""
    lowered = raw.lower()
    if lowered not in {"none", "transaction"}:
        raise ValueError("must be none or transaction")
    return lowered == "transaction"


def _log_level(raw: str) -> str:
    lowered = raw.lower()
    if lowered not in {"debug", "info", "warning", "error"}:
        raise ValueError("must be one of debug, info, warning, error")
    return lowered


def _secret(raw: str) -> str:
    # The value never appears in the message: config errors are printed.
    if len(raw.encode("utf-8")) < 32:
        raise ValueError("must be at least 32 bytes (e.g. `openssl rand -hex 32`)")
    return raw


def _smtp_url(raw: str) -> str:
    from .onboarding.mail import parse_smtp_url  # noqa: PLC0415 - mail imports config-free code

    parse_smtp_url(raw)
    return raw


def _networks(raw: str) -> str:
    from .http.ratelimit import parse_networks  # noqa: PLC0415 - keep config import-light

    parse_networks(raw)  # ValueError names the bad entry
    return raw


def _webhook_networks(raw: str) -> str:
    from .webhooks.guard import parse_networks as parse_cidrs  # noqa: PLC0415

    parse_cidrs(raw)  # ValueError names the bad entry
    return raw


def _timeout(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("must be whole seconds from 1 to 60") from None
    if not 1 <= value <= 60:
        raise ValueError("must be whole seconds from 1 to 60")
    return value


def _ratio(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError("must be a number greater than 0, at most 1")
    return value


def _ipv6_prefix(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("must be a prefix length from 1 to 128") from None
    if not 1 <= value <= 128:
        raise ValueError("must be a prefix length from 1 to 128")
    return value


_ORIGIN = re.compile(
    r"^(?P<scheme>https?)://(?P<host>[a-z0-9.-]+|\[[0-9a-f:.]+\])(:(?P<port>[0-9]{1,5}))?$",
    re.IGNORECASE,
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PORT_MAX = 65535


def _postgres_url(raw: str) -> str:
    if not raw.startswith(("postgresql://", "postgres://")):
        # Only the scheme is shown: the rest may hold a password.
        scheme = raw.partition("://")[0] if "://" in raw else ""
        raise ValueError(
            f"must be a postgresql:// URL (postgresql://user:password@host:5432/database),"
            f" not {scheme + '://...' if scheme else 'this'}"
        )
    return raw


def _origins(raw: str) -> tuple[str, ...]:
    """Each origin as a browser sends it in `Origin` (scheme and host in lower case, no
    default port), since the match is exact."""
    origins: list[str] = []
    for origin in (o.strip() for o in raw.split(",") if o.strip()):
        m = _ORIGIN.match(origin)
        if m is None:
            raise ValueError(
                f"{origin[:80]!r} is not an origin: scheme://host[:port], no path, no"
                " trailing slash (e.g. https://app.example.com)"
            )
        scheme, host = m["scheme"].lower(), m["host"].lower()
        port = int(m["port"]) if m["port"] is not None else None
        if port is not None and not 1 <= port <= _PORT_MAX:
            raise ValueError(f"{origin[:80]!r}: the port must be 1 to {_PORT_MAX}")
        suffix = "" if port in (None, _DEFAULT_PORTS[scheme]) else f":{port}"
        origins.append(f"{scheme}://{host}{suffix}")
    return tuple(origins)


def _queue_name(raw: str) -> str:
    if len(raw) > _QUEUE_NAME_MAX:
        raise ValueError(f"must be at most {_QUEUE_NAME_MAX} characters")
    return raw


def parse_queues(raw: str) -> dict[str, int]:
    """`default=10,email=4` -> {"default": 10, "email": 4}."""
    queues: dict[str, int] = {}
    for raw_item in raw.split(","):
        item = raw_item.strip()
        if not item:
            continue
        name, sep, count = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{item!r} is not of the form queue=concurrency")
        if len(name) > _QUEUE_NAME_MAX:
            raise ValueError(f"queue name {name[:20]!r}... is longer than {_QUEUE_NAME_MAX}")
        if name in queues:
            raise ValueError(f"queue {name!r} is listed twice")
        queues[name] = _positive_int(count.strip())
    if not queues:
        raise ValueError("names no queue")
    return queues


def _handlers(raw: str) -> tuple[str, ...]:
    specs = tuple(s.strip() for s in raw.split(",") if s.strip())
    for spec in specs:
        module, sep, attr = spec.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"{spec!r} is not of the form package.module:registry")
    return specs


def local_base_url(host: str, port: int) -> str:
    """Where this machine reaches a service bound to `host`: a wildcard address is
    reached on loopback, and an IPv6 address goes in brackets."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def check_for_run(settings: Settings) -> None:
    """What no single variable shows wrong, for `tenantry run`."""
    if not settings.run_worker and not settings.run_http:
        raise ConfigError(
            "TENANTRY_WORKER=false and TENANTRY_HTTP=false (--no-worker, --no-http): a"
            " process that claims no jobs and serves no requests has nothing to do"
        )
    if settings.metrics_port is not None and settings.metrics_port == settings.port != 0:
        raise ConfigError(
            f"TENANTRY_METRICS_PORT={settings.metrics_port} is the service's own port"
            " (TENANTRY_PORT): leave it unset to serve /metrics there, or pick another"
        )
    if settings.db_pooler_transaction and settings.listen_url is None:
        # LISTEN through the pooler would be silently lost with its server connection.
        raise ConfigError(
            "TENANTRY_DB_POOLER=transaction needs TENANTRY_LISTEN_URL: a direct (or"
            " session-mode) URL for the listener, whose LISTEN a transaction-mode pooler"
            " would drop without a word"
        )
    if settings.run_worker and settings.onboarding_queue not in settings.queues:
        # Sign-ups would be accepted and never provisioned, with no word of why.
        raise ConfigError(
            f"TENANTRY_ONBOARDING_QUEUE={settings.onboarding_queue!r} is not a queue this"
            f" process works (TENANTRY_QUEUES: {', '.join(settings.queues)}): add it to"
            " TENANTRY_QUEUES, or set TENANTRY_ONBOARDING_QUEUE to one of them (a process"
            " that should claim no jobs at all: TENANTRY_WORKER=false)"
        )


# Seconds between refreshes of the analytics views where TENANTRY_ANALYTICS_URL is set.
ANALYTICS_REFRESH_DEFAULT = 300.0


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    e = os.environ if env is None else env
    d = Settings()
    analytics_url = _parse(e, "TENANTRY_ANALYTICS_URL", _postgres_url, None)
    return Settings(
        database_url=_parse(e, "DATABASE_URL", _postgres_url, None),
        admin_url=_parse(e, "TENANTRY_ADMIN_URL", _postgres_url, None),
        listen_url=_parse(e, "TENANTRY_LISTEN_URL", _postgres_url, None),
        db_pooler_transaction=_parse(e, "TENANTRY_DB_POOLER", _pooler, False),
        worker_url=_parse(e, "TENANTRY_WORKER_URL", _postgres_url, None),
        metrics_url=_parse(e, "TENANTRY_METRICS_URL", _postgres_url, None),
        data_dir=_parse(e, "TENANTRY_DATA_DIR", Path, d.data_dir),
        host=_parse(e, "TENANTRY_HOST", str, d.host),
        port=_parse(e, "TENANTRY_PORT", _port, d.port),
        handlers=_parse(e, "TENANTRY_HANDLERS", _handlers, d.handlers),
        log_level=_parse(e, "TENANTRY_LOG_LEVEL", _log_level, d.log_level),
        queues=_parse(e, "TENANTRY_QUEUES", parse_queues, dict(d.queues)),
        run_worker=_parse(e, "TENANTRY_WORKER", _bool, d.run_worker),
        run_http=_parse(e, "TENANTRY_HTTP", _bool, d.run_http),
        tenant_concurrency=_parse(e, "TENANTRY_TENANT_CONCURRENCY", _positive_int, None),
        prefetch=_parse(e, "TENANTRY_PREFETCH", _fraction, d.prefetch),
        poll_interval=_parse(e, "TENANTRY_POLL_INTERVAL", _positive_float, d.poll_interval),
        lease_seconds=_parse(e, "TENANTRY_LEASE_SECONDS", _positive_float, d.lease_seconds),
        job_timeout=_parse(e, "TENANTRY_JOB_TIMEOUT", _positive_float, d.job_timeout),
        shutdown_grace=_parse(e, "TENANTRY_SHUTDOWN_GRACE", _non_negative_float, d.shutdown_grace),
        pool_size=_parse(e, "TENANTRY_POOL_SIZE", _positive_int, d.pool_size),
        counter_retention_days=_parse(
            e, "TENANTRY_COUNTER_RETENTION_DAYS", _positive_int, d.counter_retention_days
        ),
        maintenance_interval=_parse(
            e, "TENANTRY_MAINTENANCE_INTERVAL", _positive_float, d.maintenance_interval
        ),
        migrate_on_start=_parse(e, "TENANTRY_MIGRATE", _bool, d.migrate_on_start),
        smtp_url=_parse(e, "TENANTRY_SMTP_URL", _smtp_url, None),
        mail_from=_parse(e, "TENANTRY_MAIL_FROM", str, d.mail_from),
        token_secret=_parse(e, "TENANTRY_TOKEN_SECRET", _secret, None),
        token_ttl=_parse(e, "TENANTRY_TOKEN_TTL", _positive_int, d.token_ttl),
        signup_rate=_parse(e, "TENANTRY_SIGNUP_RATE", _positive_float, d.signup_rate),
        signup_burst=_parse(e, "TENANTRY_SIGNUP_BURST", _positive_int, d.signup_burst),
        onboarding_queue=_parse(e, "TENANTRY_ONBOARDING_QUEUE", _queue_name, d.onboarding_queue),
        outbox_retention_days=_parse(
            e, "TENANTRY_OUTBOX_RETENTION_DAYS", _positive_int, d.outbox_retention_days
        ),
        idempotency_retention_hours=_parse(
            e,
            "TENANTRY_IDEMPOTENCY_RETENTION_HOURS",
            _positive_int,
            d.idempotency_retention_hours,
        ),
        trusted_proxies=_parse(e, "TENANTRY_TRUSTED_PROXIES", _networks, d.trusted_proxies),
        sse_queue_size=_parse(e, "TENANTRY_SSE_QUEUE_SIZE", _positive_int, d.sse_queue_size),
        sse_keepalive=_parse(e, "TENANTRY_SSE_KEEPALIVE", _positive_float, d.sse_keepalive),
        sse_gc_tuning=_parse(e, "TENANTRY_SSE_GC_TUNING", _bool, d.sse_gc_tuning),
        unknown_kind_retry=_parse(
            e, "TENANTRY_UNKNOWN_KIND_RETRY", _non_negative_float, d.unknown_kind_retry
        ),
        signup_ipv6_prefix=_parse(
            e, "TENANTRY_SIGNUP_IPV6_PREFIX", _ipv6_prefix, d.signup_ipv6_prefix
        ),
        cors_origins=_parse(e, "TENANTRY_CORS_ORIGINS", _origins, d.cors_origins),
        secret_key=_parse(e, "TENANTRY_SECRET_KEY", _secret, None),
        webhook_allow_networks=_allow_networks(e),
        webhook_allow_http=_parse(e, "TENANTRY_WEBHOOK_ALLOW_HTTP", _bool, None),
        webhook_concurrency=_parse(
            e, "TENANTRY_WEBHOOK_CONCURRENCY", _count, d.webhook_concurrency
        ),
        webhook_endpoint_concurrency=_parse(
            e,
            "TENANTRY_WEBHOOK_ENDPOINT_CONCURRENCY",
            _count,
            d.webhook_endpoint_concurrency,
        ),
        webhook_tenant_concurrency=_parse(
            e, "TENANTRY_WEBHOOK_TENANT_CONCURRENCY", _count, d.webhook_tenant_concurrency
        ),
        webhook_timeout=_parse(e, "TENANTRY_WEBHOOK_TIMEOUT", _timeout, d.webhook_timeout),
        webhook_retry_schedule=_parse(
            e, "TENANTRY_WEBHOOK_RETRY_SCHEDULE", parse_schedule, d.webhook_retry_schedule
        ),
        webhook_retention_days=_parse(
            e, "TENANTRY_WEBHOOK_RETENTION_DAYS", _positive_int, d.webhook_retention_days
        ),
        webhook_log_body_bytes=_parse(
            e, "TENANTRY_WEBHOOK_LOG_BODY_BYTES", _positive_int, d.webhook_log_body_bytes
        ),
        webhook_breaker_failures=_parse(
            e, "TENANTRY_WEBHOOK_BREAKER_FAILURES", _positive_int, d.webhook_breaker_failures
        ),
        webhook_breaker_ratio=_parse(
            e, "TENANTRY_WEBHOOK_BREAKER_RATIO", _ratio, d.webhook_breaker_ratio
        ),
        webhook_breaker_volume=_parse(
            e, "TENANTRY_WEBHOOK_BREAKER_VOLUME", _positive_int, d.webhook_breaker_volume
        ),
        webhook_breaker_window=_parse(
            e, "TENANTRY_WEBHOOK_BREAKER_WINDOW", _positive_float, d.webhook_breaker_window
        ),
        webhook_breaker_cooldown=_parse(
            e, "TENANTRY_WEBHOOK_BREAKER_COOLDOWN", _positive_float, d.webhook_breaker_cooldown
        ),
        webhook_disable_after=_parse(
            e, "TENANTRY_WEBHOOK_DISABLE_AFTER", _positive_float, d.webhook_disable_after
        ),
        webhook_rotation_grace=_parse(
            e, "TENANTRY_WEBHOOK_ROTATION_GRACE", _non_negative_float, d.webhook_rotation_grace
        ),
        webhook_max_endpoints=_parse(
            e, "TENANTRY_WEBHOOK_MAX_ENDPOINTS", _positive_int, d.webhook_max_endpoints
        ),
        metrics_interval=_parse(
            e, "TENANTRY_METRICS_INTERVAL", _positive_float, d.metrics_interval
        ),
        metrics_tenant_labels=_parse(
            e, "TENANTRY_METRICS_TENANT_LABELS", _bool, d.metrics_tenant_labels
        ),
        metrics_port=_parse(e, "TENANTRY_METRICS_PORT", _port, d.metrics_port),
        tenant_context=_parse(e, "TENANTRY_TENANT_CONTEXT", _tenant_context, d.tenant_context),
        analytics_url=analytics_url,
        analytics_allow_primary=_parse(
            e, "TENANTRY_ANALYTICS_ALLOW_PRIMARY", _bool, d.analytics_allow_primary
        ),
        # A refresh scans weeks of jobs, deliveries and sign-ups: by default only where
        # analytics is set up (TENANTRY_ANALYTICS_URL), never for nobody.
        analytics_refresh=_parse(
            e,
            "TENANTRY_ANALYTICS_REFRESH",
            _refresh_interval,
            ANALYTICS_REFRESH_DEFAULT if analytics_url else 0.0,
        ),
    )


def _tenant_context(raw: str) -> str:
    if raw not in TENANT_CONTEXT_MODES:
        raise ValueError(f"must be one of {', '.join(TENANT_CONTEXT_MODES)}")
    return raw


def _allow_networks(env: Mapping[str, str]) -> str | None:
    """Unset (None) differs from empty here: unset lets the embedded default allow
    loopback; set to empty allows nothing."""
    if "TENANTRY_WEBHOOK_ALLOW_NETWORKS" not in env:
        return None
    return _parse(env, "TENANTRY_WEBHOOK_ALLOW_NETWORKS", _webhook_networks, "")


# The embedded default (no DATABASE_URL): a developer's machine, where the receiver of
# a first webhook usually listens on loopback over plain http.
EMBEDDED_WEBHOOK_NETWORKS = "127.0.0.0/8,::1/128"


def embedded_defaults(settings: Settings) -> Settings:
    """What the embedded default changes, where no variable says otherwise."""
    changes: dict[str, object] = {}
    if settings.webhook_allow_networks is None:
        changes["webhook_allow_networks"] = EMBEDDED_WEBHOOK_NETWORKS
    if settings.webhook_allow_http is None:
        changes["webhook_allow_http"] = True
    # As Jupyter does: the embedded default prints a one-time link to its dashboard.
    changes["ops_sign_in_link"] = True
    return settings.with_overrides(**changes)
