"""Fixtures shared by the modules that run the whole service in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tenantry.app import Service


@pytest.fixture
async def http(svc: Service) -> AsyncIterator[aiohttp.ClientSession]:
    """A client of the module's `svc` (each module starts it with its own settings)."""
    async with aiohttp.ClientSession(f"http://127.0.0.1:{svc.http.port}") as session:
        yield session
