"""Tenant storage: where a tenant's files live.  The default backend is a directory per
tenant under the data folder; another backend (an object-store prefix, a volume)
implements the same two idempotent calls."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Protocol

import anyio

from .. import logging as log


class Storage(Protocol):
    async def ensure(self, tenant_id: uuid.UUID) -> str:
        """Create the tenant's storage if missing; return where it is.  Idempotent."""
        ...

    async def remove(self, tenant_id: uuid.UUID) -> bool:
        """Remove the tenant's storage (compensation); False if there was none."""
        ...


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._log = log.get("storage")

    def path(self, tenant_id: uuid.UUID) -> Path:
        # The canonical uuid string: never a path fragment from input.
        return self.root / str(uuid.UUID(str(tenant_id)))

    async def ensure(self, tenant_id: uuid.UUID) -> str:
        path = self.path(tenant_id)
        await anyio.to_thread.run_sync(lambda: path.mkdir(mode=0o700, parents=True, exist_ok=True))
        self._log.info("storage_ready", tenant_id=str(tenant_id), path=str(path))
        return str(path)

    async def remove(self, tenant_id: uuid.UUID) -> bool:
        path = self.path(tenant_id)
        if not path.exists():
            return False
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))
        self._log.info("storage_removed", tenant_id=str(tenant_id), path=str(path))
        return True
