"""Secrets that live in the data folder when no variable gives them (the embedded
default): created once, readable by the owner only, agreed on by processes that start
at the same moment."""

from __future__ import annotations

import os
import secrets
import tempfile
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
    # Written whole under a name of its own, then linked into place: link() fails when
    # the name exists, so of processes starting at once the first link wins and every
    # other reads that file, never one half written (an empty file was read as a key).
    fd, tmp = tempfile.mkstemp(prefix=".secret-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_bytes().strip()
    finally:
        os.unlink(tmp)
    return secret
