"""The running service against its own OpenAPI document: Schemathesis fuzzes the real
`tenantry run` process, every operation (stateless: examples, boundary values, random
valid and invalid requests) and the links between them (stateful: register a webhook
endpoint, then read, change, test, rotate, recover and delete it; sign up, then follow
the onboarding).  A failure is a response that is a 5xx; that the document does not
describe (its status, media type, body or headers); a request the document calls
invalid that is accepted; a method a path does not document that is not a 405 with
`Allow`; an operation that needs a key answering without one; a resource missing after
its creation or present after its deletion; or a 4xx that wrote to the database
(tests/acceptance/contract_hooks.py).

The process runs without a worker (TENANTRY_WORKER=false): no job is claimed, no
webhook delivered, so every write to the database comes from a request, which is what
the "no write on a 4xx" check needs; and its webhook guard resolves every host name to
loopback without DNS (tests/acceptance/offline_tenantry.py).  The run is derandomized
(Schemathesis' deterministic mode), one request at a time: the same cases every run.
`TENANTRY_CONTRACT_FUZZ_EXAMPLES` sets how many per operation (a longer hunt)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import asyncpg
import pytest

from tenantry.tenants import store
from tests.acceptance import fingerprint
from tests.acceptance.process import ROOT, ServiceProcess
from tests.helpers import TEST_SECRET_KEY, TEST_TOKEN_SECRET

# Cases per operation and phase: with the coverage phase's boundary values and the
# stateful scenarios, about 2,600 cases, 30 to 60 s on two cores.
MAX_EXAMPLES = int(os.environ.get("TENANTRY_CONTRACT_FUZZ_EXAMPLES", "100"))
STATEFUL_STEPS = 12

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    # After a DELETE the resource is gone; after a create it is there (stateful).
    "use_after_free",
    "ensure_resource_availability",
    # A method the document does not list at a path is refused with 405 and Allow.
    "unsupported_method",
    "allow_header_conformance",
    # Operations that need a key refuse a request without one.
    "ignored_auth",
    # A request the document calls invalid is refused (the limits it states are real).
    "negative_data_rejection",
    "no_write_on_4xx",  # ours: contract_hooks.py
)


def config(api_key: str) -> str:
    checks = "\n".join(f"[checks.{name}]\nenabled = true" for name in CHECKS)
    return f"""\
hooks = "tests.acceptance.contract_hooks"
workers = 1
request-timeout = 10
# An event stream is read up to its first event (the replay sends it at once).
max-stream-events = 1
continue-on-failure = true

# Nothing kept from one run for the next (failures it would replay first, examples it
# would start from): every run is the same run.
[cache]
enabled = false

[generation]
deterministic = true
database = "none"
max-examples = {MAX_EXAMPLES}
# A failure is reported as found, with the request that reproduces it: shrinking it
# would cost more requests than the whole run.
no-shrink = true

[phases.stateful]
max-steps = {STATEFUL_STEPS}

[checks]
enabled = false
{checks}

[auth.openapi.ApiKey]
bearer = "{api_key}"
"""


@pytest.mark.timeout(300)
async def test_the_running_service_keeps_its_contract(database_url: str, tmp_path: Path) -> None:
    admin = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        tenant = (await store.create_tenant(admin, name="Contract Fuzz Ltd")).id
        api_key = (await store.create_key(admin, tenant)).secret
    finally:
        await admin.close()
    svc = await ServiceProcess.start_command(
        [sys.executable, "-m", "tests.acceptance.offline_tenantry"],
        ROOT,
        database_url,
        TENANTRY_DATA_DIR=str(tmp_path / "data"),
        TENANTRY_WORKER="false",
        TENANTRY_LOG_LEVEL="info",
        TENANTRY_TOKEN_SECRET=TEST_TOKEN_SECRET,
        TENANTRY_SECRET_KEY=TEST_SECRET_KEY,
        TENANTRY_SIGNUP_RATE="10000",
        TENANTRY_SIGNUP_BURST="10000",
        TENANTRY_WEBHOOK_ALLOW_NETWORKS="127.0.0.0/8,::1/128",
        TENANTRY_WEBHOOK_ALLOW_HTTP="true",
    )
    fuzz: asyncio.subprocess.Process | None = None
    try:
        port = await svc.started()
        cfg = tmp_path / "schemathesis.toml"
        cfg.write_text(config(api_key))
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(cfg),
            "run",
            f"http://127.0.0.1:{port}/openapi.json",
        ]
        fuzz = await asyncio.create_subprocess_exec(
            *command,
            cwd=ROOT,
            env={**os.environ, "TENANTRY_FUZZ_ADMIN_URL": database_url, "NO_COLOR": "1"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await fuzz.communicate()
        output = out.decode(errors="replace")
    finally:
        if fuzz is not None and fuzz.returncode is None:  # the test timed out
            fuzz.kill()
            await fuzz.wait()
        await svc.kill()
    figures = re.search(r"Test cases:\s*(\d+) generated, (.*)", output)
    assert figures is not None, output[-20_000:]
    generated = int(figures[1])
    # The run's figures, shown with -s and kept in CI's log of a verbose run.
    print(  # noqa: T201
        f"\ncontract fuzz ({MAX_EXAMPLES} examples per operation and phase, derandomized):"
        f" {generated} cases generated, {figures[2]}"
    )
    assert fuzz.returncode == 0, output[-20_000:]
    # A configuration that stopped testing (a phase off, an operation filtered out)
    # would pass with few cases.  (Past a few hundred examples an operation has no new
    # ones: the number stops growing with MAX_EXAMPLES.)
    assert generated >= min(9 * MAX_EXAMPLES, 1_000), output[-20_000:]


async def test_the_fingerprint_sees_every_kind_of_write(database_url: str) -> None:
    """What "no write on a 4xx" relies on: an insert, an update and a delete each change
    the fingerprint, and reading changes nothing."""
    conn = await asyncpg.connect(database_url)
    try:
        statement = await fingerprint.query(conn)
        tenant = (await store.create_tenant(conn, name="Fingerprint Ltd")).id
        start = await fingerprint.fingerprint(conn, statement)
        await store.get_tenant(conn, tenant)
        assert fingerprint.changed(start, await fingerprint.fingerprint(conn, statement)) == []
        key = await store.create_key(conn, tenant)
        inserted = await fingerprint.fingerprint(conn, statement)
        assert fingerprint.changed(start, inserted) == ["api_keys"]
        await conn.execute("UPDATE tenantry.tenants SET name = 'Renamed' WHERE id = $1", tenant)
        updated = await fingerprint.fingerprint(conn, statement)
        assert fingerprint.changed(inserted, updated) == ["tenants"]
        await conn.execute("DELETE FROM tenantry.api_keys WHERE id = $1", key.id)
        deleted = await fingerprint.fingerprint(conn, statement)
        assert fingerprint.changed(updated, deleted) == ["api_keys"]
    finally:
        await conn.close()
