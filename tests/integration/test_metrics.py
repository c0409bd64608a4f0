"""`GET /metrics`: what one process did and holds, in the Prometheus text format, read
with prometheus-client's own parser after real work (a sign-up provisioned, a webhook
delivered)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tenantry.app import Service
from tenantry.metrics import DatabaseGauges
from tests.helpers import eventually
from tests.integration.test_webhooks import new_tenant, service
from tests.receiver import Receiver, running_receiver

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(svc: Service) -> tuple[str, Samples]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{svc.http.port}/metrics") as r,
    ):
        assert r.status == 200
        text = await r.text()
        content_type = r.headers["Content-Type"]
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return content_type, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
async def svc(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> AsyncIterator[Service]:
    async with service(tmp_path, app_url, pool, worker_pool) as s:
        yield s


async def test_metrics_count_jobs_webhooks_requests_and_show_the_components(
    svc: Service, pool: asyncpg.Pool
) -> None:
    base = f"http://127.0.0.1:{svc.http.port}"
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/v1/onboardings",
            json={"email": "ada@example.com", "tenant_name": "Analytical Engines", "plan": "pro"},
        ) as r,
    ):
        assert r.status == 202
    async with running_receiver() as receiver:
        await _deliver_one(svc, pool, receiver)
        samples: Samples = {}

        async def provisioned() -> bool:
            _, got = await scrape(svc)
            samples.update(got)
            return bool(
                value(
                    got,
                    "tenantry_job_outcomes_total",
                    queue="default",
                    kind="onboarding.provision",
                    result="succeeded",
                )
            )

        await eventually(provisioned)
        await eventually(lambda: _has_read(svc))
        content_type, samples = await scrape(svc)
    assert content_type.startswith("text/plain; version=0.0.4")
    job = {"queue": "default", "kind": "onboarding.provision"}
    assert value(samples, "tenantry_job_run_seconds_count", **job) == 1
    assert value(samples, "tenantry_job_wait_seconds_count", **job) == 1
    assert (value(samples, "tenantry_job_claims_total", queue="default") or 0) >= 1
    assert (value(samples, "tenantry_job_claimed_total", queue="default") or 0) >= 1
    assert (
        value(samples, "tenantry_webhook_attempts_total", result="delivered", status_class="2xx")
        == 1
    )
    assert value(samples, "tenantry_webhook_attempt_seconds_count") == 1
    assert (
        value(
            samples,
            "tenantry_http_requests_total",
            method="POST",
            route="/v1/onboardings",
            status="202",
        )
        == 1
    )
    # Route patterns, never paths with ids in them.
    assert value(
        samples,
        "tenantry_http_requests_total",
        method="GET",
        route="/v1/webhook-deliveries/{id}",
        status="200",
    )
    assert value(samples, "tenantry_listener_connected") == 1
    assert value(samples, "tenantry_sse_streams") == 0
    assert value(samples, "tenantry_pool_connections", pool="service", state="in_use") is not None
    assert value(samples, "tenantry_webhook_attempts_in_flight") == 0
    # The database reading, made when the service started.
    assert value(samples, "tenantry_jobs", queue="default", state="queued") is not None
    assert value(samples, "tenantry_webhook_open_circuits") == 0


async def _deliver_one(svc: Service, pool: asyncpg.Pool, receiver: Receiver) -> None:
    acme = await new_tenant(pool, svc)
    await acme.endpoint(receiver.url("/m"))
    await acme.emit(pool, "invoice.paid")
    await receiver.wait_count("/m", 1)
    [d] = await acme.wait_deliveries(1)

    async def recorded() -> bool:
        return bool((await acme.delivery(d["id"]))["state"] == "delivered")

    await eventually(recorded)


async def test_the_queue_depth_and_backlog_age_come_from_one_capped_reading(
    worker_pool: asyncpg.Pool, admin_pool: asyncpg.Pool
) -> None:
    # Four runnable jobs over three (priority, tenant) groups, the oldest in the group
    # the claim index reaches last (lowest priority, highest tenant id): the walk over
    # the groups' heads must reach it.  Two delayed ones wait as scheduled.
    a, b = uuid.UUID(int=1), uuid.UUID(int=2)
    await admin_pool.execute(
        "INSERT INTO tenantry.jobs (tenant_id, kind, queue, priority, run_at) VALUES"
        " ($1, 'k', 'default', 5, now() - interval '10 seconds'),"
        " ($2, 'k', 'default', 5, now() - interval '20 seconds'),"
        " ($1, 'k', 'default', 0, now() - interval '30 seconds'),"
        " ($2, 'k', 'default', 0, now() - interval '100 seconds'),"
        " ($1, 'k', 'default', 0, now() + interval '1 hour'),"
        " ($2, 'k', 'default', 0, now() + interval '2 hours')",
        a,
        b,
    )
    gauges = DatabaseGauges(worker_pool, ["default", "idle"], cap=1000)
    await gauges.read_once()
    samples = _collected(gauges)
    assert value(samples, "tenantry_jobs", queue="default", state="queued") == 4
    assert value(samples, "tenantry_jobs", queue="default", state="scheduled") == 2
    assert value(samples, "tenantry_jobs", queue="default", state="running") == 0
    age = value(samples, "tenantry_job_backlog_age_seconds", queue="default")
    assert age is not None and 100 <= age < 160
    assert value(samples, "tenantry_job_backlog_age_seconds", queue="idle") == 0
    assert value(samples, "tenantry_webhook_deliveries", state="dead") == 0
    assert value(samples, "tenantry_webhook_fanout_lag_events") == 0
    # Counted up to the cap, never further: a million rows cost what three do.
    capped = DatabaseGauges(worker_pool, ["default"], cap=3)
    await capped.read_once()
    assert value(_collected(capped), "tenantry_jobs", queue="default", state="queued") == 3


def _collected(gauges: DatabaseGauges) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in gauges.collect()
        for s in family.samples
    }


ROOT = Path(__file__).resolve().parents[2]
_METRIC = re.compile(r"\btenantry_[a-z_]+")


def _family(name: str) -> str:
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


async def test_the_alert_rules_and_the_dashboard_use_metrics_that_exist(svc: Service) -> None:
    """deploy/'s Prometheus rules and Grafana dashboard: well formed, and every metric
    they name is one a running service exports (a renamed metric fails here)."""
    rules = yaml.safe_load((ROOT / "deploy/prometheus/tenantry-alerts.yml").read_text())
    exprs: list[str] = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"].startswith("Tenantry") and rule["labels"]["severity"]
            assert rule["annotations"]["summary"]
            exprs.append(rule["expr"])
    dashboard = orjson.loads((ROOT / "deploy/grafana/tenantry.json").read_bytes())
    assert dashboard["uid"] == "tenantry" and dashboard["panels"]
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {_family(m) for e in exprs for m in _METRIC.findall(e)}
    await eventually(lambda: _has_read(svc))
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{svc.http.port}/metrics") as r,
    ):
        exported = {f.name for f in text_string_to_metric_families(await r.text())}
    assert used and used <= exported, used - exported


async def _has_read(svc: Service) -> bool:
    """The database reading runs in the background: whether its first one is in."""
    return svc.gauges.reading is not None


async def test_tenant_labels_only_when_asked_and_metrics_on_a_port_of_their_own(
    tmp_path: Path, app_url: str, pool: asyncpg.Pool, worker_pool: asyncpg.Pool
) -> None:
    async with service(
        tmp_path, app_url, pool, worker_pool, metrics_tenant_labels=True, metrics_port=0
    ) as svc:
        assert svc.metrics_http is not None and svc.metrics_http.port
        base = f"http://127.0.0.1:{svc.http.port}"
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{base}/v1/onboardings",
                json={"email": "t@example.com", "tenant_name": "Labelled", "plan": "free"},
            ) as r,
        ):
            assert r.status == 202
            tenant = (await r.json())["tenant_id"]
        metrics_base = f"http://127.0.0.1:{svc.metrics_http.port}"

        async def labelled() -> bool:
            async with aiohttp.ClientSession() as http, http.get(f"{metrics_base}/metrics") as r:
                assert r.status == 200
                text = await r.text()
            samples = {
                (s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }
            return bool(
                value(
                    samples,
                    "tenantry_job_outcomes_total",
                    queue="default",
                    kind="onboarding.provision",
                    tenant=tenant,
                    result="succeeded",
                )
            )

        await eventually(labelled)
        # The service port no longer answers /metrics: it is not for the public.
        async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as r:
            assert r.status == 404


async def test_acquires_waiting_for_a_connection_are_counted(svc: Service) -> None:
    """With every connection of the service's pool held, one more acquire waits: the
    gauge says so, and says 0 again once it got one."""
    size = svc.pool.get_max_size()
    held = [await svc.pool.acquire() for _ in range(size)]

    async def one_more() -> Any:
        return await svc.pool.acquire()

    waiter = asyncio.create_task(one_more())
    try:
        await eventually(lambda: _gauge_is(svc, "waiting", 1.0), timeout=10)
    finally:
        for conn in held:
            await svc.pool.release(conn)
    await svc.pool.release(await waiter)
    await eventually(lambda: _gauge_is(svc, "waiting", 0.0), timeout=10)


async def _gauge_is(svc: Service, state: str, expected: float) -> bool:
    _, samples = await scrape(svc)
    return value(samples, "tenantry_pool_connections", pool="service", state=state) == expected
