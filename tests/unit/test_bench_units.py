"""The benchmarks' own logic that decides what is reported: bench.all's variants and
headlines, the drain's goal per tenant count, the latency probe's background."""

from __future__ import annotations

import argparse
import statistics

import anyio
import pytest

from bench import all as bench_all
from bench import drain, latency


def _all_args(*flags: str) -> argparse.Namespace:
    return bench_all.build_parser().parse_args(list(flags))


def test_the_long_benchmarks_run_only_when_asked() -> None:
    plain = bench_all.selected(_all_args())
    assert "drain_1000" in plain and "trigger_tax" in plain
    assert not bench_all.LONG & set(plain)
    assert bench_all.selected(_all_args("--long")) == list(bench_all.BENCHMARKS)
    assert bench_all.selected(_all_args("--only", "sse")) == ["sse"]


@pytest.mark.parametrize(
    ("entry", "option", "value"),
    [("drain", "tenants", 4), ("drain_1000", "tenants", 1000)],
)
def test_drain_entries_run_the_drain_at_their_tenant_counts(
    entry: str, option: str, value: int
) -> None:
    bench = bench_all.load(entry)
    assert bench is not None and bench.name == "drain"
    args = bench_all.bench_args(bench, _all_args("--quick"), entry)
    assert getattr(args, option) == value
    assert args.quick


@pytest.mark.parametrize("entry", ["drain", "drain_1000"])
def test_a_full_run_drains_fewer_jobs_in_three_rounds_and_quick_keeps_its_own(
    entry: str,
) -> None:
    bench = bench_all.load(entry)
    assert bench is not None
    full = bench_all.bench_args(bench, _all_args(), entry)
    assert (full.jobs, full.rounds, full.quick) == (50000, None, False)  # rounds: 3
    quick = bench_all.bench_args(bench, _all_args("--quick"), entry)
    assert (quick.jobs, quick.quick) == (None, True)
    assert full.tenants == (1000 if entry == "drain_1000" else 4)


def test_latency_load_entry_runs_the_probe_under_a_background() -> None:
    bench = bench_all.load("latency_load")
    assert bench is not None and bench.name == "latency"
    assert bench_all.bench_args(bench, _all_args(), "latency_load").background_rate == 1000
    idle = bench_all.bench_args(bench, _all_args(), "latency")
    assert idle.background_rate == 0


def test_drain_goal_is_four_times_at_few_tenants_three_at_a_thousand() -> None:
    assert drain.goal_ratio(4) == 4.0
    assert drain.goal_ratio(1000) == 3.0


def _drain_result(ratios: list[float]) -> dict[str, object]:
    rate = {"min": 1.0, "median": 2.0, "max": 3.0}
    return {
        "benchmark": "drain_1000",
        "jobs": 100,
        "tenants": 1000,
        "rounds": len(ratios),
        "tenantry": {"jobs_per_s": rate},
        "pgqueuer": {"jobs_per_s": rate},
        "ratios": ratios,
        "ratio_spread": {"min": min(ratios), "median": sorted(ratios)[1], "max": max(ratios)},
        "ratio_tenantry_over_pgqueuer": sorted(ratios)[1],
        "goal": {"ratio_at_least": 3.0, "met": False},
    }


def test_drain_headline_is_the_median_ratio_with_its_spread() -> None:
    rows = bench_all.headlines("drain_1000", _drain_result([1.9, 2.5, 1.8]))
    assert [r.bench for r in rows] == ["drain_1000", "drain_1000"]
    assert rows[1].value == "1.90x (1.80-2.50x)"
    assert rows[1].verdict == "MISSED"


async def test_background_keeps_its_rate_with_random_gaps() -> None:
    sent: list[int] = []

    async def send_batch(n: int, _seq: int) -> None:
        sent.append(n)

    bg = latency.Background(2000.0, 10, send_batch)
    with anyio.move_on_after(0.5):
        await bg.run()
    # 100 batches expected in 0.5 s at 200 batches a second; a loaded machine's timers
    # only delay them, and the schedule catches up.
    assert 60 <= len(sent) <= 140
    assert set(sent) == {10}
    gaps = [b[0] - a[0] for a, b in zip(bg.sent, bg.sent[1:], strict=False)]
    # Not a fixed period of 5 ms: exponential gaps spread about as widely as their mean.
    assert statistics.pstdev(gaps) > 0.002
