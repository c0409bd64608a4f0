"""Signing secrets: their Standard Webhooks form (`whsec_` + base64 of 24-64 random
bytes), and their encryption at rest.

A secret is stored sealed with AES-GCM under a key derived from TENANTRY_SECRET_KEY,
with the tenant and endpoint ids as associated data: a sealed secret copied onto
another endpoint's row (or another tenant's) does not open.  The key itself is never
stored in the database, so a dump of it reveals no secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import uuid

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import Invalid

PREFIX = "whsec_"
MIN_BYTES, MAX_BYTES = 24, 64
_GENERATED_BYTES = 32
_FORMAT = b"\x01"  # the sealed form's version: AES-256-GCM, 12-byte nonce
_NONCE = 12


def generate() -> str:
    """A new secret in Standard Webhooks form."""
    return PREFIX + base64.b64encode(os.urandom(_GENERATED_BYTES)).decode("ascii")


def key_bytes(secret: str, field: str = "secret") -> bytes:
    """The HMAC key a secret stands for; `Invalid` naming `field` unless it is
    `whsec_` + standard base64 of 24 to 64 bytes."""
    if not isinstance(secret, str) or not secret.startswith(PREFIX):
        raise Invalid(field, f"must start with {PREFIX} (Standard Webhooks form)")
    try:
        raw = base64.b64decode(secret[len(PREFIX) :].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise Invalid(field, f"must be {PREFIX} followed by standard base64") from None
    if not MIN_BYTES <= len(raw) <= MAX_BYTES:
        raise Invalid(field, f"must encode {MIN_BYTES} to {MAX_BYTES} random bytes, not {len(raw)}")
    return raw


class SecretBox:
    """Seals and opens signing secrets, each bound to its tenant and endpoint."""

    def __init__(self, key_material: bytes) -> None:
        # Whatever form the configured key has (hex, a passphrase), AES-256 wants 32
        # uniform bytes.
        self._aead = AESGCM(hashlib.sha256(b"tenantry webhook secrets\x00" + key_material).digest())

    @staticmethod
    def _bound_to(tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> bytes:
        return tenant_id.bytes + endpoint_id.bytes

    def seal(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, secret: str) -> bytes:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(
            nonce, secret.encode("ascii"), self._bound_to(tenant_id, endpoint_id)
        )
        return _FORMAT + nonce + sealed

    def open(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, sealed: bytes) -> str:
        """The secret; `SecretUnreadable` when the key differs from the one that sealed
        it (processes configured with different TENANTRY_SECRET_KEY values) or the row
        was tampered with."""
        if sealed[:1] != _FORMAT or len(sealed) < 1 + _NONCE + 16:
            raise SecretUnreadable("the stored secret is not in a known sealed form")
        try:
            plain = self._aead.decrypt(
                sealed[1 : 1 + _NONCE], sealed[1 + _NONCE :], self._bound_to(tenant_id, endpoint_id)
            )
        except InvalidTag:
            raise SecretUnreadable(
                "the stored secret does not open with this process's TENANTRY_SECRET_KEY"
            ) from None
        return plain.decode("ascii")


class SecretUnreadable(Exception):
    """A stored secret this process cannot decrypt (a key mismatch, or tampering)."""
