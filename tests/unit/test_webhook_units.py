"""The webhooks' pure parts: the address guard, the retry policy, secrets, signatures."""

from __future__ import annotations

import base64
import ipaddress
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from tenantry import config
from tenantry.errors import ConfigError, Invalid, InvalidRequest
from tenantry.secretfile import load_or_create
from tenantry.webhooks import secrets
from tenantry.webhooks.guard import ForbiddenAddress, Guard, forbidden, parse_networks, url_host
from tenantry.webhooks.model import parse_endpoint
from tenantry.webhooks.policy import DEFAULT_SCHEDULE, decide, parse_schedule, retry_after_seconds
from tenantry.webhooks.secrets import SecretBox, SecretUnreadable
from tenantry.webhooks.signing import signature_header
from tests.helpers import FixedRandom

FORBIDDEN = [
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # carrier-grade NAT
    "0.0.0.0",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "198.18.0.1",
    "::",
    "::1",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "fec0::1",
    "2001:db8::1",
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_every_non_public_range_is_forbidden(address: str) -> None:
    assert forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert not forbidden(ipaddress.ip_address(address))


async def test_a_host_name_resolving_to_a_private_address_is_refused() -> None:
    async def lookup(host: str) -> list[str]:
        return {"inside.example": ["10.1.2.3"], "mixed.example": ["8.8.8.8", "127.0.0.1"]}[host]

    guard = Guard(lookup=lookup)
    for host in ("inside.example", "mixed.example"):  # one private answer is enough
        with pytest.raises(ForbiddenAddress):
            await guard.resolve(host)
        with pytest.raises(Invalid) as err:
            await guard.check_url(f"https://{host}/hook")
        assert err.value.field == "url"


async def test_allowed_networks_let_loopback_through_and_nothing_else() -> None:
    guard = Guard(parse_networks("127.0.0.0/8, ::1"))
    assert await guard.resolve("127.0.0.1") == [ipaddress.ip_address("127.0.0.1")]
    assert await guard.resolve("[::1]") == [ipaddress.ip_address("::1")]
    with pytest.raises(ForbiddenAddress):
        await guard.resolve("10.0.0.1")


async def test_the_resolver_answers_what_it_checked_each_time() -> None:
    """DNS rebinding: public at registration, private at delivery; the resolver the
    connector uses checks every lookup and hands the connector the checked address."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])

    async def lookup(host: str) -> list[str]:
        return next(answers)

    guard = Guard(lookup=lookup)
    await guard.check_url("https://rebind.example/hook")
    with pytest.raises(ForbiddenAddress):
        await guard.resolver().resolve("rebind.example", 443)


async def test_a_name_that_does_not_resolve_is_a_field_error() -> None:
    async def lookup(host: str) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(Invalid, match="does not resolve"):
        await Guard(lookup=lookup).check_url("https://nowhere.example/")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/", "http"),
        ("file:///etc/passwd", "http"),
        ("https://user:pw@example.com/", "user name"),
        ("https://user@example.com/", "user name"),
        ("https://example.com/#x", "fragment"),
        ("https:///path", "host"),
        ("https://exa mple.com/", "spaces"),
        ("https://example.com:0/", "port 0"),
        ("https://example.com:99999/", "valid URL"),
        ("", "http"),
    ],
)
def test_urls_webhooks_may_not_use(url: str, why: str) -> None:
    with pytest.raises(Invalid, match=why):
        url_host(url)


def test_plain_http_only_where_allowed() -> None:
    assert url_host("http://example.com/x", allow_http=True) == "example.com"
    with pytest.raises(Invalid, match="https"):
        url_host("http://example.com/x", allow_http=False)


NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _decide(attempts: int, status: int | None, **headers: str) -> tuple[str, str, float | None]:
    d = decide(
        attempts=attempts,
        schedule=(0, 10, 100),
        status=status,
        headers=headers,
        error_class=None if status is not None else "timeout",
        now=NOW,
        rng=FixedRandom(0.5),  # no jitter
    )
    delay = None if d.next_attempt_at is None else (d.next_attempt_at - NOW).total_seconds()
    return d.result, d.next_state, delay


def test_outcomes_are_classified_as_standard_webhooks_and_svix_do() -> None:
    assert _decide(1, 200) == ("delivered", "delivered", None)
    assert _decide(1, 299) == ("delivered", "delivered", None)
    assert _decide(1, 500) == ("failed", "pending", 10.0)
    assert _decide(2, 404) == ("failed", "pending", 100.0)
    assert _decide(3, 500) == ("failed", "dead", None)  # the schedule is used up
    assert _decide(1, None) == ("failed", "pending", 10.0)  # a timeout
    assert _decide(1, 302) == ("failed", "pending", 10.0)  # redirects are not followed
    assert _decide(1, 410) == ("gone", "pending", 10.0)  # parked: the endpoint is disabled
    assert _decide(1, 400, **{"webhook-delivery": "abort-message"}) == ("aborted", "dead", None)


def test_retry_after_is_clamped_to_the_schedule_and_twice_it() -> None:
    assert _decide(1, 429, **{"retry-after": "15"})[2] == 15.0
    assert _decide(1, 429, **{"retry-after": "1"})[2] == 10.0  # never sooner than scheduled
    assert _decide(1, 503, **{"retry-after": "3600"})[2] == 20.0  # at most twice it
    later = (NOW + timedelta(seconds=12)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert _decide(1, 503, **{"retry-after": later})[2] == 12.0
    assert _decide(1, 429, **{"retry-after": "soon"})[2] == 10.0
    assert _decide(1, 500, **{"retry-after": "15"})[2] == 10.0  # only for 429 and 503


def test_the_jitter_stays_within_twenty_percent() -> None:
    for r in (0.0, 0.25, 0.999):
        d = decide(
            attempts=2,
            schedule=DEFAULT_SCHEDULE,
            status=500,
            headers={},
            error_class=None,
            now=NOW,
            rng=FixedRandom(r),
        )
        assert d.next_attempt_at is not None
        delay = (d.next_attempt_at - NOW).total_seconds()
        assert 300 * 0.8 <= delay <= 300 * 1.2


def test_schedules_are_parsed_and_bounded() -> None:
    assert parse_schedule("0, 5,300") == (0, 5, 300)
    for bad in ("", "a,b", "-1", "0," * 31, "700000"):
        with pytest.raises(ValueError):
            parse_schedule(bad)


def test_secrets_have_the_standard_form_and_seal_to_their_endpoint() -> None:
    s = secrets.generate()
    assert s.startswith("whsec_") and len(secrets.key_bytes(s)) == 32
    for bad in ("abc", "whsec_", "whsec_!!!!", "whsec_" + base64.b64encode(b"x" * 10).decode()):
        with pytest.raises(Invalid):
            secrets.key_bytes(bad)
    box = SecretBox(b"k" * 32)
    t, e = uuid.uuid4(), uuid.uuid4()
    sealed = box.seal(t, e, s)
    assert s.encode() not in sealed and box.open(t, e, sealed) == s
    with pytest.raises(SecretUnreadable):
        box.open(t, uuid.uuid4(), sealed)  # moved to another endpoint's row
    with pytest.raises(SecretUnreadable):
        SecretBox(b"another key" * 4).open(t, e, sealed)


def test_signatures_verify_with_the_standardwebhooks_package() -> None:
    old, new = secrets.generate(), secrets.generate()
    body = b'{"type":"x"}'
    ts = int(datetime.now(UTC).timestamp())
    header = signature_header([secrets.key_bytes(new), secrets.key_bytes(old)], "msg_1", ts, body)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": header}
    assert Webhook(new).verify(body, headers) == {"type": "x"}
    assert Webhook(old).verify(body, headers) == {"type": "x"}


def test_processes_starting_together_agree_on_a_generated_secret(tmp_path: Path) -> None:
    """Regression: a second process read the key file between the first one's create
    and write, found it empty, and refused to start ('must be at least 32 bytes')."""
    for round_ in range(20):
        path = tmp_path / f"round{round_}" / "secret.key"
        with ThreadPoolExecutor(16) as pool:
            keys = list(pool.map(load_or_create, [None] * 16, [path] * 16))
        assert len(set(keys)) == 1 and len(keys[0]) == 64


def test_retry_after_that_is_no_number_is_ignored() -> None:
    for value in ("\u00b2", "\u2460", "١٢", "1.5", "-3", ""):  # superscript, circled, Arabic
        assert retry_after_seconds(value, NOW) is None, value
    assert _decide(1, 429, **{"retry-after": "\u00b2"})[2] == 10.0


@pytest.mark.parametrize(
    "name",
    [
        "TENANTRY_WEBHOOK_CONCURRENCY",
        "TENANTRY_WEBHOOK_ENDPOINT_CONCURRENCY",
        "TENANTRY_WEBHOOK_TENANT_CONCURRENCY",
    ],
)
def test_concurrency_settings_past_what_a_claim_takes_are_refused(name: str) -> None:
    """Regression (review): 3,000,000,000 was accepted, then every claim failed."""
    with pytest.raises(ConfigError, match=name):
        config.from_env({name: "3000000000"})
    assert getattr(config.from_env({name: "100000"}), name.removeprefix("TENANTRY_").lower())


def test_whole_numbers_are_read_as_json_numbers_whatever_their_spelling() -> None:
    """JSON has one number type: 49.0 is 49 (and JSON Schema's `integer`, which the
    OpenAPI document states, admits it), so a client whose encoder writes 49.0 is
    understood; a fraction, a boolean, infinity are not whole numbers."""
    spec = parse_endpoint(
        {
            "url": "https://hooks.example.com/x",
            "timeout_seconds": 49.0,
            "rate_limit": 184.0,
            "retry_schedule": [0.0, 5, 3e2],
        }
    )
    assert (spec.timeout_seconds, spec.rate_limit, spec.retry_schedule) == (49, 184, (0, 5, 300))
    assert type(spec.timeout_seconds) is int and type(spec.rate_limit) is int
    assert all(type(d) is int for d in spec.retry_schedule or ())
    for field, value in [
        ("timeout_seconds", 49.5),
        ("timeout_seconds", True),
        ("rate_limit", float("inf")),
        ("rate_limit", float("nan")),
        ("retry_schedule", [0.5]),
        ("retry_schedule", [False]),
        ("timeout_seconds", 61.0),
    ]:
        with pytest.raises(InvalidRequest) as caught:
            parse_endpoint({"url": "https://hooks.example.com/x", field: value})
        assert [e.field for e in caught.value.errors] == [field]
