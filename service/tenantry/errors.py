"""Typed errors, mapped once at the edge (HTTP problem JSON, job outcome, CLI exit)."""

from __future__ import annotations


class TenantryError(Exception):
    """Base class for errors the service raises on purpose."""


class Invalid(TenantryError):
    """Bad input: names the field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InvalidRequest(TenantryError):
    """Bad input in several fields at once: each is named (HTTP 422)."""

    def __init__(self, errors: list[Invalid]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


class NotFound(TenantryError):
    """What was asked for does not exist (or is another tenant's)."""


class Conflict(TenantryError):
    """The operation collides with another: a version another writer already took, a
    job whose lease this worker lost, an id that names more than one row."""


class NoDatabase(TenantryError):
    """A command that needs an existing database found none where it looked."""


class ConfigError(TenantryError):
    """A bad configuration value, reported once at startup."""


class StartupError(TenantryError):
    """A component could not start (the port is taken, ...)."""


class InsecureRole(TenantryError):
    """The service's login could bypass row-level security."""


class TenantContextError(TenantryError):
    """An operation for one tenant was given a transaction of another (or of none)."""


class Unauthorized(TenantryError):
    """Missing or invalid credentials."""


class SchemaMismatch(TenantryError):
    """The database schema is behind or ahead of the code."""


class MigrationBlocked(TenantryError):
    """A migration gave up waiting for a lock that a long transaction holds."""


# --- job outcomes a handler may raise -------------------------------------------------


class Snooze(Exception):
    """Run the job again after `delay` seconds without using an attempt."""

    # About ten years: beyond, a datetime cannot hold the date, and it is a mistake.
    MAX_DELAY = 315_360_000.0

    def __init__(self, delay: float) -> None:
        if not 0 <= delay <= self.MAX_DELAY:  # NaN fails this too
            raise ValueError(f"snooze delay must be 0 to {self.MAX_DELAY:g} seconds, not {delay}")
        super().__init__(f"snoozed for {delay}s")
        self.delay = delay


class PermanentFailure(Exception):
    """The job can never succeed: dead-letter it now, without retries."""


class Cancel(Exception):
    """The job is no longer wanted (the order was voided, the tenant left): raise it
    from a handler to stop at once, without retries.  The job moves to the dead jobs
    with reason `cancelled` (an operator can still see or retry it), and the kind's
    `on_dead` hook runs, as for any death."""
