"""Status tokens: a signed, expiring grant to read one onboarding, and nothing else.

`v1.<payload>.<mac>`, base64url without padding; the payload is the onboarding id, its
tenant id and the expiry (unix seconds), 40 bytes; the MAC is HMAC-SHA256 over
"v1." + payload.  The expiry is `ttl` after the time the token is issued for: the
onboarding's creation for the sign-up's answer, the moment of the replay for an
idempotent replay's (which must not hand out a token already expired).  Issued for the
same time, a token is the same string.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..errors import ConfigError
from ..secretfile import load_or_create

_PREFIX = b"v1."
_PAYLOAD = struct.Struct(">16s16sq")
_MIN_SECRET = 32


class TokenError(Exception):
    """Missing, malformed, forged or expired: the HTTP edge answers 401."""


@dataclass(frozen=True)
class Grant:
    onboarding_id: uuid.UUID
    tenant_id: uuid.UUID
    expires_at: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode("ascii") + b"=" * (-len(text) % 4))


class Signer:
    def __init__(self, secret: bytes, ttl_seconds: int) -> None:
        if len(secret) < _MIN_SECRET:
            raise ConfigError(f"TENANTRY_TOKEN_SECRET must be at least {_MIN_SECRET} bytes")
        self._key = secret
        self.ttl = ttl_seconds

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, _PREFIX + payload, hashlib.sha256).digest()

    def expiry(self, issued_at: datetime) -> int:
        return int(issued_at.timestamp()) + self.ttl

    def issue(self, onboarding_id: uuid.UUID, tenant_id: uuid.UUID, issued_at: datetime) -> str:
        payload = _PAYLOAD.pack(onboarding_id.bytes, tenant_id.bytes, self.expiry(issued_at))
        return f"v1.{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(self, token: str, now: float | None = None) -> Grant:
        version, _, rest = token.partition(".")
        body, _, mac = rest.partition(".")
        if version != "v1" or not body or not mac or len(token) > 200:
            raise TokenError("malformed token")
        try:
            payload, given = _unb64(body), _unb64(mac)
        except ValueError:
            raise TokenError("malformed token") from None
        # The decoder forgives stray padding and unused trailing bits: insist on the one
        # canonical spelling, so a grant has exactly one token string.
        if _b64(payload) != body or _b64(given) != mac:
            raise TokenError("malformed token")
        if len(payload) != _PAYLOAD.size or not hmac.compare_digest(given, self._mac(payload)):
            raise TokenError("invalid token")
        onboarding, tenant, expires_at = _PAYLOAD.unpack(payload)
        if (time.time() if now is None else now) >= expires_at:
            raise TokenError("token expired")
        return Grant(uuid.UUID(bytes=onboarding), uuid.UUID(bytes=tenant), expires_at)


def load_secret(configured: str | None, data_dir: Path) -> bytes:
    """TENANTRY_TOKEN_SECRET when set; otherwise a random secret kept in the data folder,
    so that a restart does not invalidate the tokens browsers hold."""
    return load_or_create(configured, data_dir / "token.secret")
