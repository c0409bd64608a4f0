"""What a sign-up is made of: the validated request, the onboarding as stored, and
the provisioning steps in order."""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from ..errors import Invalid, InvalidRequest
from ..tenants.store import PLANS, tenant_name

# The steps, in order; each commits on its own (see machine.py).
STEPS = ("tenant", "owner", "roles", "workspace", "storage", "welcome_email", "provisioned")
TERMINAL_STATES = ("completed", "failed")
AGGREGATE = "onboarding"

# Event types of the onboarding aggregate (the SSE `event:` field).
ACCEPTED = "onboarding.accepted"
STEP_DONE = "onboarding.step_completed"
COMPLETED = "onboarding.completed"
FAILED = "onboarding.failed"
TERMINAL_EVENTS = (COMPLETED, FAILED)
# The tenant aggregate's first event, for whoever follows tenants (webhooks).
TENANT_PROVISIONED = "tenant.provisioned"

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
EMAIL_MAX = 254
FIELDS = ("email", "tenant_name", "plan")


@dataclass(frozen=True)
class SignUp:
    email: str
    tenant_name: str
    plan: str

    def digest(self) -> bytes:
        """What an idempotent replay must match: the validated request, canonically."""
        body = orjson.dumps(
            {"email": self.email, "tenant_name": self.tenant_name, "plan": self.plan},
            option=orjson.OPT_SORT_KEYS,
        )
        return hashlib.sha256(body).digest()


def _missing_or_mistyped(field: str, value: Any) -> Invalid:
    return Invalid(field, "is required" if value is None else "must be a string")


def parse_sign_up(body: Any) -> SignUp:
    """Validate a request body; every field at fault is reported at once."""
    if not isinstance(body, dict):
        raise InvalidRequest([Invalid("", "the body must be a JSON object")])
    errors: list[Invalid] = [Invalid(str(k)[:50], "unknown field") for k in body if k not in FIELDS]
    email = body.get("email")
    if not isinstance(email, str):
        errors.append(_missing_or_mistyped("email", email))
    elif not email.strip():
        errors.append(Invalid("email", "is required"))
    else:
        email = email.strip()
        if len(email) > EMAIL_MAX:
            errors.append(Invalid("email", f"must be at most {EMAIL_MAX} characters"))
        elif _CONTROL.search(email) or not _EMAIL.match(email):
            errors.append(Invalid("email", "is not an email address"))
    name = body.get("tenant_name")
    if not isinstance(name, str):
        errors.append(_missing_or_mistyped("tenant_name", name))
    else:
        try:
            name = tenant_name(name, "tenant_name")
        except Invalid as exc:
            errors.append(exc)
    plan = body.get("plan")
    if plan not in PLANS:
        errors.append(Invalid("plan", f"must be one of {', '.join(repr(p) for p in PLANS)}"))
    if errors:
        raise InvalidRequest(errors)
    assert isinstance(email, str) and isinstance(name, str) and isinstance(plan, str)
    return SignUp(email, name, plan)


@dataclass(frozen=True)
class StepDone:
    step: str
    done_at: datetime


@dataclass(frozen=True)
class Onboarding:
    tenant_id: uuid.UUID
    id: uuid.UUID
    email: str
    tenant_name: str
    plan: str
    state: str
    version: int
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime
    steps: list[StepDone] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


def derived_id(onboarding_id: uuid.UUID, what: str) -> uuid.UUID:
    """The id of a row a step creates: the same on every retry of the step."""
    return uuid.uuid5(onboarding_id, what)


# Why an onboarding failed, for the person who signed up: a code a frontend can act on,
# the form field to correct (if any), and a sentence in plain language.  The technical
# cause (an SMTP reply, an error message) stays in `reason`, for operators.
FAILURE_CODES = ("email_rejected", "name_unavailable", "gave_up", "failed")


@dataclass(frozen=True)
class Failure:
    code: str
    field: str | None
    message: str


def explain_failure(code: str, email: str, tenant_name: str) -> Failure:
    """The plain-language side of a failure (`code` one of FAILURE_CODES)."""
    if code == "email_rejected":
        domain = email.rpartition("@")[2]
        return Failure(
            code,
            "email",
            f"The mail server of {domain} refused the address {email}, so the welcome"
            " email could not be delivered. Check the address and try again.",
        )
    if code == "name_unavailable":
        return Failure(
            code,
            "tenant_name",
            f"The organisation name \u201c{tenant_name}\u201d is not available."
            " Choose another name and try again.",
        )
    if code == "gave_up":
        return Failure(
            code,
            None,
            "Setting up your organisation did not finish in time. Nothing was kept;"
            " please try again in a few minutes.",
        )
    return Failure(
        "failed", None, "Setting up your organisation failed. Nothing was kept; please try again."
    )
