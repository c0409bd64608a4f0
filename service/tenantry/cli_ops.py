"""`tenantry queues ...` and `tenantry operators ...`: the queue controls every process
follows (pause, resume, concurrency), and the operators who may sign in to the
dashboard at /ops.  Every change is recorded in the audit trail, as the CLI's user."""

from __future__ import annotations

import argparse
import getpass
from collections.abc import Callable
from typing import Any

import asyncpg

from .db import Conn
from .errors import Invalid
from .jobs import queue as jobs
from .ops import audit, forms
from .ops import operators as ops
from .timefmt import utc_text

Out = Callable[[str], None]
JsonText = Callable[..., str]


def add_commands(sub: Any, checked: Callable[[Callable[[str], str]], Callable[[str], str]]) -> None:
    """`checked(validator)`: an argument type whose Invalid is a usage error."""
    queue = checked(jobs.queue_name)
    name = checked(ops.check_name)
    qs = sub.add_parser("queues", help="pause, resume or size a queue in every process")
    q_sub = qs.commands("queues_command")
    ql = q_sub.add_parser("list", help="every queue with jobs or controls, and its controls")
    ql.add_argument("--json", action="store_true")
    for verb, what in (
        ("pause", "stop claiming the queue's jobs in every process (running jobs finish)"),
        ("resume", "claim the queue's jobs again"),
    ):
        c = q_sub.add_parser(verb, help=what)
        c.add_argument("queue", type=queue)
    cc = q_sub.add_parser(
        "concurrency", help="jobs of the queue each process runs at once ('default': its own)"
    )
    cc.add_argument("queue", type=queue)
    cc.add_argument("value", type=_concurrency, help="a whole number from 1 to 10000, or 'default'")

    op = sub.add_parser("operators", help="who may sign in to the dashboard (/ops)")
    op_sub = op.commands("operators_command")
    oa = op_sub.add_parser("add", help="a new operator; prints its key (once)")
    oa.add_argument("name", type=name)
    oa.add_argument("--role", choices=ops.ROLES, required=True)
    ol = op_sub.add_parser("list", help="every operator, with its open sessions")
    ol.add_argument("--json", action="store_true")
    for verb, what in (
        ("remove", "remove an operator (its sessions end)"),
        ("disable", "stop an operator signing in (its sessions end)"),
        ("enable", "let a disabled operator sign in again"),
        ("rotate-key", "a new key for an operator (the old one and its sessions end)"),
    ):
        c = op_sub.add_parser(verb, help=what)
        c.add_argument("name")
    rl = op_sub.add_parser("role", help="change an operator's role (its sessions end)")
    rl.add_argument("name")
    rl.add_argument("role", choices=ops.ROLES)
    lk = op_sub.add_parser(
        "link", help="a one-time sign-in link for an operator, good for 15 minutes"
    )
    lk.add_argument("name")
    lk.add_argument(
        "--base-url", help="the dashboard's address (default: TENANTRY_HOST and TENANTRY_PORT)"
    )


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = "unknown"
    return f"cli:{user}"


def _concurrency(raw: str) -> str:
    """'default', or what the dashboard's form takes (ops.forms.whole: ASCII digits)."""
    if raw != "default":
        try:
            forms.whole(raw, "concurrency", 1, 10_000)
        except Invalid:
            raise argparse.ArgumentTypeError(
                "give a whole number from 1 to 10000, or 'default'"
            ) from None
    return raw


async def run_queues(
    conn: asyncpg.Connection, args: argparse.Namespace, out: Out, json_text: JsonText
) -> int:
    cmd = args.queues_command
    if cmd == "list":
        rows = await jobs.queue_controls(conn)
        if args.json:
            out(json_text([r.__dict__ for r in rows]))
            return 0
        out(f"{'QUEUE':<24} {'STATE':<8} {'CONCURRENCY':<12} CHANGED")
        for r in rows:
            changed = f"{utc_text(r.updated_at)} by {r.updated_by}" if r.updated_at else "-"
            conc = str(r.concurrency) if r.concurrency else "default"
            out(f"{r.queue:<24} {'paused' if r.paused else 'running':<8} {conc:<12} {changed}")
        return 0
    name = args.queue
    actor = _actor()
    settings: dict[str, Any]
    if cmd == "concurrency":
        value = None if args.value == "default" else int(args.value)
        settings = {"concurrency": value, "clear_concurrency": value is None}
        action, detail = "queue_concurrency", {"queue": name, "concurrency": value}
    else:
        settings = {"paused": cmd == "pause"}
        action, detail = f"queue_{cmd}d", {"queue": name}

    async def change(c: Conn) -> int:
        await jobs.set_queue_control(c, name, actor, **settings)
        return 1

    await audit.act_on(conn, actor, action, detail, change)
    if cmd == "concurrency":
        out(f"{name}: concurrency {args.value} in every process")
    else:
        out(f"{name}: {cmd}d in every process")
    return 0


async def run_operators(
    conn: asyncpg.Connection,
    args: argparse.Namespace,
    out: Out,
    json_text: JsonText,
    base_url: str,
) -> int:
    cmd = args.operators_command
    actor = _actor()
    if cmd == "list":
        rows = await ops.listing(conn)
        if args.json:
            out(json_text(rows))
            return 0
        out(f"{'NAME':<24} {'ROLE':<6} {'STATE':<9} {'SESSIONS':<9} LAST SEEN")
        for r in rows:
            state = "disabled" if r["disabled_at"] else "enabled"
            seen = utc_text(r["last_seen_at"]) if r["last_seen_at"] else "-"
            out(f"{r['name']:<24} {r['role']:<6} {state:<9} {r['sessions']:<9} {seen}")
        return 0
    if cmd == "link":
        token = await ops.link(conn, args.name)
        out(ops.sign_in_url(args.base_url or base_url, token))
        return 0
    shown: list[str] = []

    async def change(c: Conn) -> int:
        if cmd == "add":
            shown.append(await ops.add(c, args.name, args.role))
        elif cmd == "remove":
            await ops.remove(c, args.name)
        elif cmd == "rotate-key":
            key = await ops.update(c, args.name, new_key=True)
            assert key is not None
            shown.append(key)
        elif cmd == "role":
            await ops.update(c, args.name, role=args.role)
        else:
            await ops.update(c, args.name, disabled=cmd == "disable")
        return 1

    detail: dict[str, Any] = {"name": args.name}
    if cmd in ("add", "role"):
        detail["role"] = args.role
    await audit.act_on(conn, actor, f"operator_{cmd.replace('-', '_')}", detail, change)
    if shown:
        out(f"{args.name}: key {shown[0]}")
        out("keep it now: it is not shown again (sign in at /ops with it)")
    else:
        out(f"{args.name}: {cmd} done")
    return 0
