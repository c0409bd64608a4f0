"""API keys: `tnt_<tenant id, 32 hex>_<secret, 43 url-safe base64>`.

The key names its tenant, so authenticating is a lookup inside that tenant's context
(row-level security applies to it like to anything else) instead of a search across
tenants.  Only SHA-256 of the secret is stored: the secret is 256 random bits, so a
fast hash is as good as a slow one, and a leaked table grants nothing.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass

_FORMAT = re.compile(r"^tnt_([0-9a-f]{32})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class ParsedKey:
    tenant_id: uuid.UUID
    secret_hash: bytes


def new_key(tenant_id: uuid.UUID) -> tuple[str, bytes]:
    """A fresh key and the hash to store."""
    secret = secrets.token_urlsafe(32)
    return f"tnt_{tenant_id.hex}_{secret}", hash_secret(secret)


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_key(raw: str) -> ParsedKey | None:
    """None when `raw` is not a key at all (never raises on input)."""
    match = _FORMAT.match(raw)
    if match is None:
        return None
    return ParsedKey(uuid.UUID(hex=match[1]), hash_secret(match[2]))
