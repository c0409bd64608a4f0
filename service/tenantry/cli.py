"""The `tenantry` command line.  Bad arguments get a one-line message and exit 2;
a failed operation (unknown job, database down) exits 1."""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import anyio
import asyncpg
import orjson

from . import (
    __version__,
    cli_analytics,
    cli_ops,
    cli_webhooks,
    config,
    db,
    migrate,
    roles,
    tenancy,
)
from . import logging as log
from .analytics import store as analytics
from .app import serve, webhook_security
from .embedded import EmbeddedPostgres
from .errors import (
    Conflict,
    InsecureRole,
    Invalid,
    MigrationBlocked,
    NoDatabase,
    NotFound,
    SchemaMismatch,
    TenantryError,
)
from .jobs import queue as jobs
from .jobs.registry import Registry
from .jobs.registry import load as load_registry
from .tenants import store as tenants
from .timefmt import utc_text
from .webhooks.endpoints import EndpointRules, Endpoints

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """Errors exit 2 with one line naming the command; a missing subcommand lists the
    choices (argparse would name its internal destination instead)."""

    def error(self, message: str) -> NoReturn:
        if message.endswith(f"required: {_COMMAND}"):
            message = f"choose a command: {', '.join(self._command_names())}"
        elif (unknown := _UNKNOWN_COMMAND.match(message)) is not None:
            message = (
                f"unknown command {unknown[1]}; choose one of: {', '.join(self._command_names())}"
            )
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def _command_names(self) -> list[str]:
        return list(
            next(a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction))
        )

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        """As argparse's, but arguments nobody took are refused by the command they were
        given to (`tenantry jobs list: error: ...`), not by the top-level parser."""
        given = list(sys.argv[1:] if args is None else args)
        if given and given[0].startswith("-") and given[0] not in self._option_string_actions:
            # Before a command: argparse would first complain that none was chosen.
            self.error(f"unrecognized arguments: {given[0]}")
        parsed, extras = self.parse_known_args(given, namespace)
        if extras:
            _innermost(self, parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def commands(self, dest: str) -> argparse._SubParsersAction[_Parser]:
        return self.add_subparsers(dest=dest, metavar=_COMMAND, required=True, parser_class=_Parser)


_COMMAND = "COMMAND"
_UNKNOWN_COMMAND = re.compile(rf"^argument {_COMMAND}: invalid choice: ('.*?') \(choose from")


def _innermost(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> _Parser:
    """The subcommand's parser the parsed arguments went down to."""
    current = parser
    while True:
        action = next(
            (a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None
        )
        chosen = getattr(parsed, action.dest, None) if action is not None else None
        if action is None or chosen is None:
            assert isinstance(current, _Parser)
            return current
        current = action.choices[chosen]


# Control characters other than the line break, C1 included: text from a tenant's
# payload (an error message) must not clear the operator's screen or forge a line.
_TERMINAL_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _out(text: str) -> None:
    safe = _TERMINAL_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    sys.stdout.write(safe + "\n")


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    sys.stderr.write(f"tenantry: error: {message}\n")
    return code


# The columns' ranges (integer, bigint): beyond, the database would refuse the value.
_INTEGER_MAX, _BIGINT_MAX = 2**31 - 1, 2**63 - 1
DEAD_REASONS = jobs.DEAD_REASONS


def _uuid(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a UUID") from None


def _json(raw: str) -> Any:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON ({exc})") from None
    if _holds_nul(value):
        raise argparse.ArgumentTypeError("JSON text must not hold \\u0000 (PostgreSQL refuses it)")
    return value


def _holds_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _int_up_to(raw: str, high: int, what: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not {what}") from None
    if not 0 < value <= high:
        raise argparse.ArgumentTypeError(f"{raw!r} is not {what} (1 to {high})")
    return value


def _job_id(raw: str) -> int:
    return _int_up_to(raw, _BIGINT_MAX, "a job id")


def _positive(raw: str) -> int:
    return _int_up_to(raw, _INTEGER_MAX, "a positive integer")


_DELAY_MAX_S = 10 * 365 * 86400  # ten years: further is a mistake, not a schedule


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= _DELAY_MAX_S:  # nan and inf fail it too
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not a number of seconds (0 to {_DELAY_MAX_S})"
        ) from None
    return value


def _priority(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
    try:
        return jobs.job_priority(value)
    except Invalid as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _timestamp(raw: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an ISO 8601 timestamp") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{raw!r} needs a timezone (e.g. +00:00)")
    return value


def _checked_by(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argument type from a validator of ours: its Invalid becomes a usage error."""

    def parse(raw: str) -> str:
        try:
            return check(raw)
        except Invalid as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    return parse


_tenant_name = _checked_by(tenants.tenant_name)
_job_kind = _checked_by(jobs.job_kind)
_queue_name = _checked_by(jobs.queue_name)
_tenant_slug = _checked_by(tenants.tenant_slug)


def _folder(raw: str) -> str:
    if not os.path.isdir(raw):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a folder")
    return raw


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port")
    return value


def _dead_filters(parser: argparse.ArgumentParser, *, tenant_help: str) -> None:
    parser.add_argument("--kind", help="only jobs of this kind")
    parser.add_argument("--tenant", type=_uuid, help=tenant_help)
    parser.add_argument("--reason", choices=DEAD_REASONS, help="only jobs dead for this reason")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tenantry", description="Postgres-native background work for SaaS.")
    p.add_argument("--version", action="version", version=f"tenantry {__version__}")
    sub = p.commands("command")

    run = sub.add_parser("run", help="migrate (unless told not to) and run the service")
    run.add_argument("--host", help="HTTP listen address (TENANTRY_HOST)")
    run.add_argument("--port", type=_port, help="HTTP listen port (TENANTRY_PORT)")
    run.add_argument("--no-migrate", action="store_true", help="do not migrate first")
    run.add_argument(
        "--no-worker",
        action="store_true",
        help="claim no jobs: serve HTTP only (TENANTRY_WORKER=false)",
    )
    run.add_argument(
        "--no-http",
        action="store_true",
        help="serve no public HTTP, only /healthz, /readyz and /metrics: a worker-only"
        " process (TENANTRY_HTTP=false)",
    )
    run.add_argument(
        "--app-dir",
        type=_folder,
        default=".",
        help="the folder TENANTRY_HANDLERS modules are imported from, ahead of the"
        " installed packages (default: the working directory)",
    )

    mig = sub.add_parser("migrate", help="apply pending schema migrations")
    mig.add_argument(
        "--check",
        action="store_true",
        help="only check: exit 1 when the database is behind or ahead",
    )

    enq = sub.add_parser("enqueue", help="enqueue a job")
    enq.add_argument("kind", type=_job_kind)
    enq.add_argument("--tenant", type=_uuid, required=True, help="tenant UUID")
    enq.add_argument("--payload", type=_json, default={}, help="JSON payload")
    enq.add_argument("--queue", type=_queue_name, default="default")
    enq.add_argument("--priority", type=_priority, default=0, help="higher runs first")
    when = enq.add_mutually_exclusive_group()
    when.add_argument("--delay", type=_seconds, help="run after this many seconds")
    when.add_argument("--run-at", type=_timestamp, help="run at this ISO 8601 time")
    enq.add_argument("--dedup-key")
    enq.add_argument("--max-attempts", type=_positive)

    jobs_p = sub.add_parser("jobs", help="queue information")
    jobs_sub = jobs_p.commands("jobs_command")
    st = jobs_sub.add_parser("stats", help="depth, oldest age, running, failed, dead per queue")
    st.add_argument("--json", action="store_true")
    jl = jobs_sub.add_parser("list", help="the live jobs, oldest due first, across tenants")
    jl.add_argument("--queue", help="only this queue's")
    jl.add_argument("--kind", help="only jobs of this kind")
    jl.add_argument("--tenant", type=_uuid, help="only this tenant's")
    jl.add_argument("--state", choices=("queued", "scheduled", "running"))
    jl.add_argument("--limit", type=_positive, default=50)
    jl.add_argument("--json", action="store_true")
    jsh = jobs_sub.add_parser("show", help="one live job in full: payload, errors, lease")
    jsh.add_argument("id", type=_job_id)
    jsh.add_argument(
        "--tenant", type=_uuid, help="the job's tenant (needed only if the id is ambiguous)"
    )

    dead = sub.add_parser("dead", help="inspect, retry or discard dead jobs")
    dead_sub = dead.commands("dead_command")
    dl = dead_sub.add_parser("list", help="the dead jobs, newest first")
    dl.add_argument("--limit", type=_positive, default=50)
    dl.add_argument("--json", action="store_true")
    _dead_filters(dl, tenant_help="only this tenant's")
    ds = dead_sub.add_parser("show", help="one dead job in full: payload, errors, attempts")
    ds.add_argument("id", type=_job_id)
    ds.add_argument(
        "--tenant", type=_uuid, help="the job's tenant (needed only if the id is ambiguous)"
    )
    for name, what in (
        ("retry", "put dead jobs back in their queues, their attempts renewed"),
        ("discard", "delete dead jobs for good"),
    ):
        d = dead_sub.add_parser(
            name,
            help=f"{what}: one by id, or every one a filter selects (--yes to go on)",
        )
        d.add_argument("id", type=_job_id, nargs="?", help="a dead job's id")
        _dead_filters(
            d, tenant_help="the job's tenant (needed only if the id is ambiguous), or a filter"
        )
        d.add_argument(
            "--yes", action="store_true", help="act on every match (without: show the count)"
        )

    cli_webhooks.add_commands(sub, _uuid, _positive)
    cli_ops.add_commands(sub, _checked_by)
    cli_analytics.add_commands(sub, _uuid)

    dbp = sub.add_parser("db", help="reach the database")
    db_sub = dbp.commands("db_command")
    du = db_sub.add_parser(
        "url",
        help='print the connection URL of the service\'s login, e.g. psql "$(tenantry db url)"',
    )
    du.add_argument("--admin", action="store_true", help="the superuser's URL instead")

    ten = sub.add_parser("tenants", help="list and create tenants, and their API keys")
    ten_sub = ten.commands("tenants_command")
    tl = ten_sub.add_parser("list", help="every tenant, newest first")
    tl.add_argument("--limit", type=_positive, default=100)
    tl.add_argument("--json", action="store_true")
    tc = ten_sub.add_parser("create", help="create a tenant; prints its id and slug")
    tc.add_argument("name", type=_tenant_name, help="3 to 50 characters, as on the sign-up form")
    tc.add_argument("--slug", type=_tenant_slug, help="URL-safe handle (default: from the name)")
    tc.add_argument("--plan", choices=("free", "pro"), default="free")
    keys = ten_sub.add_parser("keys", help="API keys of a tenant")
    keys_sub = keys.commands("keys_command")
    kc = keys_sub.add_parser("create", help="create a key; prints it once")
    kc.add_argument("tenant", type=_uuid, help="tenant UUID")
    kc.add_argument("--name", default="", help="a label for the key")
    kl = keys_sub.add_parser("list", help="a tenant's keys (never the secrets)")
    kl.add_argument("tenant", type=_uuid)
    kr = keys_sub.add_parser("revoke", help="revoke a key")
    kr.add_argument("tenant", type=_uuid)
    kr.add_argument("id", type=_positive, help="key id (from `keys list`)")
    return p


@dataclass(frozen=True)
class Urls:
    admin: str  # migrations only
    service: str  # tenant code: the tenant tables under row-level security
    worker: str  # the cross-tenant functions: claims, completions, operator commands
    # The autoscaler's login, created by `migrate` when TENANTRY_METRICS_URL is set.
    metrics: str | None = None
    # The analyst's login (TENANTRY_ANALYTICS_URL, on a replica): migrate creates it.
    analytics: str | None = None


def _resolve_urls(settings: config.Settings, *, create: bool) -> Urls:
    if settings.database_url:
        service = settings.database_url
        admin = settings.admin_url or service
    else:
        # Embedded: migrate as the cluster's superuser, run as logins of our own that
        # migrate creates (the socket is private to this user, with trust auth).  Only
        # `run` and `migrate` create the cluster: anything else run from another folder
        # would get a new, empty one.
        admin = EmbeddedPostgres(settings.data_dir).start(create=create)
        service = roles.with_login(admin, roles.DEFAULT_LOGIN)
    worker = settings.worker_url or roles.worker_url_for(service)
    return Urls(admin, service, worker, settings.metrics_url, settings.analytics_url)


def _load_handlers(settings: config.Settings, app_dir: str) -> Registry:
    """TENANTRY_HANDLERS, imported from the application's folder (the working
    directory, or --app-dir) first, as uvicorn and gunicorn do: a console script does
    not put it on sys.path by itself.  Once they are imported the folder moves to the
    end of sys.path: their later imports of their own modules still work, but a file
    there (a uvloop.py) cannot replace an installed package imported later."""
    if not settings.handlers:
        return load_registry(())
    folder = os.path.abspath(app_dir)
    sys.path.insert(0, folder)
    try:
        return load_registry(settings.handlers)
    finally:
        sys.path.remove(folder)
        sys.path.append(folder)


def _database_url(settings: config.Settings, *, admin: bool) -> str:
    """The URL `tenantry db url` prints: the configured one, or the running embedded
    server's.  The embedded server must be running already: one started for this
    command would stop again as it exits, and the URL would lead nowhere."""
    if settings.database_url:
        return (settings.admin_url or settings.database_url) if admin else settings.database_url
    embedded = EmbeddedPostgres(settings.data_dir)
    url = embedded.running_url()
    if url is None:
        raise NoDatabase(
            f"the embedded PostgreSQL in {embedded.pgdata} is not running: start"
            " `tenantry run` (or `make run`) first, from the same folder or with the same"
            " TENANTRY_DATA_DIR"
        )
    return url if admin else roles.with_login(url, roles.DEFAULT_LOGIN)


def _run_async(fn: Callable[..., Awaitable[int]], *args: Any) -> int:
    return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": True})


def _leaf(exc: BaseException) -> BaseException:
    """The one error inside (nested) task-group exception groups, if there is one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _stdout_gone() -> int:
    """The reader of our output left (`tenantry jobs list | head -1`): end quietly, as a
    shell's commands do (128 + SIGPIPE); stdout goes to /dev/null so that the
    interpreter's last flush cannot complain either."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        return _stdout_gone()
    except BaseExceptionGroup as group:
        leaf = _leaf(group)
        if isinstance(leaf, BrokenPipeError):
            return _stdout_gone()
        if isinstance(leaf, TenantryError):
            return _fail(str(leaf))
        if isinstance(leaf, (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            return _fail(f"database: {leaf}")
        raise


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = config.from_env()
    except TenantryError as exc:
        return _fail(f"configuration: {exc}", EXIT_USAGE)
    log.configure(settings.log_level)
    tenancy.use_tenant_context(settings.tenant_context)
    if args.command == "run":
        overrides: dict[str, object] = {}
        if args.host:
            overrides["host"] = args.host
        if args.port is not None:
            overrides["port"] = args.port
        if args.no_worker:
            overrides["run_worker"] = False
        if args.no_http:
            overrides["run_http"] = False
        settings = settings.with_overrides(**overrides)
        if settings.database_url is None:
            settings = config.embedded_defaults(settings)
        try:
            config.check_for_run(settings)
        except TenantryError as exc:
            return _fail(f"configuration: {exc}", EXIT_USAGE)
    if args.command == "dead" and args.dead_command in ("retry", "discard"):
        filtered = args.kind is not None or args.reason is not None
        if args.id is None and not filtered and args.tenant is None:
            return _fail(f"dead {args.dead_command}: give an id or a filter", EXIT_USAGE)
        if args.id is not None and (filtered or args.yes):
            return _fail(
                f"dead {args.dead_command}: an id, or filters with --yes, not both", EXIT_USAGE
            )
    if args.command == "webhooks":
        usage = cli_webhooks.check_usage(args)
        if usage is not None:
            return _fail(usage, EXIT_USAGE)
    if args.command == "analytics":
        return cli_analytics.run(args, settings, _out, _fail, _json_text)
    if args.command == "db":
        try:
            _out(_database_url(settings, admin=args.admin))
        except NoDatabase as exc:
            return _fail(str(exc))
        return EXIT_OK
    try:
        registry = _load_handlers(settings, args.app_dir) if args.command == "run" else None
        urls = _resolve_urls(settings, create=args.command in ("run", "migrate"))
        if args.command == "run":
            assert registry is not None
            if settings.migrate_on_start and not args.no_migrate:
                _run_async(_migrate, urls, False, True)
            return _run_async(serve, settings, urls.service, urls.worker, registry)
        if args.command == "migrate":
            return _run_async(_migrate, urls, args.check)
        # Operators' commands see across tenants: the worker's login has those functions.
        if args.command == "webhooks" and args.webhooks_command in cli_webhooks.TENANT_COMMANDS:
            return _run_async(_webhooks_in_tenant, args, settings, urls.service)
        cross_tenant = args.command in ("jobs", "dead", "webhooks", "queues", "operators") or (
            args.command == "tenants" and args.tenants_command == "list"
        )
        return _run_async(
            _dispatch,
            args,
            urls.worker if cross_tenant else urls.service,
            _base_url(settings),
            settings.db_pooler_transaction,
        )
    except (
        SchemaMismatch,
        MigrationBlocked,
        Conflict,
        NotFound,
        Invalid,
        InsecureRole,
        NoDatabase,
    ) as exc:
        return _fail(str(exc))
    except TenantryError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except BrokenPipeError:
        return _stdout_gone()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return _fail(f"database: {exc} ({db.redact_dsn(settings.database_url or 'embedded')})")
    except KeyboardInterrupt:
        return 130


async def _migrate(urls: Urls, check: bool, quiet: bool = False) -> int:
    """Migrate on the admin URL and make sure the service's login exists.

    With a single URL (no TENANTRY_ADMIN_URL) and a current schema, nothing needs the
    admin's rights, so a service login can run this as a no-op check.
    `quiet`: inside `run`, where stdout carries JSON logs only (the migrator logs)."""
    conn = await db.connect(urls.admin)
    try:
        st = await migrate.status(conn)
        if check:
            _out(st.describe())
            return EXIT_OK if st.current else EXIT_FAILED
        done = [] if st.current else await migrate.migrate(conn)
        # With one URL for everything (the service would log in as the admin, and
        # refuse to start) there are no logins to create.
        admin_user = roles.login_of(urls.admin).user
        if urls.analytics is not None:
            await _check_analyst_login(conn, urls, admin_user)
        if roles.login_of(urls.service).user != admin_user:
            logins = [(urls.service, roles.SERVICE_ROLES), (urls.worker, roles.WORKER_ROLES)]
            if urls.analytics is not None:
                # Made on the primary (only its user and password are taken from the
                # replica's URL); the standby replays it.
                logins.append((urls.analytics, analytics.ANALYST_ROLES))
            for url, grants in logins:
                login = roles.login_of(url)
                if login.user != admin_user:
                    await roles.ensure_login(conn, login, grants)
        if urls.metrics is not None:
            await _ensure_metrics_login(conn, urls.metrics, admin_user)
        if not quiet:
            _out(f"applied {len(done)} migration(s)" if done else "schema is current")
        return EXIT_OK
    finally:
        await conn.close()


async def _check_analyst_login(admin: db.Conn, urls: Urls, admin_user: str) -> None:
    """Refuse, before anything is granted, an analyst's login that is another login of
    the service's (granted tenantry_analyst, the service's or the worker's would then
    be refused at every start, until the grant is revoked by hand) or that already holds
    another tenantry role."""
    assert urls.analytics is not None
    user = roles.login_of(urls.analytics).user
    if user == admin_user:
        return  # nothing is granted to it; reading as it is refused (an administrator)
    others = {
        roles.login_of(url).user: variable
        for variable, url in (
            ("DATABASE_URL", urls.service),
            ("TENANTRY_WORKER_URL", urls.worker),
            ("TENANTRY_METRICS_URL", urls.metrics),
        )
        if url is not None
    }
    held = await roles.other_tenantry_roles(admin, user, analytics.ANALYST_ROLES)
    if user in others or held:
        why = f"{others[user]}'s login" if user in others else "a member of " + ", ".join(held)
        raise InsecureRole(
            f'{analytics.URL_VARIABLE} logs in as role "{user}", {why}: the analyst'
            " needs a login of its own, a member of tenantry_analyst only (`tenantry"
            f" migrate` creates it when {analytics.URL_VARIABLE} names a new user);"
            " nothing was granted"
        )


async def _ensure_metrics_login(admin: db.Conn, url: str, admin_user: str) -> None:
    """The autoscaler's login: created if missing (never the admin's own) and checked
    as itself, as the service checks its logins at startup, so that one that could
    reach more than tenantry.worker_demand (a superuser, the service's login) is
    refused.  An existing login is checked before it is granted anything: a refusal
    changes nothing."""
    login = roles.login_of(url)
    if login.user == admin_user or await roles.login_exists(admin, login.user):
        await _check_metrics_login(url)
    if login.user != admin_user:
        await roles.ensure_login(admin, login, roles.METRICS_ROLES)
    await _check_metrics_login(url)


async def _check_metrics_login(url: str) -> None:
    try:
        conn = await db.connect(url)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Named here: the handler in _main would name DATABASE_URL, whose login is fine.
        raise NoDatabase(
            f"TENANTRY_METRICS_URL: the metrics login cannot connect: {exc} ({db.redact_dsn(url)})"
        ) from None
    try:
        await roles.check_login(conn, "TENANTRY_METRICS_URL", roles.METRICS_ROLES)
        await roles.check_reaches_no_table(conn, "TENANTRY_METRICS_URL")
    finally:
        await conn.close()


def _base_url(settings: config.Settings) -> str:
    """Where this machine reaches the service (for sign-in links)."""
    return config.local_base_url(settings.host, settings.port)


async def _dispatch(args: argparse.Namespace, dsn: str, base_url: str, pooled: bool) -> int:
    conn = await db.connect(dsn, pooled=pooled)
    try:
        # As `tenantry run` does: a schema that is not exactly this code's (older
        # functions, newer migrations) is refused, rather than met with a traceback.
        st = await migrate.status(conn)
        if not st.current:
            raise SchemaMismatch(f"{st.describe()}")
        if args.command == "enqueue":
            return await _enqueue(conn, args)
        if args.command == "jobs":
            if args.jobs_command == "stats":
                return await _stats(conn, args.json)
            return await _jobs(conn, args)
        if args.command == "tenants":
            return await _tenants(conn, args)
        if args.command == "webhooks":
            return await cli_webhooks.run(conn, args, _out, _json_text)
        if args.command == "queues":
            return await cli_ops.run_queues(conn, args, _out, _json_text)
        if args.command == "operators":
            return await cli_ops.run_operators(conn, args, _out, _json_text, base_url)
        return await _dead(conn, args)
    finally:
        await conn.close()


async def _webhooks_in_tenant(args: argparse.Namespace, settings: config.Settings, dsn: str) -> int:
    """`webhooks add|remove|enable|disable` with what the service would use: the same
    secret key (TENANTRY_SECRET_KEY or the data folder's) and the same address rules."""
    if settings.database_url is None:
        settings = config.embedded_defaults(settings)
    pool = await db.create_pool(dsn, min_size=1, max_size=1, pooled=settings.db_pooler_transaction)
    try:
        async with pool.acquire() as conn:
            st = await migrate.status(conn)
            if not st.current:
                raise SchemaMismatch(st.describe())
        box, guard = webhook_security(settings, settings.data_dir.resolve(), warn=False)
        rules = EndpointRules(
            allow_http=bool(settings.webhook_allow_http),
            max_per_tenant=settings.webhook_max_endpoints,
            rotation_grace_seconds=settings.webhook_rotation_grace,
        )
        return await cli_webhooks.run_in_tenant(Endpoints(pool, box, guard, rules), args, _out)
    finally:
        await pool.close()


async def _enqueue(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    run_at = args.run_at
    if args.delay is not None:
        run_at = datetime.now(UTC) + timedelta(seconds=args.delay)
    job_id = await jobs.enqueue(
        conn,
        tenant_id=args.tenant,
        kind=args.kind,
        payload=args.payload,
        queue=args.queue,
        run_at=run_at,
        priority=args.priority,
        dedup_key=args.dedup_key,
        max_attempts=args.max_attempts,
    )
    _out(str(job_id))
    return EXIT_OK


async def _stats(conn: asyncpg.Connection, as_json: bool) -> int:
    rows = await jobs.stats(conn)
    if as_json:
        _out(_json_text([r.__dict__ for r in rows]))
        return EXIT_OK
    header = (
        "queue",
        "available",
        "scheduled",
        "running",
        "retrying",
        "oldest_age_s",
        "succeeded_1h",
        "attempts_failed_1h",
        "died_1h",
        "dead",
    )
    table = [header] + [
        (
            r.queue,
            str(r.available),
            str(r.scheduled),
            str(r.running),
            str(r.retrying),
            f"{r.oldest_age_s:.1f}",
            str(r.succeeded_1h),
            str(r.attempts_failed_1h),
            str(r.died_1h),
            str(r.dead),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        _out("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    _out(cli_webhooks.stats_line(await cli_webhooks.stats(conn)))
    return EXIT_OK


async def _jobs(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if args.jobs_command == "show":
        job = await jobs.job_show(conn, args.id, args.tenant)
        _out(_json_text(job, indent=True))
        return EXIT_OK
    matching = jobs.JobFilter(args.queue, args.kind, args.tenant, args.state)
    rows = await jobs.jobs_list(conn, args.limit, matching)
    if args.json:
        _out(_json_text(rows))
        return EXIT_OK
    for r in rows:
        _out(
            f"{r['id']}  {r['tenant_id']}  {r['state']}  {utc_text(r['run_at'])}  "
            f"{r['queue']}  {r['kind']}  attempts={r['attempts']}  {r['last_error'] or ''}"
        )
    return EXIT_OK


def _default(obj: Any) -> Any:
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, datetime):
        return utc_text(obj)
    raise TypeError


def _json_text(value: Any, *, indent: bool = False) -> str:
    """JSON as the HTTP interface gives it: times in UTC with microseconds and Z."""
    option = orjson.OPT_PASSTHROUGH_DATETIME | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(value, default=_default, option=option).decode()


async def _dead(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    cmd = args.dead_command
    if cmd == "list":
        matching = jobs.DeadFilter(args.kind, args.tenant, args.reason)
        rows = await jobs.dead_list(conn, args.limit, matching)
        if args.json:
            _out(_json_text(rows))
        else:
            for r in rows:
                _out(
                    f"{r['id']}  {r['tenant_id']}  {utc_text(r['died_at'])}  "
                    f"{r['queue']}  {r['kind']}  {r['reason']}  attempts={r['attempts']}  "
                    f"{r['last_error'] or ''}"
                )
        return EXIT_OK
    if cmd in ("retry", "discard") and args.id is None:
        return await _dead_in_bulk(conn, args)
    if cmd == "show":
        row = await jobs.dead_show(conn, args.id, args.tenant)
        _out(_json_text(row, indent=True))
        return EXIT_OK
    if cmd == "retry":
        _out(f"requeued job {await jobs.dead_retry(conn, args.id, args.tenant)}")
        return EXIT_OK
    await jobs.dead_discard(conn, args.id, args.tenant)
    _out(f"discarded job {args.id}")
    return EXIT_OK


async def _dead_in_bulk(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    """`dead retry|discard` over a filter: the count first; with --yes, all of them."""
    matching = jobs.DeadFilter(args.kind, args.tenant, args.reason)
    verb = args.dead_command
    if not args.yes:
        n = await jobs.dead_count(conn, matching)
        _out(f"{n} dead jobs match; nothing done (add --yes to {verb} them)")
        return EXIT_OK
    if verb == "retry":
        _out(f"retried {await jobs.dead_retry_matching(conn, matching)} dead jobs")
    else:
        _out(f"discarded {await jobs.dead_discard_matching(conn, matching)} dead jobs")
    return EXIT_OK


async def _tenants(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if args.tenants_command == "list":
        found = await tenants.list_tenants(conn, args.limit)
        if args.json:
            _out(_json_text([t.__dict__ for t in found]))
            return EXIT_OK
        for t in found:
            _out(f"{t.id}  {t.slug}  {t.plan}  {t.state}  {utc_text(t.created_at)}  {t.name}")
        return EXIT_OK
    if args.tenants_command == "create":
        t = await tenants.create_tenant(conn, name=args.name, slug=args.slug, plan=args.plan)
        _out(f"{t.id}  {t.slug}")
        return EXIT_OK
    if args.keys_command == "create":
        key = await tenants.create_key(conn, args.tenant, name=args.name)
        # The only time the key is shown: the database keeps its hash alone.
        _out(key.secret)
        return EXIT_OK
    if args.keys_command == "list":
        for k in await tenants.list_keys(conn, args.tenant):
            revoked = f"revoked {utc_text(k.revoked_at)}" if k.revoked_at else "active"
            _out(f"{k.id}  {utc_text(k.created_at)}  {revoked}  {k.name}")
        return EXIT_OK
    await tenants.revoke_key(conn, args.tenant, args.id)
    _out(f"revoked key {args.id}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
