"""`tenantry webhooks ...`: the operator's view of every tenant's webhooks, and replay
or discard of dead deliveries, one or in bulk (the count first, `--yes` to go on)."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from .errors import Invalid
from .timefmt import utc_text
from .webhooks import fanout, operators
from .webhooks.deliveries import STATES
from .webhooks.endpoints import Endpoints
from .webhooks.model import event_type_filter, parse_endpoint

Out = Callable[[str], None]
JsonText = Callable[..., str]


def add_commands(
    sub: Any, uuid_type: Callable[[str], uuid.UUID], positive: Callable[[str], int]
) -> None:
    wh = sub.add_parser("webhooks", help="webhook endpoints and deliveries across tenants")
    wh_sub = wh.commands("webhooks_command")
    st = wh_sub.add_parser("stats", help="fan-out lag; deliveries waiting, in flight, dead")
    st.add_argument("--json", action="store_true")
    ep = wh_sub.add_parser("endpoints", help="endpoints with their circuit, newest first")
    ep.add_argument("--tenant", type=uuid_type, help="only this tenant's")
    ep.add_argument("--limit", type=positive, default=50)
    ep.add_argument("--json", action="store_true")
    dl = wh_sub.add_parser("deliveries", help="deliveries, most recently changed first")
    _filters(dl, uuid_type, state_default=None)
    dl.add_argument("--limit", type=positive, default=50)
    dl.add_argument("--json", action="store_true")
    sh = wh_sub.add_parser("show", help="one delivery in full: body and every attempt")
    sh.add_argument("id", type=uuid_type)
    add = wh_sub.add_parser(
        "add", help="register an endpoint for a tenant; prints its id and secret (once)"
    )
    add.add_argument("tenant", type=uuid_type)
    add.add_argument("url")
    add.add_argument(
        "--event-type",
        action="append",
        default=[],
        help="an event type or prefix (invoice.*) it wants; repeat for more (default: all)",
    )
    add.add_argument("--description", default="")
    add.add_argument("--rate-limit", type=positive, help="deliveries per second at most")
    for name, what in (
        ("remove", "delete an endpoint (its waiting deliveries are cancelled)"),
        ("enable", "enable an endpoint again (a closed circuit, no failure streak)"),
        ("disable", "disable an endpoint (its deliveries wait)"),
    ):
        one = wh_sub.add_parser(name, help=what)
        one.add_argument("tenant", type=uuid_type)
        one.add_argument("endpoint", type=uuid_type)
    for name, what in (
        ("replay", "send deliveries again now, with a fresh schedule"),
        ("discard", "discard dead deliveries (kept on record as cancelled, reason discarded)"),
    ):
        act = wh_sub.add_parser(
            name, help=f"{what}: one by id, or every one a filter selects (--yes to go on)"
        )
        act.add_argument("id", type=uuid_type, nargs="?", help="a delivery's id")
        # Replay sends finished deliveries again; discard ends dead ones.
        _filters(
            act,
            uuid_type,
            state_default="dead",
            states=("dead", "cancelled", "delivered") if name == "replay" else ("dead",),
        )
        act.add_argument(
            "--yes", action="store_true", help="act on every match (without: show the count)"
        )


def _event_type(raw: str) -> str:
    try:
        return event_type_filter(raw)
    except Invalid as exc:
        raise argparse.ArgumentTypeError(f"{raw[:60]!r} {exc.message}") from None


def _filters(
    parser: argparse.ArgumentParser,
    uuid_type: Callable[[str], uuid.UUID],
    *,
    state_default: str | None,
    states: Sequence[str] = STATES,
) -> None:
    parser.add_argument(
        "--state",
        choices=states,
        default=state_default,
        help="only deliveries in this state"
        + (f" (default {state_default})" if state_default else ""),
    )
    parser.add_argument("--tenant", type=uuid_type, help="only this tenant's")
    parser.add_argument("--endpoint", type=uuid_type, help="only this endpoint's")
    parser.add_argument("--event-type", type=_event_type, help="only events of this type")


# The commands that act in one tenant's context (the service's login), not across.
TENANT_COMMANDS = frozenset({"add", "remove", "enable", "disable"})


async def run_in_tenant(endpoints: Endpoints, args: argparse.Namespace, out: Out) -> int:
    """`webhooks add|remove|enable|disable`: as the tenant API does, in its context."""
    cmd = args.webhooks_command
    if cmd == "add":
        body: dict[str, Any] = {"url": args.url, "description": args.description}
        if args.event_type:
            body["event_types"] = args.event_type
        if args.rate_limit is not None:
            body["rate_limit"] = args.rate_limit
        view, secret = await endpoints.create(args.tenant, parse_endpoint(body))
        out(f"{view['id']}  {secret}")
        return 0
    if cmd == "remove":
        cancelled = await endpoints.delete(args.tenant, args.endpoint)
        out(f"removed endpoint {args.endpoint}; {cancelled} waiting deliveries cancelled")
        return 0
    patch = parse_endpoint({"enabled": cmd == "enable"}, patch=True)
    view = await endpoints.update(args.tenant, args.endpoint, patch)
    out(f"endpoint {args.endpoint} {'enabled' if view['enabled'] else 'disabled'}")
    return 0


def check_usage(args: argparse.Namespace) -> str | None:
    """A usage error of `webhooks replay|discard`, or None."""
    if args.webhooks_command not in ("replay", "discard"):
        return None
    # Without an id, every match of the filters (the state alone is one): the count
    # first, --yes to act.
    filtered = any(getattr(args, k) is not None for k in ("tenant", "endpoint", "event_type"))
    if args.id is not None and (filtered or args.yes):
        return f"webhooks {args.webhooks_command}: an id, or filters with --yes, not both"
    return None


async def run(
    conn: asyncpg.Connection, args: argparse.Namespace, out: Out, json_text: JsonText
) -> int:
    cmd = args.webhooks_command
    if cmd == "stats":
        figures = await stats(conn)
        out(json_text(figures) if args.json else stats_line(figures))
        return 0
    if cmd == "endpoints":
        rows = await operators.endpoints(conn, args.tenant, args.limit)
        if args.json:
            out(json_text(rows))
        for r in [] if args.json else rows:
            state = "enabled" if r["enabled"] else f"disabled ({r['disabled_reason']})"
            out(
                f"{r['id']}  {r['tenant_id']}  {state}  circuit={r['circuit_state']}"
                f"  failures={r['circuit_failures']}  {r['url']}"
            )
        return 0
    if cmd == "show":
        out(json_text(await operators.delivery(conn, args.id), indent=True))
        return 0
    match = operators.DeliveryMatch(args.state, args.tenant, args.endpoint, args.event_type)
    if cmd == "deliveries":
        rows = await operators.deliveries(conn, match, args.limit)
        if args.json:
            out(json_text(rows))
        for r in [] if args.json else rows:
            out(
                f"{r['id']}  {r['tenant_id']}  {r['state']}  {utc_text(r['updated_at'])}"
                f"  {r['event_type']}  attempts={r['attempts']}  {r['reason'] or ''}"
                f"  {r['last_error'] or ''}".rstrip()
            )
        return 0
    if args.id is not None:
        n = await operators.act(conn, cmd, delivery_id=args.id)
        if not n:
            out(f"delivery {args.id}: nothing to {cmd} (unknown, or not in a state to {cmd})")
            return 1
        out(f"{'replaying' if cmd == 'replay' else 'discarded'} delivery {args.id}")
        return 0
    if not args.yes:
        n = await operators.act(conn, cmd, match=match, only_count=True)
        out(f"{n} deliveries match; nothing done (add --yes to {cmd} them)")
        return 0
    n = await operators.act(conn, cmd, match=match)
    out(f"{'replaying' if cmd == 'replay' else 'discarded'} {n} deliveries")
    return 0


async def stats(conn: asyncpg.Connection) -> dict[str, Any]:
    lag = await fanout.lag(conn)
    figures = await operators.stats(conn)
    return {
        "fanout_lag_events": lag.events,
        "fanout_oldest_age_s": lag.oldest_seconds,
        **figures,
    }


def stats_line(f: dict[str, Any]) -> str:
    age = f["fanout_oldest_age_s"]
    return (
        f"webhooks: fan-out lag {f['fanout_lag_events']} events"
        f"{f' (oldest {age:.1f} s)' if age is not None else ''}; deliveries pending"
        f" {f['pending']}, sending {f['sending']}, dead {f['dead']}; open circuits"
        f" {f['open_circuits']}, disabled endpoints {f['disabled_endpoints']}"
    )
