"""Every benchmark in sequence against one server: `python -m bench.all [--quick]
[--json] [--only NAME ...]` (`make bench`).

Each benchmark module is imported by name when it is about to run, so a module that
does not exist (yet) is reported as missing and the others still run; one that fails
is reported with its error and the run goes on.  Each benchmark parses its own
arguments with its own defaults, given only --quick and --database-url from here; an
entry of VARIANTS (`drain_1000`: the drain over 1,000 tenants; `latency_load`: the
wake-up probe under 1,000 other jobs a second) runs a module with options of its own
added, and the entries of SHORTENED run shorter than their own defaults, so that the
whole run fits in ten minutes.

Output: each benchmark's own report as soon as it finishes, then a markdown table of
the headline figures and their verdicts; with --json, one JSON object keyed by
benchmark name instead.  The exit status is 1 when a benchmark failed or one named
with --only is missing; a MISSED goal is a result, not a failure.
"""

from __future__ import annotations

import argparse
import importlib
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import common
from .common import Result, fmt_ms, fmt_rate, progress

# The order they run in: the cheap throughput figures first, the long ones last.
BENCHMARKS = (
    "drain",
    "drain_1000",
    "sustained",
    "latency",
    "latency_load",
    "trigger_tax",
    "rls",
    "noisy",
    "onboarding",
    "webhooks",
    "metrics",
    "sse",
)

# The longest (minutes each: 1,000,000 queued jobs, 20,000 open streams): run only with
# --long or when named with --only, so that a plain `make bench` stays near ten minutes.
LONG = frozenset({"metrics", "sse"})

# Entries that run another benchmark's module with options of their own: (module,
# arguments added to the benchmark's own defaults).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    # Issue 14: the drain at 1,000 tenants is part of every full run.
    "drain_1000": ("drain", ["--tenants", "1000"]),
    # Issue 14: the wake-up probe while 1,000 other jobs a second flow through the queue.
    "latency_load": ("latency", ["--background-rate", "1000"]),
}

# Options this run adds to an entry's own (not with --quick, which has its own sizes), so
# that `make bench` fits in ten minutes (issue 14; it took 13 min 23 s without them, the
# two drains 3 min each): the drains keep their three rounds (the spread) over
# 50,000 jobs each instead of 100,000, the trigger tax its five runs of 6 s a setting
# instead of 10, the sustained load 15 s per rate instead of 30.  Each benchmark run
# alone keeps its longer defaults; the README says which figure came from which.
SHORTENED: dict[str, list[str]] = {
    "drain": ["--jobs", "50000"],
    "drain_1000": ["--jobs", "50000"],
    "trigger_tax": ["--seconds", "6"],
    "sustained": ["--seconds", "15"],
}


@dataclass(frozen=True)
class Headline:
    bench: str
    figure: str
    value: str
    goal: str = ""
    verdict: str = "-"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__)
    common.add_common_arguments(parser)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"run only these ({', '.join(BENCHMARKS)})",
    )
    parser.add_argument(
        "--long",
        action="store_true",
        help=f"also run the long ones ({', '.join(sorted(LONG))}; `make bench-long`)",
    )
    return parser


def selected(args: argparse.Namespace) -> list[str]:
    """The entries to run, in order: those named with --only, else all but the long
    ones unless --long."""
    if args.only:
        return list(args.only)
    return [n for n in BENCHMARKS if args.long or n not in LONG]


def load(name: str) -> common.Bench | None:
    """The module's BENCH, or None when the module does not exist.  Any other import
    error (a half-written module) propagates: it is a failure, not an absence."""
    module_name = VARIANTS.get(name, (name, []))[0]
    try:
        module = importlib.import_module(f"{__package__}.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.{module_name}":
            return None
        raise
    bench = getattr(module, "BENCH", None)
    if not isinstance(bench, common.Bench):
        raise TypeError(f"bench.{module_name} has no BENCH")
    return bench


def bench_args(
    bench: common.Bench, args: argparse.Namespace, name: str | None = None
) -> argparse.Namespace:
    """The benchmark's own defaults, plus the entry's own options for a variant; only
    the switches shared by all pass through."""
    entry = name or bench.name
    flags: list[str] = list(VARIANTS.get(entry, (bench.name, []))[1])
    if args.quick:
        flags.append("--quick")
    else:
        flags += SHORTENED.get(entry, [])
    if args.database_url:
        flags += ["--database-url", args.database_url]
    return common.build_parser(bench).parse_args(flags)


# --- headline figures ---------------------------------------------------------------


def _x(value: Any) -> str:
    return f"{float(value):.2f}x"


def _drain(r: Result) -> list[Headline]:
    name = str(r.get("benchmark", "drain"))
    t = r["tenantry"]["jobs_per_s"]
    rows = [
        Headline(
            name,
            f"Tenantry drain, {r['jobs']:,} no-op jobs over {r['tenants']:,} tenants,"
            f" {r['rounds']} rounds: min / median / max",
            f"{fmt_rate(t['min'])} / {fmt_rate(t['median'])} / {fmt_rate(t['max'])} jobs/s",
        )
    ]
    if "goal" in r:
        g = r["goal"]
        p = r["pgqueuer"]["jobs_per_s"]
        rs = r["ratio_spread"]
        rows.append(
            Headline(
                name,
                "drain Tenantry / PGQueuer, median of the rounds (rounds' spread; PGQueuer"
                f" {fmt_rate(p['min'])}-{fmt_rate(p['max'])} jobs/s)",
                f"{_x(r['ratio_tenantry_over_pgqueuer'])} ({rs['min']:.2f}-{rs['max']:.2f}x)",
                f">= {g['ratio_at_least']:g}x",
                common.verdict(g["met"]),
            )
        )
    return rows


def _sustained(r: Result) -> list[Headline]:
    rows = []
    for rnd in r["rounds"]:
        label = "max rate" if rnd["rate"] is None else f"{rnd['rate']:g}/s offered"
        rows.append(
            Headline(
                "sustained",
                f"jobs in / out per s ({label}, {rnd['clients']} clients)",
                f"{fmt_rate(rnd['jobs_in_per_s'])} / {fmt_rate(rnd['jobs_out_per_s'])}",
                "depth bounded",
                "yes" if rnd["bounded"] else "NO",
            )
        )
    return rows


def _latency(r: Result) -> list[Headline]:
    name = str(r.get("benchmark", "latency"))
    t = r["tenantry"]["commit_to_start_ms"]
    g = r["goal"]
    rate = float(r.get("background_rate") or 0)
    if rate:
        b = r["tenantry"].get("background", {})
        what = (
            f"commit -> handler start, {fmt_rate(rate)} other jobs/s through the queue"
            f" ({fmt_rate(b.get('started_per_s', 0))}/s achieved): p50 / p99"
        )
        wanted = f"p99 <= {g['p99_ms_at_most']:g} ms"
    else:
        what = "commit -> handler start, idle worker: p50 / p99"
        wanted = f"<= {g['p50_ms_at_most']:g} / {g['p99_ms_at_most']:g} ms"
    rows = [
        Headline(
            name,
            what,
            f"{fmt_ms(t['p50'])} / {fmt_ms(t['p99'])} ms",
            wanted,
            common.verdict(g["met"]),
        )
    ]
    if "pgqueuer" in r:
        p = r["pgqueuer"]["commit_to_start_ms"]
        rows.append(
            Headline(
                name,
                "PGQueuer, same probe: p50 / p99",
                f"{fmt_ms(p['p50'])} / {fmt_ms(p['p99'])} ms",
            )
        )
    return rows


def _trigger_tax(r: Result) -> list[Headline]:
    g = r["goal"]
    rows = [
        Headline(
            "trigger_tax",
            f"insert tps with / without the throttled trigger ({r['clients']} clients,"
            f" {r['runs']} runs): min / median of the runs' ratios",
            f"{_x(r['ratio_min'])} / {_x(r['ratio_median'])}",
            f">= {g['ratio_at_least']:g}x in every run",
            common.verdict(g["met"]),
        ),
    ]
    if "ratio_naive_over_none" in r:
        rows.append(
            Headline(
                "trigger_tax",
                "insert tps with a naive per-row NOTIFY / without (reference)",
                _x(r["ratio_naive_over_none"]),
            )
        )
    return rows


def _noisy(r: Result) -> list[Headline]:
    g = r["goal"]
    rows = [
        Headline(
            "noisy",
            f"B's commit -> start p99 behind A's {r['latency']['backlog']:,}-job backlog",
            f"{fmt_ms(r['latency']['backlog_ms'].get('p99', float('nan')))} ms",
            f"<= {g['p99_ms_at_most']:g} ms",
            common.verdict(g["met"]),
        )
    ]
    if "drain" in r:
        d = r["drain"]
        rows.append(
            Headline(
                "noisy",
                "drain fair claim / FIFO claim (worst tenant spread)",
                _x(d["worst_ratio_fair_over_fifo"]),
                f">= {d['goal']['ratio_at_least']:g}x",
                common.verdict(d["goal"]["met"]),
            )
        )
    return rows


def _rls(r: Result) -> list[Headline]:
    g = r["goal"]
    rows = []
    for clients, c in r["clients"].items():
        gated = clients == "1"  # the goals are set at one client
        for what, key, limit, met in (
            ("policy", "policy_adds_p99_ms", "policy_p99_ms_at_most", "policy_met"),
            ("tenant transaction", "tenant_tx_adds_p99_ms", "tx_p99_ms_at_most", "tx_met"),
        ):
            rows.append(
                Headline(
                    "rls",
                    f"indexed tenant read, {clients} client(s): {what} adds, p99",
                    f"{c[key]:+.3f} ms",
                    f"<= {g[limit]:g} ms" if gated else "",
                    common.verdict(g[met]) if gated else "-",
                )
            )
    return rows


def _onboarding(r: Result) -> list[Headline]:
    rows = []
    if "open" in r:
        o = r["open"]
        g = o["goal"]
        p = o["provisioning_at_end"]
        rows += [
            Headline(
                "onboarding",
                f"POST /v1/onboardings p99, open loop {o['rate']:g} req/s from"
                f" {o.get('generator', 'python')} ({fmt_rate(o['achieved_per_s'])}/s achieved,"
                f" {o['errors']:,} errors)",
                f"{fmt_ms(o['latency_ms']['p99'])} ms",
                f"<= {g['p99_ms_at_most']:g} ms",
                common.verdict(g["met"]),
            ),
            Headline(
                "onboarding",
                "sign-ups provisioned by the end of that load (completed / accepted)",
                f"{p['completed']:,} / {p['accepted']:,}",
            ),
        ]
    if "follow" in r:
        f = r["follow"]["accept_to_completed_ms"]
        rows.append(
            Headline(
                "onboarding",
                f"POST -> onboarding.completed received, {r['follow']['rate']:g}/s: p50 / p99",
                f"{fmt_ms(f['p50'])} / {fmt_ms(f['p99'])} ms",
            )
        )
    return rows


def _sse(r: Result) -> list[Headline]:
    m = r["memory"]
    streams = r["connect"]["streams"]
    rows = [
        Headline(
            "sse",
            f"memory per idle SSE client, hub included ({streams:,} streams)",
            f"{m['kib_per_client']:.1f} KiB",
            f"<= {m['goal']['kib_per_client_at_most']:g} KiB",
            common.verdict(m["goal"]["met"]),
        )
    ]
    if "latency" in r:
        lt = r["latency"]
        g = lt["goal"]
        rows += [
            Headline(
                "sse",
                f"event commit -> SSE client p99, {r['rate']:g}/s over {streams:,} streams"
                f" (lost {lt['lost']:,})",
                f"{fmt_ms(lt['commit_to_client_ms']['p99'])} ms",
                f"<= {g['p99_ms_at_most']:g} ms, none lost",
                common.verdict(g["met"]),
            ),
            Headline(
                "sse",
                "service CPU per delivered event",
                f"{lt['service_cpu_us_per_delivery']:.0f} us",
            ),
        ]
    return rows


def _webhooks(r: Result) -> list[Headline]:
    g, b, ol = r["goal"], r["burst"], r["open_loop"]
    rows = [
        Headline(
            "webhooks",
            f"webhook deliveries/s, burst of {b['deliveries']:,} over 10 endpoints (recorded)",
            f"{fmt_rate(b.get('recorded_per_s', 0))}/s",
            f">= {fmt_rate(g['rate_at_least'])}/s",
            common.verdict(g["rate_met"]),
        ),
        Headline(
            "webhooks",
            f"webhook event commit -> receiver p99 at {r['rate']:g}/s (lost {ol['lost']})",
            f"{fmt_ms(ol['commit_to_receiver_ms']['p99'])} ms",
            f"<= {g['p99_ms_at_most']:g} ms",
            common.verdict(g["p99_met"]),
        ),
    ]
    if "hang_met" in g:
        rows.append(
            Headline(
                "webhooks",
                "one endpoint hanging: the other nine's rate / p99 against none hanging",
                f"{g['hang_rate_ratio']:.2f}x / {g['hang_p99_ratio']:.2f}x",
                ">= 0.90x / <= 1.10x",
                common.verdict(g["hang_met"]),
            )
        )
    return rows


def _metrics(r: Result) -> list[Headline]:
    return [
        Headline(
            "metrics",
            f"GET /metrics p99 with {r['jobs']:,} queued jobs (the database reading behind it:"
            f" p99 {fmt_ms(r['reading_ms']['p99'])} ms, once per 5 s)",
            f"{fmt_ms(r['scrape_ms']['p99'])} ms",
            f"<= {r['goal']['scrape_ms_at_most']:g} ms",
            common.verdict(r["goal"]["met"]),
        )
    ]


HEADLINES: dict[str, Callable[[Result], list[Headline]]] = {
    "drain": _drain,
    "drain_1000": _drain,
    "sustained": _sustained,
    "latency": _latency,
    "latency_load": _latency,
    "trigger_tax": _trigger_tax,
    "rls": _rls,
    "noisy": _noisy,
    "onboarding": _onboarding,
    "sse": _sse,
    "webhooks": _webhooks,
    "metrics": _metrics,
}


def _generic(name: str, r: Result) -> list[Headline]:
    """Any `goal` dict ({..., "met": bool}) at the top level or one level down."""
    rows = []
    for key, value in [("", r), *((k, v) for k, v in r.items() if isinstance(v, dict))]:
        goal = value.get("goal")
        if isinstance(goal, dict) and "met" in goal:
            spec = ", ".join(f"{k} {v}" for k, v in goal.items() if k != "met")
            rows.append(
                Headline(name, f"{key} goal".strip(), "-", spec, common.verdict(goal["met"]))
            )
    return rows or [Headline(name, "(no headline figure)", "-")]


def headlines(name: str, r: Result) -> list[Headline]:
    if _status(r):
        what = f"bench.{name} not found" if _status(r) == "missing" else str(r.get("error"))
        return [Headline(name, what, "-", "", str(r["status"]).upper())]
    try:
        return HEADLINES[name](r)
    except (KeyError, TypeError, ValueError):
        # The module's result changed shape: its goals are still worth a row.
        return _generic(name, r)


def summary_table(rows: Sequence[Headline]) -> str:
    head = ("benchmark", "figure", "value", "goal", "verdict")
    cells = [head, *((h.bench, h.figure, h.value, h.goal, h.verdict) for h in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]

    def line(cols: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"

    out = ["== summary ==", line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells[1:]]
    return "\n".join(out)


# --- running ------------------------------------------------------------------------


def _status(r: Result) -> str | None:
    """'failed' or 'missing' for the placeholders below; None for a real result."""
    status = r.get("status")
    return status if status in ("failed", "missing") else None


def _failure(name: str, exc: BaseException) -> Result:
    progress(f"{name}: FAILED\n{traceback.format_exc().rstrip()}")
    return {"benchmark": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _render_status(r: Result) -> str:
    return f"== {r['benchmark']}: {r['status'].upper()} ==\n   {r.get('error', '')}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.configure_logging()
    names = selected(args)
    results: dict[str, Result] = {}
    benches: dict[str, common.Bench] = {}
    for name in names:
        try:
            bench = load(name)
        except Exception as exc:
            results[name] = _failure(name, exc)
            continue
        if bench is None:
            progress(f"{name}: module bench.{name} not found, skipped")
            results[name] = {"benchmark": name, "status": "missing"}
        else:
            benches[name] = bench
    with common.server(args.database_url) as url:
        for name in names:
            if name not in benches:
                continue
            bench = benches[name]
            try:
                results[name] = common.run_async(
                    common.run_one, bench, url, bench_args(bench, args, name)
                )
                results[name]["benchmark"] = name
            except Exception as exc:
                results[name] = _failure(name, exc)
            if not args.json:
                render = _render_status if _status(results[name]) else bench.render
                common.emit(results[name], False, render)
                common.emit({}, False, lambda _r: "")
    ordered = {name: results[name] for name in names}
    if args.json:
        common.emit(ordered, True, common.dumps)
    else:
        for name in names:
            if name not in benches:
                common.emit(results[name], False, _render_status)
        rows = [h for name in names for h in headlines(name, ordered[name])]
        common.emit({}, False, lambda _r: summary_table(rows))
    failed = any(_status(r) == "failed" for r in ordered.values())
    missing_asked = bool(args.only) and any(_status(r) == "missing" for r in ordered.values())
    return 1 if failed or missing_asked else 0


if __name__ == "__main__":
    raise SystemExit(main())
