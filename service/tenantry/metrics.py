"""Prometheus metrics of one process (`GET /metrics`), from `prometheus-client`.

Two kinds: what happens (jobs claimed and finished, webhook attempts, HTTP requests)
is counted as it happens, through the components' hooks; what the components hold
(open streams, the listener's connection, the pools, the deliverer's places in use) is
read from them when Prometheus scrapes.  Neither touches the database: a scrape costs
the same whatever the queue's size.  (Counts that only the database knows, such as the
queue's depth, are the next step: see issue 12.)

Labels are bounded: queue and kind (the deployment's own), route patterns (never a
path with an id), HTTP status, results and status classes.  No tenant label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .jobs.outcomes import Bury, Complete, Release, Retry

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
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.job_outcomes = Counter(
            "tenantry_job_outcomes",
            "Job runs finished, by queue, kind and result (succeeded, failed: an attempt"
            " that will be retried, snoozed, dead, released: handed back at a stop)",
            ["queue", "kind", "result"],
            registry=r,
        )
        self.job_run = Histogram(
            "tenantry_job_run_seconds",
            "Handler run time, by queue and kind",
            ["queue", "kind"],
            buckets=_DURATIONS,
            registry=r,
        )
        self.job_wait = Histogram(
            "tenantry_job_wait_seconds",
            "From a job's creation to the start of its first attempt (a delay given at"
            " enqueue included), by queue and kind",
            ["queue", "kind"],
            buckets=_DURATIONS,
            registry=r,
        )
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
        self._started: dict[tuple[Any, Any], float] = {}
        self._jobs: dict[tuple[str, str], _JobSeries] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch(self, read: Callable[[], Iterator[Metric]]) -> None:
        """Read these metrics from the components at each scrape."""
        self.registry.register(_Reader(read))

    # --- hooks ------------------------------------------------------------------------

    def worker_hook(self, name: str, data: dict[str, Any]) -> None:
        """The worker's hook (tenantry.jobs.worker): claims, starts and finishes.  On
        every job's path, so the label children are looked up once per queue and kind
        (`labels()` takes a lock and builds a key each time)."""
        if name == "started":
            job = data["job"]
            series = self._series(job.queue, job.kind)
            self._started[(job.tenant_id, job.id)] = data["at"]
            if job.attempt == 1:
                series.wait.observe(data["waited"])
        elif name == "finished":
            job = data["job"]
            series = self._series(job.queue, job.kind)
            result = result_of(data["outcome"])
            outcome = series.outcomes.get(result)
            if outcome is None:
                outcome = series.outcomes[result] = self.job_outcomes.labels(
                    job.queue, job.kind, result
                )
            outcome.inc()
            began = self._started.pop((job.tenant_id, job.id), None)
            if began is not None:
                series.run.observe(data["at"] - began)
        elif name == "claim_ran":
            queue = data["queue"]
            self.claims.labels(queue).inc()
            self.claimed.labels(queue).inc(data["count"])
            self.claim_seconds.labels(queue).observe(data["seconds"])

    def _series(self, queue: str, kind: str) -> _JobSeries:
        series = self._jobs.get((queue, kind))
        if series is None:
            series = self._jobs[(queue, kind)] = _JobSeries(
                {}, self.job_run.labels(queue, kind), self.job_wait.labels(queue, kind)
            )
        return series

    def webhook_attempt(self, result: str, status: int | None, seconds: float) -> None:
        self.webhook_attempts.labels(result, status_class(status)).inc()
        self.webhook_seconds.observe(seconds)

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_seconds.labels(method, route).observe(seconds)


@dataclass(slots=True)
class _JobSeries:
    """One queue and kind's children of the job metrics."""

    outcomes: dict[str, Any]  # result -> the outcome counter's child
    run: Any
    wait: Any


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
