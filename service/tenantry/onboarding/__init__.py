"""Tenant onboarding: accept, provision, stream status."""
