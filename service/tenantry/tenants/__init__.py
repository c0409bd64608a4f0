"""Tenants and their API keys; the tenant-owned tables onboarding provisions."""
