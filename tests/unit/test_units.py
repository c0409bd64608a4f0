"""Pure logic: backoff, configuration, registry, periodic periods, SQL blocks."""

from __future__ import annotations

import base64
import inspect
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tenantry
from tenantry import config, migrate, roles, sql
from tenantry.errors import ConfigError, SchemaMismatch
from tenantry.jobs.backoff import full_jitter
from tenantry.jobs.model import Job
from tenantry.jobs.registry import DeadLetter, Periodic, Policy, Registry
from tenantry.tenants.keys import new_key, parse_key
from tests.helpers import FixedRandom


def test_full_jitter_schedule() -> None:
    assert full_jitter(1, base=2, cap=100, rnd=FixedRandom(0.5)) == 1.0
    assert full_jitter(3, base=2, cap=100, rnd=FixedRandom(0.5)) == 4.0
    assert full_jitter(10, base=2, cap=100, rnd=FixedRandom(1.0)) == 100.0
    assert full_jitter(10_000, base=2, cap=100, rnd=FixedRandom(0.25)) == 25.0


@given(st.integers(min_value=1, max_value=10_000), st.floats(min_value=0, max_value=1))
def test_full_jitter_is_within_bounds(attempt: int, r: float) -> None:
    d = full_jitter(attempt, base=1, cap=3600, rnd=FixedRandom(r))
    assert 0 <= d <= 3600


def test_config_defaults_and_parsing() -> None:
    s = config.from_env({})
    assert s.database_url is None and s.port == 8080 and s.queues == {"default": 10}
    s = config.from_env(
        {
            "TENANTRY_QUEUES": "default=4, mail=2",
            "TENANTRY_PORT": "9000",
            "TENANTRY_HANDLERS": "a.b:reg,c:d",
            "TENANTRY_PREFETCH": "0",
        }
    )
    assert s.queues == {"default": 4, "mail": 2} and s.port == 9000 and s.prefetch == 0
    assert s.handlers == ("a.b:reg", "c:d")
    assert not s.metrics_tenant_labels and s.metrics_port is None
    assert config.from_env({}).tenant_context == "set_config"
    # The analytics views are refreshed only where analytics is set up, unless asked.
    replica = "postgresql://analyst@replica/tenantry"
    assert config.from_env({}).analytics_refresh == 0
    assert config.from_env({"TENANTRY_ANALYTICS_URL": replica}).analytics_refresh == 300
    assert config.from_env({"TENANTRY_ANALYTICS_REFRESH": "60"}).analytics_refresh == 60
    assert (
        config.from_env(
            {"TENANTRY_ANALYTICS_URL": replica, "TENANTRY_ANALYTICS_REFRESH": "0"}
        ).analytics_refresh
        == 0
    )
    assert config.from_env({"TENANTRY_TENANT_CONTEXT": "set_local"}).tenant_context == "set_local"
    s = config.from_env({"TENANTRY_METRICS_TENANT_LABELS": "true", "TENANTRY_METRICS_PORT": "9100"})
    assert s.metrics_tenant_labels and s.metrics_port == 9100
    with pytest.raises(ConfigError, match="TENANTRY_METRICS_PORT=9000 is the service's own port"):
        config.check_for_run(
            config.from_env({"TENANTRY_PORT": "9000", "TENANTRY_METRICS_PORT": "9000"})
        )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TENANTRY_PORT", "http"),
        ("TENANTRY_PORT", "70000"),
        ("TENANTRY_QUEUES", "default"),
        ("TENANTRY_QUEUES", "a=0"),
        ("TENANTRY_QUEUES", "a=1,a=2"),
        ("TENANTRY_POLL_INTERVAL", "-1"),
        ("TENANTRY_HANDLERS", "nomodule"),
        ("TENANTRY_LOG_LEVEL", "loud"),
        ("TENANTRY_MIGRATE", "maybe"),
        ("TENANTRY_POOL_SIZE", "0"),
        ("TENANTRY_PREFETCH", "-0.5"),
        ("TENANTRY_PREFETCH", "lots"),
        ("TENANTRY_METRICS_PORT", "-1"),
        ("TENANTRY_METRICS_TENANT_LABELS", "some"),
        ("TENANTRY_TENANT_CONTEXT", "SET LOCAL"),
        ("TENANTRY_SHUTDOWN_GRACE", "nan"),
        ("TENANTRY_POLL_INTERVAL", "inf"),
        ("TENANTRY_ANALYTICS_REFRESH", "1e-9"),
        ("TENANTRY_ANALYTICS_REFRESH", "1e300"),
        ("TENANTRY_ANALYTICS_REFRESH", "nan"),
    ],
)
def test_bad_config_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        config.from_env({name: value})


def test_registry_rejects_duplicates_and_bad_policy() -> None:
    reg = Registry()

    @reg.handler("a")
    async def a(job: object) -> None:
        return None

    with pytest.raises(ValueError, match="twice"):
        reg.add("a", a)
    with pytest.raises(ValueError):
        Policy(max_attempts=0)
    with pytest.raises(ValueError):
        Periodic()
    with pytest.raises(ValueError):
        Periodic(cron="not a cron")


def test_periodic_period_start() -> None:
    every = Periodic(every=timedelta(minutes=5))
    t = datetime(2030, 1, 1, 12, 7, 30, tzinfo=UTC)
    assert every.period_start(t) == datetime(2030, 1, 1, 12, 5, tzinfo=UTC)
    assert every.next_after(every.period_start(t)) == datetime(2030, 1, 1, 12, 10, tzinfo=UTC)
    cron = Periodic(cron="0 * * * *")
    assert cron.period_start(t) == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    on_boundary = datetime(2030, 1, 1, 13, 0, tzinfo=UTC)
    assert cron.period_start(on_boundary) == on_boundary


def test_sql_blocks_parse_and_reject_duplicates() -> None:
    blocks = sql.parse("-- name: a\nSELECT 1\n-- name: b\nSELECT 2;\n")
    assert blocks == {"a": "SELECT 1", "b": "SELECT 2;"}
    with pytest.raises(ValueError, match="duplicate"):
        sql.parse("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n")


def test_migration_files_are_numbered_and_unique() -> None:
    found = migrate.discover()
    assert [m.version for m in found] == sorted({m.version for m in found})
    assert found[0].version == 1


def test_migration_file_names_are_checked(tmp_path: Path) -> None:
    (tmp_path / "1_bad.sql").write_text("SELECT 1")
    with pytest.raises(Exception, match="NNNN_name"):
        migrate.discover(tmp_path)


def test_a_folder_without_migrations_is_refused(tmp_path: Path) -> None:
    """Regression: a wheel without its migrations said "schema is current" on an empty
    database and created nothing."""
    with pytest.raises(SchemaMismatch, match="no migrations"):
        migrate.discover(tmp_path)


def test_the_migrations_are_read_from_the_package() -> None:
    """They travel inside the wheel as `tenantry.schema` (their source is schema/)."""
    assert migrate.SCHEMA_DIR.name == "schema"
    assert (migrate.SCHEMA_DIR / "0001_queue.sql").is_file()


def test_database_urls_and_logins() -> None:
    s = config.from_env(
        {
            "DATABASE_URL": "postgresql://app:pw@db/x",
            "TENANTRY_ADMIN_URL": "postgresql://admin:root@db/x",
            "TENANTRY_LISTEN_URL": "postgresql://app:pw@db-direct/x",
        }
    )
    assert (s.database_url, s.admin_url, s.listen_url) == (
        "postgresql://app:pw@db/x",
        "postgresql://admin:root@db/x",
        "postgresql://app:pw@db-direct/x",
    )
    assert config.from_env({}).admin_url is None
    assert roles.login_of("postgresql://a%40b:p%3Aw@h:5/d") == roles.Login("a@b", "p:w")
    assert roles.login_of("postgresql://app@h/d") == roles.Login("app", None)
    embedded = "postgresql://postgres:@/tenantry?host=/tmp/x"
    assert (
        roles.with_login(embedded, "tenantry_app")
        == "postgresql://tenantry_app@/tenantry?host=/tmp/x"
    )
    assert roles.with_login("postgresql://h:5/d", "u", "p") == "postgresql://u:p@h:5/d"
    assert roles.login_of("postgresql://h/d?user=q&password=s") == roles.Login("q", "s")
    assert roles.with_login("postgresql://h/d?user=q&password=s&sslmode=require", "u") == (
        "postgresql://u@h/d?sslmode=require"
    )
    assert roles.worker_url_for("postgresql://app:p%40ss@h/d") == (
        "postgresql://app_worker:p%40ss@h/d"
    )
    assert config.from_env({"TENANTRY_WORKER_URL": "postgresql://w@h/d"}).worker_url == (
        "postgresql://w@h/d"
    )


def test_scram_verifier_has_postgres_stored_form() -> None:
    v = roles.scram_verifier("pencil", salt=b"0123456789abcdef")
    method, rest = v.split("$", 1)
    iterations_salt, keys = rest.split("$")
    assert method == "SCRAM-SHA-256"
    assert iterations_salt == "4096:MDEyMzQ1Njc4OWFiY2RlZg=="
    stored, server = keys.split(":")
    assert len(base64.b64decode(stored)) == 32 and len(base64.b64decode(server)) == 32
    assert "pencil" not in v
    assert roles.scram_verifier("pencil") != roles.scram_verifier("pencil")  # fresh salt


def test_api_keys_name_their_tenant_and_parse_strictly() -> None:
    tid = uuid.uuid4()
    key, digest = new_key(tid)
    parsed = parse_key(key)
    assert parsed is not None and parsed.tenant_id == tid and parsed.secret_hash == digest
    for bad in ("", key + "x", key[:-1], key.replace("tnt_", "tnx_"), f"tnt_{tid}_x" * 2):
        assert parse_key(bad) is None


def test_the_collector_is_tuned_only_while_many_streams_are_open() -> None:
    import gc  # noqa: PLC0415

    from tenantry.hub import CollectorTuning  # noqa: PLC0415

    before = gc.get_threshold()
    tuning = CollectorTuning(enabled=True, above=10)
    try:
        tuning.update(10)
        assert not tuning.active and gc.get_threshold() == before
        tuning.update(11)
        assert tuning.active and gc.get_threshold() == (50_000, 20, 10)
        kept = [[i] for i in range(100)]  # a stream's objects, say (tracked by the collector)
        frozen = gc.get_freeze_count()
        tuning.update(23)  # doubled since the last freeze: what came since is frozen too
        assert gc.get_freeze_count() >= frozen + len(kept)
        tuning.update(6)  # hysteresis: still half the threshold
        assert tuning.active
        tuning.update(4)
        assert not tuning.active and gc.get_threshold() == before
        off = CollectorTuning(enabled=False, above=10)
        off.update(1000)
        assert not off.active and gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


@pytest.mark.parametrize(
    ("hook_payload", "expected"),
    [
        ({"payload": '"123"'}, "123"),  # a JSON string that looks like a number
        ({"payload": '{"onboarding_id": "x"}'}, {"onboarding_id": "x"}),
        ({"payload": '{"a": [1, null]}'}, {"a": [1, None]}),
        ({"payload": "[" * 1100 + "]" * 1100}, "[" * 1100 + "]" * 1100),  # as text
        ({"payload": "1e400"}, "1e400"),  # as text
    ],
)
def test_a_dead_letter_carries_the_dead_jobs_payload(
    hook_payload: dict[str, Any], expected: Any
) -> None:
    """The dead job's payload comes as its JSON text, decoded here, or left as that
    text when it cannot be.  Regression (fourth review): the third review's fix moved
    it to another key, and the hook jobs of the version before (and workers of that
    version reading the new ones, during a rolling deploy) got the text or nothing."""
    job = Job(
        id=9, tenant_id=uuid.UUID(int=1), queue="default", kind="k:on_dead",
        payload={"job_id": 7, "kind": "k", "reason": "exhausted", "error": "e", "attempts": 3,
                 "created_at": "2026-12-01T00:00:00Z", **hook_payload},
        attempt=1, max_attempts=3, priority=0, created_at=datetime.now(UTC),
        _pool=None, _lease_owner="w",  # type: ignore[arg-type]
    )  # fmt: skip
    dead = DeadLetter.from_hook_job(job)
    assert dead.payload == expected and dead.job_id == 7 and dead.kind == "k"


def test_the_public_interface_is_importable_and_documented() -> None:
    """`import tenantry` gives what a handler author and a producer need, each with a
    docstring (help() is the first documentation people read)."""
    wanted = {"Registry", "Job", "Policy", "Snooze", "PermanentFailure", "Cancel"}
    wanted |= {"DeadLetter", "enqueue", "emit", "tenant_tx", "tenant_tx_on"}
    assert wanted <= set(tenantry.__all__)
    for name in tenantry.__all__:
        obj = getattr(tenantry, name)
        if callable(obj):
            doc = inspect.getdoc(obj) or ""
            assert doc and not doc.startswith(f"{name}("), f"{name} has no docstring"
    assert (Path(tenantry.__file__).parent / "py.typed").is_file()


def test_cors_origins_are_exact_origins() -> None:
    s = config.from_env({"TENANTRY_CORS_ORIGINS": "https://app.example.com, http://127.0.0.1:5173"})
    assert s.cors_origins == ("https://app.example.com", "http://127.0.0.1:5173")
    assert config.from_env({}).cors_origins == ()
    for bad in ("https://app.example.com/", "app.example.com", "https://x.com/path", "*"):
        with pytest.raises(ConfigError, match="TENANTRY_CORS_ORIGINS"):
            config.from_env({"TENANTRY_CORS_ORIGINS": bad})


def test_cors_origins_are_written_as_browsers_send_them() -> None:
    """Regression (review): an origin with capitals or its scheme's default port was
    accepted as written, and never matched the Origin a browser sends (lower case, no
    default port); a port past 65535 was accepted too."""
    s = config.from_env(
        {"TENANTRY_CORS_ORIGINS": "HTTPS://App.Example.com, https://b.example:443, http://c:80"}
    )
    assert s.cors_origins == ("https://app.example.com", "https://b.example", "http://c")
    for bad in ("https://a.example:99999", "https://a.example:0", "ftp://a.example"):
        with pytest.raises(ConfigError, match="TENANTRY_CORS_ORIGINS"):
            config.from_env({"TENANTRY_CORS_ORIGINS": bad})


@pytest.mark.parametrize(
    "name", ["DATABASE_URL", "TENANTRY_ADMIN_URL", "TENANTRY_LISTEN_URL", "TENANTRY_WORKER_URL"]
)
def test_database_urls_must_be_postgresql_urls(name: str) -> None:
    """Regression (review): `DATABASE_URL=notaurl tenantry db url` printed notaurl."""
    for bad in ("notaurl", "mysql://u@h/db", "postgresql:/missing-slashes"):
        with pytest.raises(ConfigError, match=name):
            config.from_env({name: bad})
    for good in ("postgresql://u:p@h:5432/db", "postgres://h/db", "postgresql:///db?host=/tmp"):
        config.from_env({name: good})


def test_the_local_base_url_of_a_bound_address() -> None:
    """Regression: the sign-in link `make run` prints read http://::1:8080/... for an
    IPv6 host (no brackets), which no browser opens."""
    assert config.local_base_url("::1", 8080) == "http://[::1]:8080"
    assert config.local_base_url("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert config.local_base_url("::", 80) == "http://127.0.0.1:80"
    assert config.local_base_url("example.internal", 9) == "http://example.internal:9"


@pytest.mark.parametrize(
    ("env", "statement"),
    [
        ({}, "SELECT set_config('app.tenant_id', 'ab', true)"),
        (
            {"TENANTRY_TENANT_CONTEXT": "set_config"},
            "SELECT set_config('app.tenant_id', 'ab', true)",
        ),
        ({"TENANTRY_TENANT_CONTEXT": "set_local"}, "SET LOCAL app.tenant_id = 'ab'"),
        ({"TENANTRY_TENANT_CONTEXT": "SET LOCAL"}, "ValueError: TENANTRY_TENANT_CONTEXT must be"),
    ],
    ids=["unset", "set_config", "set_local", "bad"],
)
def test_the_python_interface_takes_the_tenant_context_of_the_deployment(
    env: dict[str, str], statement: str
) -> None:
    """An application that imports tenantry and opens tenant transactions itself
    (tenantry.tenant_tx), without the CLI, runs in the deployment's
    TENANTRY_TENANT_CONTEXT as the service does: on Citus a set_config() there would
    not reach the worker nodes."""
    code = (
        "from tenantry import tenancy\n"
        "try:\n"
        "    print(tenancy._setting_sql('app.tenant_id', 'ab'))\n"
        "except ValueError as exc:\n"
        "    print(f'ValueError: {exc}')\n"
    )
    full = {k: v for k, v in os.environ.items() if k != "TENANTRY_TENANT_CONTEXT"} | env
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.startswith(statement), done.stdout + done.stderr


def test_an_analytics_table_keeps_one_line_per_row_whatever_a_kind_holds() -> None:
    from tenantry.cli_analytics import _table  # noqa: PLC0415 - one private helper

    lines = _table(("day", "kind"), [{"day": "2026-12-07", "kind": "fake\n  2026-12-06  x"}])
    assert len(lines) == 2
    assert lines[1] == "  2026-12-07  fake\\x0a  2026-12-06  x"
