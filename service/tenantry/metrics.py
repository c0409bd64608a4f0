"""Prometheus metrics of one process (`GET /metrics`), from `prometheus-client`.

Two kinds: what happens (jobs claimed and finished, webhook attempts, HTTP requests)
is counted as it happens, through the components' hooks; what the components hold
(open streams, the listener's connection, the pools, the deliverer's places in use) is
read from them when Prometheus scrapes.  Counts that only the database knows (the
queue's depth, the backlog's age, the webhooks' dead letters) are read by
`DatabaseGauges` every few seconds, in a background task, counted up to a cap: a scrape
never touches the database and costs the same whatever the queue's size.

Labels are bounded: queue and kind (the deployment's own), route patterns (never a
path with an id), HTTP status, results and status classes.  No tenant label.
"""

from __future__ import annotations

import time
import uuid
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import logging as log
from .clock import Random, system_random
from .jobs.model import Job
from .jobs.outcomes import Bury, Complete, Outcome, Release, Retry
from .safetext import safe_text
from .sql import queries_for

Q = queries_for(__file__, "metrics.sql")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a job or an attempt from a millisecond to several minutes.
_DURATIONS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def result_of(outcome: object) -> str:
    """A job outcome's name as the metrics give it."""
    if isinstance(outcome, Complete) or outcome is None:
        return "succeeded"  # None: completed in the handler's own transaction
    if isinstance(outcome, Retry):
        return "snoozed" if outcome.refund and not outcome.unknown_kind else "failed"
    if isinstance(outcome, Bury):
        return "dead"
    if isinstance(outcome, Release):
        return "released"
    return "other"


def status_class(status: int | None) -> str:
    return "none" if status is None else f"{status // 100}xx"


class Metrics:
    def __init__(self, *, tenant_labels: bool = False) -> None:
        # A `tenant` label on the job series (TENANTRY_METRICS_TENANT_LABELS): one
        # series per tenant, queue and kind, which thousands of tenants multiply.
        self.tenant_labels = tenant_labels
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.claims = Counter(
            "tenantry_job_claims", "Claim statements run, by queue", ["queue"], registry=r
        )
        self.claimed = Counter(
            "tenantry_job_claimed", "Jobs claimed, by queue", ["queue"], registry=r
        )
        self.claim_seconds = Histogram(
            "tenantry_job_claim_seconds",
            "Claim statement duration, by queue",
            ["queue"],
            buckets=_DURATIONS,
            registry=r,
        )
        self.webhook_attempts = Counter(
            "tenantry_webhook_attempts",
            "Webhook attempts, by result (delivered, failed, gone, aborted, refused) and"
            " response status class (2xx..5xx, none: no response)",
            ["result", "status_class"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            "tenantry_webhook_attempt_seconds",
            "Webhook attempt duration, connect to the end of the response",
            buckets=_DURATIONS,
            registry=r,
        )
        self.http_requests = Counter(
            "tenantry_http_requests",
            "HTTP requests answered, by method, route pattern and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "tenantry_http_request_seconds",
            "HTTP request duration (a stream: until it ends), by method and route",
            ["method", "route"],
            buckets=_DURATIONS,
            registry=r,
        )
        self._jobs: dict[tuple[str, str, uuid.UUID | None], _JobSeries] = {}
        self.watch(self._job_families)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch(self, read: Callable[[], Iterator[Metric]]) -> None:
        """Read these metrics from the components at each scrape."""
        self.registry.register(_Reader(read))

    # --- hooks ------------------------------------------------------------------------

    # --- the worker's observer (tenantry.jobs.worker.JobObserver) ---------------------
    #
    # On every job's path (tens of thousands a second in a drain), so a job's numbers
    # go into plain counts per queue and kind, turned into metric families only when
    # Prometheus scrapes: prometheus-client's own counters and histograms take a lock
    # per update, which cost a drain 13% (bench.drain --observed-pairs).

    def claim_ran(self, queue: str, count: int, seconds: float) -> None:
        self.claims.labels(queue).inc()
        self.claimed.labels(queue).inc(count)
        self.claim_seconds.labels(queue).observe(seconds)

    def job_finished(
        self, job: Job, outcome: Outcome | None, ran: float | None, waited: float | None
    ) -> None:
        series = self._series(job)
        result = result_of(outcome)
        series.outcomes[result] = series.outcomes.get(result, 0) + 1
        if ran is not None:
            series.run.observe(ran)
        if waited is not None:
            series.wait.observe(waited)

    def _series(self, job: Job) -> _JobSeries:
        key = (job.queue, job.kind, job.tenant_id if self.tenant_labels else None)
        series = self._jobs.get(key)
        if series is None:
            series = self._jobs[key] = _JobSeries({}, _Buckets(), _Buckets())
        return series

    def _job_families(self) -> Iterator[Metric]:
        by = ["queue", "kind", "tenant"] if self.tenant_labels else ["queue", "kind"]
        outcomes = CounterMetricFamily(
            "tenantry_job_outcomes",
            "Job runs finished, by queue, kind and result (succeeded, failed: an attempt"
            " that will be retried, snoozed, dead, released: handed back at a stop)",
            labels=[*by, "result"],
        )
        run = HistogramMetricFamily(
            "tenantry_job_run_seconds", "Handler run time, by queue and kind", labels=by
        )
        wait = HistogramMetricFamily(
            "tenantry_job_wait_seconds",
            "From a job's creation to the start of its first attempt (a delay given at"
            " enqueue included), by queue and kind",
            labels=by,
        )
        for (queue, kind, tenant), series in list(self._jobs.items()):
            labels = [queue, kind, str(tenant)] if self.tenant_labels else [queue, kind]
            for result, n in series.outcomes.items():
                outcomes.add_metric([*labels, result], n)
            run.add_metric(labels, series.run.cumulative(), series.run.total)
            wait.add_metric(labels, series.wait.cumulative(), series.wait.total)
        yield outcomes
        yield run
        yield wait

    def webhook_attempt(self, result: str, status: int | None, seconds: float) -> None:
        self.webhook_attempts.labels(result, status_class(status)).inc()
        self.webhook_seconds.observe(seconds)

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_seconds.labels(method, route).observe(seconds)


class _Buckets:
    """A histogram's counts without a lock: the event loop's thread alone updates and
    reads them (the scrape is a request handler on the same loop)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_DURATIONS) + 1)  # the last: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(_DURATIONS, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(str, _DURATIONS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class _JobSeries:
    """One queue and kind's job numbers."""

    outcomes: dict[str, int]  # result -> runs
    run: _Buckets
    wait: _Buckets


class _Reader(Collector):
    def __init__(self, read: Callable[[], Iterator[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        return self._read()


def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(name, doc, value=value)


@dataclass(frozen=True)
class _Reading:
    at: float  # time.time() of the read
    took: float  # seconds the read took
    queues: list[Any]
    webhooks: Any
    lag_events: int
    lag_oldest: datetime | None


class DatabaseGauges:
    """Reads the counts only the database knows every `interval` seconds (jittered),
    each counted up to `cap`, and serves them to every scrape from that reading.  One
    reading per process per interval, however often Prometheus scrapes."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        queues: Sequence[str],
        *,
        interval: float = 5.0,
        cap: int = 100_000,
        max_heads: int = 10_000,
        rnd: Random | None = None,
        on_reading: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool  # the worker's login: the counts are cross-tenant
        # Told after each reading whose numbers differ from the last (live dashboards).
        self._on_reading = on_reading
        self._queues = list(queues)
        self._interval = interval
        self.cap = cap
        self._max_heads = max_heads
        self._rnd = rnd or system_random()
        self.reading: _Reading | None = None
        self._log = log.get("metrics")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.read_once()
            except Exception as exc:  # the database away: the last reading stays, aging
                self._log.warning("metrics_read_failed", error=safe_text(str(exc)))
            await anyio.sleep(self._interval * (0.75 + 0.5 * self._rnd.random()))

    async def read_once(self) -> None:
        began = time.perf_counter()
        async with self._pool.acquire() as conn:
            queues = await conn.fetch(Q["queue_depth"], self._queues, self.cap, self._max_heads)
            webhooks = await conn.fetchrow(Q["webhook_gauges"], self.cap)
            lag = await conn.fetchrow(Q["fanout_lag"], self.cap)
        assert webhooks is not None and lag is not None
        before = self.reading
        self.reading = _Reading(
            time.time(),
            time.perf_counter() - began,
            list(queues),
            webhooks,
            int(lag["events"]),
            lag["oldest"],
        )
        if self._on_reading is not None and (
            before is None
            or (before.queues, before.webhooks, before.lag_events)
            != (self.reading.queues, self.reading.webhooks, self.reading.lag_events)
        ):
            self._on_reading()

    def depth(self) -> list[dict[str, Any]] | None:
        """The last reading's depth per queue (None: no reading yet): queued,
        scheduled and running counted up to the cap (`capped`: at it), and the age of
        the oldest runnable job."""
        r = self.reading
        if r is None:
            return None
        return self._depth_rows(r.queues)

    async def read_depth(self, queues: Sequence[str]) -> list[dict[str, Any]]:
        """The same numbers for other queues (those this process does not work), read
        now, as cheaply."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(Q["queue_depth"], list(queues), self.cap, self._max_heads)
        return self._depth_rows(rows)

    def _depth_rows(self, queues: Sequence[Any]) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        return [
            {
                "queue": q["queue"],
                "queued": q["queued"],
                "scheduled": q["scheduled"],
                "running": q["running"],
                "capped": q["queued"] >= self.cap,
                "oldest_age_s": (now - q["oldest_queued_at"]).total_seconds()
                if q["oldest_queued_at"] is not None
                else None,
            }
            for q in queues
        ]

    def collect(self) -> Iterator[Metric]:
        r = self.reading
        if r is None:
            return
        now = time.time()
        yield gauge("tenantry_db_reading_age_seconds", "Age of the database reading", now - r.at)
        yield gauge("tenantry_db_reading_seconds", "How long the database reading took", r.took)
        jobs = GaugeMetricFamily(
            "tenantry_jobs",
            f"Jobs by queue and state (queued, scheduled, running), counted up to {self.cap}",
            labels=["queue", "state"],
        )
        age = GaugeMetricFamily(
            "tenantry_job_backlog_age_seconds",
            "Age of the oldest runnable (queued) job, by queue; 0 when none waits",
            labels=["queue"],
        )
        for q in r.queues:
            for state in ("queued", "scheduled", "running"):
                jobs.add_metric([q["queue"], state], q[state])
            oldest = q["oldest_queued_at"]
            age.add_metric(
                [q["queue"]], 0.0 if oldest is None else max(now - oldest.timestamp(), 0)
            )
        yield jobs
        yield age
        deliveries = GaugeMetricFamily(
            "tenantry_webhook_deliveries",
            f"Webhook deliveries by state (pending, sending, dead), counted up to {self.cap}",
            labels=["state"],
        )
        for state in ("pending", "sending", "dead"):
            deliveries.add_metric([state], r.webhooks[state])
        yield deliveries
        yield gauge(
            "tenantry_webhook_open_circuits",
            "Endpoints whose circuit is open or half-open",
            r.webhooks["open_circuits"],
        )
        yield gauge(
            "tenantry_webhook_disabled_endpoints",
            "Endpoints disabled (by their tenant, a 410, or failing too long)",
            r.webhooks["disabled_endpoints"],
        )
        yield gauge(
            "tenantry_webhook_fanout_lag_events",
            f"Outbox events not yet fanned out to deliveries, counted up to {self.cap}",
            r.lag_events,
        )
        oldest = r.lag_oldest
        yield gauge(
            "tenantry_webhook_fanout_lag_seconds",
            "Age of the oldest event not yet fanned out; 0 when none",
            0.0 if oldest is None else max(now - oldest.timestamp(), 0.0),
        )
