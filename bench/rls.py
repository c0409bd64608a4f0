"""RLS cost: an indexed tenant read with and without row-level security.

`--rows` users (1,000,000) spread evenly over `--tenants` tenants (400) in
tenantry.users, the real tenant table with its real policy; the read is a point
lookup on its unique index (tenant_id, email_normalized), returning one row.  Three
ways to run it, each client holding one connection for a round (taking a connection
from a pool costs every variant the same, so it is left out of the comparison):

  bare       a superuser (it bypasses row-level security) with an explicit
             `WHERE tenant_id = $1`: the floor.
  policy     the service's login (NOSUPERUSER, NOBYPASSRLS) with its tenant context
             set once per connection (session-level, for this measurement only): the
             same one statement, now under the policy.  policy - bare is what the
             policy itself costs.
  tenant_tx  the service's login through `tenantry.tenancy.tenant_tx_on` (what
             `tenant_tx` and `job.tenant_tx()` run on their connection): BEGIN and
             set_config in one message, the read, COMMIT.
             tenant_tx - bare is what the whole tenant transaction costs.

`--clients` concurrent clients (1 and 8), each reading random users of one tenant of
its own per round (the policy variant's context is its connection's), for
`--reads` reads per client per round; the three variants take turns, in an order that
reverses every round, and their latencies are pooled over `--rounds` rounds.  Every
read must find its row, or the benchmark fails.

Goals: the policy adds <= 0.1 ms at p99, the whole tenant transaction <= 0.5 ms at p99
at 1 client, over the bare read.
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio
import asyncpg

from tenantry import db, roles
from tenantry.tenancy import tenant_tx_on

from . import common
from .common import Result, fmt_ms, progress

NAME = "rls"
GOAL_POLICY_P99_MS = 0.1
GOAL_TX_P99_MS = 0.5
VARIANTS = ("bare", "policy", "tenant_tx")
READ = (
    "SELECT u.id, u.email, u.display_name FROM tenantry.users u"
    " WHERE u.tenant_id = $1 AND u.email_normalized = $2"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=None, help="users (1000000; quick 200000)")
    parser.add_argument("--tenants", type=int, default=400, help="tenants (400)")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients (1 8)"
    )
    parser.add_argument(
        "--reads", type=int, default=None, help="reads per client per round (3000; quick 1000)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (4; quick 2)")


async def load(admin: asyncpg.Connection, rows: int, tenants: list[uuid.UUID]) -> None:
    await admin.execute(
        "INSERT INTO tenantry.tenants (id, slug, name)"
        " SELECT t, 't' || replace(t::text, '-', ''), 'bench' FROM unnest($1::uuid[]) t",
        tenants,
    )
    # User i belongs to tenant i % n and is u<i>@example.com.
    await admin.execute(
        "INSERT INTO tenantry.users (tenant_id, id, email)"
        " SELECT ($1::uuid[])[1 + i % $2::integer], gen_random_uuid(), 'U' || i || '@example.com'"
        "   FROM generate_series(0, $3::integer - 1) AS i",
        tenants,
        len(tenants),
        rows,
    )
    await admin.execute("VACUUM ANALYZE tenantry.users")


def email(i: int) -> str:
    return f"u{i}@example.com"


Reader = Callable[[uuid.UUID, str], Awaitable[object]]


async def timed_reads(
    read: Reader, tenant: uuid.UUID, users: list[int], samples: list[float]
) -> None:
    for i in users:
        t0 = time.perf_counter()
        row = await read(tenant, email(i))
        samples.append(time.perf_counter() - t0)
        if row is None:
            raise RuntimeError(f"read found nothing for {email(i)} of tenant {tenant}")


async def one_round(
    variant: str,
    pool: asyncpg.Pool,
    *,
    clients: int,
    tenants: list[uuid.UUID],
    rows: int,
    reads: int,
    rnd: random.Random,
    samples: list[float],
) -> None:
    n = len(tenants)
    picks = rnd.sample(range(n), clients)

    async def client(k: int) -> None:
        t = picks[k]
        tenant = tenants[t]
        # Random users of tenant t: indexes t, t + n, t + 2n, ...
        users = [t + n * rnd.randrange(rows // n) for _ in range(reads)]
        async with pool.acquire() as conn:
            if variant == "policy":
                # Session-level, once, outside the clock: the read stays one statement.
                await conn.execute("SELECT set_config('app.tenant_id', $1, false)", str(tenant))

            async def read(tid: uuid.UUID, mail: str) -> object:
                if variant == "tenant_tx":
                    async with tenant_tx_on(conn, tid) as tx:
                        return await tx.fetchrow(READ, tid, mail)
                return await conn.fetchrow(READ, tid, mail)

            await timed_reads(read, tenant, users, samples)

    async with anyio.create_task_group() as tg:
        for k in range(clients):
            tg.start_soon(client, k)


async def measure(
    admin_url: str, service_url: str, clients: int, tenants: list[uuid.UUID], args: Result
) -> Result:
    pools = {
        "bare": await db.create_pool(admin_url, min_size=clients, max_size=clients),
        "policy": await db.create_pool(service_url, min_size=clients, max_size=clients),
        "tenant_tx": await db.create_pool(service_url, min_size=clients, max_size=clients),
    }
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rnd = random.Random(clients)
    try:

        async def round_of(variant: str, reads: int, into: list[float]) -> None:
            await one_round(
                variant,
                pools[variant],
                clients=clients,
                tenants=tenants,
                rows=args["rows"],
                reads=reads,
                rnd=rnd,
                samples=into,
            )

        # Untimed warm-up: prepared statements, caches.
        for variant in VARIANTS:
            await round_of(variant, 200, [])
        for r in range(args["rounds"]):
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                await round_of(variant, args["reads"], samples[variant])
    finally:
        for p in pools.values():
            await p.close()
    out: Result = {v: common.latency_summary_ms(s) for v, s in samples.items()}
    for key in ("p50", "p99"):
        out[f"policy_adds_{key}_ms"] = round(out["policy"][key] - out["bare"][key], 3)
        out[f"tenant_tx_adds_{key}_ms"] = round(out["tenant_tx"][key] - out["bare"][key], 3)
    return out


async def run(server_url: str, args: argparse.Namespace) -> Result:
    rows = common.pick(args.rows, quick=args.quick, quick_value=200_000, full_value=1_000_000)
    reads = common.pick(args.reads, quick=args.quick, quick_value=1000, full_value=3000)
    rounds = common.pick(args.rounds, quick=args.quick, quick_value=2, full_value=4)
    tenants = [common.tenant(i) for i in range(args.tenants)]
    settings: Result = {"rows": rows, "reads": reads, "rounds": rounds}
    by_clients: dict[str, Result] = {}
    async with common.fresh_database(server_url, "rls") as url:
        admin = await db.connect(url)
        try:
            login = roles.Login(roles.DEFAULT_LOGIN, None)
            await roles.ensure_login(admin, login, roles.SERVICE_ROLES)
            progress(f"rls: loading {rows:,} users over {len(tenants)} tenants")
            await load(admin, rows, tenants)
            await common.checkpoint(admin)
        finally:
            await admin.close()
        service_url = roles.with_login(url, roles.DEFAULT_LOGIN)
        for clients in args.clients:
            progress(f"rls: {clients} client(s), {rounds} rounds x {reads} reads per variant")
            by_clients[str(clients)] = await measure(url, service_url, clients, tenants, settings)
    one = by_clients.get("1")
    goal: Result = {
        "policy_p99_ms_at_most": GOAL_POLICY_P99_MS,
        "tx_p99_ms_at_most": GOAL_TX_P99_MS,
    }
    if one is not None:
        goal["policy_met"] = one["policy_adds_p99_ms"] <= GOAL_POLICY_P99_MS
        goal["tx_met"] = one["tenant_tx_adds_p99_ms"] <= GOAL_TX_P99_MS
    return {
        "rows": rows,
        "tenants": len(tenants),
        "reads_per_client_per_round": reads,
        "rounds": rounds,
        "clients": by_clients,
        "goal": goal,
    }


def render(result: Result) -> str:
    lines = common.header(
        result,
        f"rls: point read by (tenant_id, email), {result['rows']:,} users over"
        f" {result['tenants']} tenants, {result['rounds']} rounds x"
        f" {result['reads_per_client_per_round']:,} reads per client per variant",
    )
    lines.append(f"  {'clients':>7}  {'variant':<10} {'p50 ms':>8} {'p99 ms':>8} {'n':>7}")
    for clients, r in result["clients"].items():
        for v in VARIANTS:
            s = r[v]
            lines.append(
                f"  {clients:>7}  {v:<10} {fmt_ms(s['p50']):>8} {fmt_ms(s['p99']):>8} {s['n']:>7}"
            )
        lines.append(
            f"  {clients:>7}  policy adds p50 {r['policy_adds_p50_ms']:+.3f} / p99"
            f" {r['policy_adds_p99_ms']:+.3f} ms; tenant_tx adds p50"
            f" {r['tenant_tx_adds_p50_ms']:+.3f} / p99 {r['tenant_tx_adds_p99_ms']:+.3f} ms"
        )
    g = result["goal"]
    if "policy_met" in g:
        lines.append(
            f"Goals at 1 client: policy adds <= {g['policy_p99_ms_at_most']:g} ms p99:"
            f" {common.verdict(g['policy_met'])}; tenant tx adds <= {g['tx_p99_ms_at_most']:g}"
            f" ms p99: {common.verdict(g['tx_met'])}"
        )
    return "\n".join(lines)


BENCH = common.Bench(NAME, __doc__ or NAME, add_arguments, run, render)


def main() -> int:
    return common.main(BENCH)


if __name__ == "__main__":
    raise SystemExit(main())
