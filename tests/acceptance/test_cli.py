"""The command line, as an operator uses it."""

from __future__ import annotations

import asyncpg
import orjson
import pytest

from tests.acceptance.process import run_cli
from tests.helpers import TENANT_A, one


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue", "k", "--tenant", "nope", "--payload", "{}"], "is not a UUID"),
        (["enqueue", "k", "--tenant", str(TENANT_A), "--payload", "{bad"], "invalid JSON"),
        (["enqueue", "k"], "--tenant"),
        (["dead", "show", "abc"], "is not a job id"),
        (["frobnicate"], "invalid choice"),
    ],
)
async def test_bad_arguments_exit_2_with_a_clear_message(
    args: list[str], message: str, database_url: str
) -> None:
    code, out, err = await run_cli(*args, database_url=database_url)
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out


async def test_bad_configuration_exits_2(database_url: str) -> None:
    code, _out, err = await run_cli(
        "jobs", "stats", database_url=database_url, env={"TENANTRY_PORT": "http"}
    )
    assert code == 2 and "TENANTRY_PORT" in err


async def test_enqueue_stats_and_dead_commands(
    admin_pool: asyncpg.Pool, pool: asyncpg.Pool, database_url: str
) -> None:
    code, out, err = await run_cli(
        "enqueue",
        "report",
        "--tenant",
        str(TENANT_A),
        "--payload",
        '{"n": 1}',
        "--queue",
        "mail",
        "--delay",
        "60",
        database_url=database_url,
    )
    assert code == 0, err
    job_id = int(out.strip())
    row = await one(admin_pool, "SELECT * FROM tenantry.jobs WHERE id = $1", job_id)
    assert row["payload"] == {"n": 1} and row["queue"] == "mail"

    code, out, _ = await run_cli("jobs", "stats", "--json", database_url=database_url)
    assert code == 0
    stats = orjson.loads(out)
    assert stats[0]["queue"] == "mail" and stats[0]["scheduled"] == 1

    code, _out, err = await run_cli("dead", "show", "424242", database_url=database_url)
    assert code == 1 and "no dead job with id 424242" in err
    code, _out, err = await run_cli("dead", "retry", "424242", database_url=database_url)
    assert code == 1
    # Nothing changed by the failed commands.
    assert await admin_pool.fetchval("SELECT count(*) FROM tenantry.jobs") == 1


async def test_migrate_check_exit_codes(empty_database_url: str) -> None:
    code, out, _ = await run_cli("migrate", "--check", database_url=empty_database_url)
    assert code == 1 and "behind" in out
    code, out, _ = await run_cli("migrate", database_url=empty_database_url)
    assert code == 0 and "applied" in out
    code, out, _ = await run_cli("migrate", "--check", database_url=empty_database_url)
    assert code == 0 and "current" in out
