"""Pure logic of onboarding: request validation, status tokens, the rate limiter."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenantry.config import from_env
from tenantry.errors import ConfigError, InvalidRequest
from tenantry.http.ratelimit import RateLimiter, client_address, limit_key, parse_networks
from tenantry.onboarding.mail import masked
from tenantry.onboarding.model import SignUp, parse_sign_up
from tenantry.onboarding.tokens import Signer, TokenError, load_secret

SECRET = b"s" * 32
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def test_a_valid_sign_up_is_normalised() -> None:
    got = parse_sign_up({"email": " a@b.io ", "tenant_name": "  Big   Co ", "plan": "pro"})
    assert got == SignUp("a@b.io", "Big Co", "pro")
    # What idempotency compares: the validated request, not its spelling.
    assert (
        got.digest()
        == parse_sign_up({"plan": "pro", "tenant_name": "Big Co", "email": "a@b.io"}).digest()
    )
    assert got.digest() != SignUp("a@b.io", "Big Co", "free").digest()


@given(st.dictionaries(st.text(max_size=12), st.none() | st.integers() | st.text(max_size=60)))
def test_any_json_object_either_validates_or_names_its_fields(body: dict[str, object]) -> None:
    try:
        parse_sign_up(body)
    except InvalidRequest as exc:
        assert exc.errors and all(e.message for e in exc.errors)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"email": 123, "tenant_name": "Acme", "plan": "free"}, "email", "must be a string"),
        ({"tenant_name": "Acme", "plan": "free"}, "email", "is required"),
        (
            {"email": "a@b.io", "tenant_name": ["Acme"], "plan": "free"},
            "tenant_name",
            "must be a string",
        ),
        ({"email": "a@b.io", "plan": "free"}, "tenant_name", "is required"),
        ({"email": "a@b.io", "tenant_name": "x", "plan": "free"}, "tenant_name", "must be 3 to 50"),
    ],
)
def test_a_field_of_the_wrong_type_says_so(
    body: dict[str, object], field: str, message: str
) -> None:
    """Regression: `{"email": 123}` said "is required (a string)"."""
    with pytest.raises(InvalidRequest) as caught:
        parse_sign_up(body)
    [error] = [e for e in caught.value.errors if e.field == field]
    assert error.message.startswith(message)


def test_tokens_round_trip_and_are_stable() -> None:
    signer = Signer(SECRET, 3600)
    oid, tid = uuid.uuid4(), uuid.uuid4()
    token = signer.issue(oid, tid, T0)
    assert token == signer.issue(oid, tid, T0)  # issued for the same time: the same string
    grant = signer.verify(token, now=T0.timestamp() + 10)
    assert (grant.onboarding_id, grant.tenant_id) == (oid, tid)
    assert grant.expires_at == int(T0.timestamp()) + 3600


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: "",
        lambda t: "v2" + t[2:],
        lambda t: t.replace(".", "", 1),
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
        lambda t: t.split(".")[0] + ".!!!." + t.split(".")[2],
        lambda t: t + "x" * 300,
    ],
)
def test_a_mangled_token_is_refused(mangle: Callable[[str], str]) -> None:
    signer = Signer(SECRET, 3600)
    token = signer.issue(uuid.uuid4(), uuid.uuid4(), T0)
    with pytest.raises(TokenError):
        signer.verify(mangle(token), now=T0.timestamp())


def test_an_expired_or_foreign_keyed_token_is_refused() -> None:
    signer = Signer(SECRET, 60)
    token = signer.issue(uuid.uuid4(), uuid.uuid4(), T0)
    with pytest.raises(TokenError, match="expired"):
        signer.verify(token, now=T0.timestamp() + 60)
    with pytest.raises(TokenError, match="invalid"):
        Signer(b"t" * 32, 60).verify(token, now=T0.timestamp())
    with pytest.raises(ConfigError):
        Signer(b"short", 60)


def test_the_generated_secret_is_kept_and_private(tmp_path: Path) -> None:
    first = load_secret(None, tmp_path)
    assert load_secret(None, tmp_path) == first and len(first) >= 32
    assert (tmp_path / "token.secret").stat().st_mode & 0o077 == 0
    assert load_secret("configured-" + "z" * 30, tmp_path) == b"configured-" + b"z" * 30


def test_the_rate_limiter_allows_a_burst_then_the_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, now=lambda: now[0])
    assert [limiter.check("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("a") == pytest.approx(0.5)
    assert limiter.check("b") == 0.0  # per client
    now[0] = 0.5
    assert limiter.check("a") == 0.0
    assert RateLimiter.retry_after(0.2) == "1" and RateLimiter.retry_after(2.1) == "3"


def test_the_rate_limiter_forgets_the_oldest_clients_first() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=2, now=lambda: now[0])
    limiter.check("a")
    limiter.check("b")
    limiter.check("c")  # "a" is forgotten: it starts with a full bucket again
    assert limiter.check("a") == 0.0
    assert limiter.check("c") > 0


def test_only_the_canonical_spelling_of_a_token_is_accepted() -> None:
    signer = Signer(SECRET, 3600)
    token = signer.issue(uuid.uuid4(), uuid.uuid4(), T0)
    now = T0.timestamp()
    for variant in (token + "=", token + "==", token[:-1] + chr(ord(token[-1]) ^ 1), token + "é"):
        if variant == token:
            continue
        with pytest.raises(TokenError):
            signer.verify(variant, now=now)


@pytest.mark.parametrize(
    ("remote", "forwarded", "proxies", "client"),
    [
        ("203.0.113.9", None, "", "203.0.113.9"),
        # An untrusted peer's header is ignored: it could say anything.
        ("203.0.113.9", "1.2.3.4", "10.0.0.0/8", "203.0.113.9"),
        ("10.0.0.2", "198.51.100.7", "10.0.0.0/8", "198.51.100.7"),
        # The right-most hop that is not a trusted proxy; what the client prepended is not.
        ("10.0.0.2", "6.6.6.6, 198.51.100.7, 10.0.0.3", "10.0.0.0/8", "198.51.100.7"),
        ("10.0.0.2", "10.0.0.5", "10.0.0.0/8", "10.0.0.5"),
        ("::1", "2001:db8::1", "::1", "2001:db8::1"),
        (None, "1.2.3.4", "10.0.0.0/8", "unknown"),
    ],
)
def test_the_client_behind_trusted_proxies(
    remote: str | None, forwarded: str | None, proxies: str, client: str
) -> None:
    assert client_address(remote, forwarded, parse_networks(proxies)) == client


def test_a_bad_trusted_proxy_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="TENANTRY_TRUSTED_PROXIES"):
        from_env({"TENANTRY_TRUSTED_PROXIES": "10.0.0.0/8, not-a-network"})
    with pytest.raises(ConfigError) as caught:
        from_env({"TENANTRY_TOKEN_SECRET": "too-short-but-secret"})
    assert "too-short-but-secret" not in str(caught.value)


def test_logged_addresses_are_masked() -> None:
    assert masked("kim@example.com") == "k***@example.com"
    assert masked("not an address") == "***"


@pytest.mark.parametrize(
    ("address", "prefix", "key"),
    [
        ("203.0.113.7", 64, "203.0.113.7"),
        ("2001:db8:1:2:a::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),
        ("2001:db8:1:2:a::1", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:a::1", 128, "2001:db8:1:2:a::1/128"),
        ("::ffff:203.0.113.7", 64, "203.0.113.7"),
        ("unknown", 64, "unknown"),
    ],
)
def test_ipv6_clients_are_limited_by_their_network(address: str, prefix: int, key: str) -> None:
    """Regression: keyed on the full IPv6 address, 1,000 sign-ups from one /64 with
    distinct addresses were all accepted."""
    assert limit_key(address, prefix) == key


@pytest.mark.parametrize(
    ("name", "message"),
    [("ab\x01c", "must not contain control characters"), ("!!!", "a letter or a digit")],
)
def test_a_tenant_name_says_what_is_wrong_with_it(name: str, message: str) -> None:
    """Regression (review): a control character was reported as "must contain a letter
    or a digit"."""
    with pytest.raises(InvalidRequest) as caught:
        parse_sign_up({"email": "a@b.io", "tenant_name": name, "plan": "free"})
    assert message in caught.value.errors[0].message


@pytest.mark.parametrize("name", ["Москва", "株式会社", "Café Crème"])
def test_names_in_any_script_are_accepted(name: str) -> None:
    """Regression (review): names without an ASCII letter were refused."""
    assert (
        parse_sign_up({"email": "a@b.io", "tenant_name": name, "plan": "free"}).tenant_name == name
    )
