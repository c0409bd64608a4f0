"""Secrets that live in the data folder when no variable gives them (the embedded
default): created once, readable by the owner only, agreed on by processes that start
at the same moment."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def load_or_create(configured: str | None, path: Path) -> bytes:
    """`configured` when set (every process behind one load balancer must share it);
    otherwise the random secret kept at `path`, created on first use, so that a restart
    keeps what was signed or encrypted with it."""
    if configured:
        return configured.encode("utf-8")
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32).encode("ascii")
    # O_EXCL: two processes starting at once agree on whichever file was written first.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return secret
