"""The job queue: enqueue in the caller's transaction, claim fairly, run, retry, bury."""

from __future__ import annotations

from ..errors import Cancel, PermanentFailure, Snooze
from .model import Job
from .queue import enqueue
from .registry import Policy, Registry

__all__ = ["Cancel", "Job", "PermanentFailure", "Policy", "Registry", "Snooze", "enqueue"]
