"""Webhooks: tenants' endpoints, the fan-out from the outbox, signed delivery."""
