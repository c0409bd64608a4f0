"""Tenantry: a Postgres-native backbone for multi-tenant SaaS background work."""

from __future__ import annotations

__version__ = "0.1.0"
