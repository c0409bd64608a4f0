"""The HTTP contract: the OpenAPI 3.1 document of every public route, served at
`GET /openapi.json` and rendered at `GET /docs`.

Written by hand beside the handlers it describes.  The limits it states (lengths,
ranges, patterns, enums) are taken from the constants the handlers themselves enforce,
so a limit changed there cannot leave the document behind; what JSON Schema cannot say
(a name's length after its whitespace is collapsed, a header name reserved whatever its
case) the descriptions say.  Two tests hold it to the truth: `tests/integration/
test_openapi.py` compares its paths and methods with the routes of the app `tenantry
run` builds, and `tests/acceptance/test_contract_fuzz.py` runs Schemathesis against the
real process, failing on any response the document does not describe.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import orjson

from .. import __version__
from ..onboarding.model import (
    ACCEPTED,
    COMPLETED,
    EMAIL_MAX,
    FAILED,
    FAILURE_CODES,
    STEP_DONE,
    STEPS,
)
from ..onboarding.model import FIELDS as SIGN_UP_FIELDS
from ..tenants.store import NAME_MAX, NAME_MIN, PLANS
from ..webhooks import deliveries, secrets
from ..webhooks import model as endpoint_model
from . import onboarding_api, webhooks_api

Json = dict[str, Any]

EVENT_TYPES = (ACCEPTED, STEP_DONE, COMPLETED, FAILED)

UUID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
# Every time the API gives out (timefmt.utc_text): UTC, microseconds, `Z`.
TIME_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z$"
# Python's whitespace (str.isspace, str.strip, and `\s` in its patterns), spelled out:
# `\s` in a JSON Schema pattern is ECMA-262's, which differs (U+0085, U+001C-U+001F).
WHITESPACE = "\\t-\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
# onboarding.model's check of an email address, once whitespace around it is removed:
# none inside it, nor control characters.
_EMAIL_CHAR = f"[^@{WHITESPACE}\\x00-\\x1f\\x7f]"
EMAIL_PATTERN = (
    f"^[{WHITESPACE}]*{_EMAIL_CHAR}+@{_EMAIL_CHAR}+\\.[^@.{WHITESPACE}\\x00-\\x1f\\x7f]+"
    f"[{WHITESPACE}]*$"
)
# What access.request_log keeps of a client's X-Request-ID (else it makes one up, 32
# hex digits, which this also matches).
REQUEST_ID_PATTERN = "^[A-Za-z0-9._:/+=-]{1,128}$"


def _ref(kind: str, name: str) -> Json:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> Json:
    return _ref("schemas", name)


def _nullable(schema: Json) -> Json:
    return {"anyOf": [schema, {"type": "null"}]}


def _time() -> Json:
    return {"type": "string", "format": "date-time", "pattern": TIME_PATTERN}


def _object(properties: Json, required: list[str] | None = None, **extra: Any) -> Json:
    """An object with exactly these properties (answers are held to it: a field the
    service adds without documenting it fails the contract fuzz)."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


def _case_insensitive(name: str) -> str:
    """A regex matching the header name `name` (letters, digits, `-`: nothing to escape)
    in any case: JSON Schema patterns have no `i` flag."""
    assert re.fullmatch("[A-Za-z0-9-]+", name), name
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in name)


def _base64_pattern(low: int, high: int) -> str:
    """Standard base64 (padded) of `low` to `high` bytes, exactly: full groups of four
    characters (3 bytes each), then optionally a group of 2 bytes (`xxx=`) or 1 (`xx==`)."""
    char = "[A-Za-z0-9+/]"
    full = -(-low // 3), high // 3  # groups when the length is a multiple of 3

    def groups(tail_bytes: int) -> str:
        least = -(-(low - tail_bytes) // 3)
        most = (high - tail_bytes) // 3
        return f"(?:{char}{{4}}){{{least},{most}}}"

    return (
        f"(?:(?:{char}{{4}}){{{full[0]},{full[1]}}}"
        f"|{groups(2)}{char}{{3}}="
        f"|{groups(1)}{char}{{2}}==)"
    )


# --- headers ----------------------------------------------------------------------------

HEADERS: Json = {
    "X-Request-ID": {
        "description": "The request's id: the client's `X-Request-ID` when it is plain"
        " enough to log (1-128 of letters, digits and `._:/+=-`), else one the service"
        " made up. Every log line about the request, and every job and event it starts,"
        " carries it.",
        "required": True,
        "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
    },
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
    },
    "WWW-Authenticate": {
        "description": "The Bearer challenge (RFC 6750).",
        "required": True,
        "schema": {"type": "string", "pattern": '^Bearer realm="[a-z]+"$'},
    },
}


def _headers(*names: str, **more: Json) -> Json:
    """X-Request-ID (every answer carries it) and the named headers."""
    return {
        "X-Request-ID": _ref("headers", "X-Request-ID"),
        **{n: _ref("headers", n) for n in names},
        **more,
    }


# --- problems ---------------------------------------------------------------------------

_PROBLEMS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    # name: (status, description, headers)
    "BadRequest": (400, "The request cannot be read.", ()),
    "Unauthorized": (
        401,
        "No credentials, or credentials that are malformed, unknown, revoked or expired"
        " (one answer for all of them).",
        ("WWW-Authenticate",),
    ),
    "Forbidden": (403, "The credentials are valid but not for this resource.", ()),
    "NotFound": (404, "There is no such resource (or it is another tenant's).", ()),
    "Conflict": (409, "The request collides with the resource's state.", ()),
    "ContentTooLarge": (413, "The body is larger than the operation accepts.", ()),
    "UnsupportedMediaType": (415, "The body is not `application/json` (or `+json`).", ()),
    "UnprocessableContent": (
        422,
        "Fields are invalid: `errors` names each, with a JSON pointer into the body (or"
        " the query parameter's name).",
        (),
    ),
    "TooManyRequests": (
        429,
        "Over the client's rate: wait as `Retry-After` says.",
        ("Retry-After",),
    ),
    "InternalError": (
        500,
        "A fault of the service (a bug): no internals are said; the traceback is logged.",
        (),
    ),
    "ServiceUnavailable": (
        503,
        "The database is unavailable at the moment (a restart, a cut connection): the same"
        " request can succeed after `Retry-After` seconds.",
        ("Retry-After",),
    ),
}


def _problem_response(status: int, description: str, headers: tuple[str, ...]) -> Json:
    schema: Json = {
        "allOf": [_schema("Problem")],
        "properties": {"status": {"const": status}},
    }
    if status == 422:
        schema["required"] = ["errors"]
    return {
        "description": description,
        "headers": _headers(*headers),
        "content": {"application/problem+json": {"schema": schema}},
    }


def _errors(*names: str, **described: str) -> Json:
    """Responses by status from the shared problems; `described` overrides a problem's
    description for this operation (`NotFound="..."`).  Every operation can answer 500."""
    out: Json = {}
    for name in (*names, *described, "InternalError"):
        status = _PROBLEMS[name][0]
        response = _ref("responses", name)
        if name in described:
            response["description"] = described[name]
        out[str(status)] = response
    return out


# --- schemas ----------------------------------------------------------------------------


def _schemas() -> Json:
    field_error = _object(
        {
            "field": {
                "type": "string",
                "description": "The body's field, the header or the query parameter at"
                " fault; empty when the body as a whole is.",
            },
            "pointer": {
                "type": "string",
                "description": "A JSON pointer to the field in the body (`#/email`).",
            },
            "detail": {"type": "string"},
        },
        required=["field", "detail"],
    )
    problem = _object(
        {
            "type": {
                "type": "string",
                "const": "about:blank",
                "description": "The problem's kind: always `about:blank` (the status says it).",
            },
            "title": {"type": "string", "description": "The status's phrase."},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string", "description": "What went wrong, for a person."},
            "errors": {
                "type": "array",
                "minItems": 1,
                "items": _schema("FieldError"),
                "description": "One entry per field at fault.",
            },
        },
        required=["type", "title", "status", "detail"],
        description="RFC 9457 problem details: every error this service answers.",
    )
    tenant = _object(
        {
            "id": {"type": "string", "format": "uuid"},
            "slug": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,48}[a-z0-9])?$"},
            "name": {"type": "string"},
            "plan": {"type": "string", "enum": list(PLANS)},
            "state": {"type": "string", "enum": ["provisioning", "active", "suspended"]},
            "created_at": _time(),
        }
    )
    sign_up = _object(
        {
            "email": {
                "type": "string",
                "maxLength": EMAIL_MAX,
                "pattern": EMAIL_PATTERN,
                "description": f"An email address (at most {EMAIL_MAX} characters once"
                " surrounding whitespace is removed, no control characters). The welcome"
                " email goes there.",
                "examples": ["ada@example.com"],
            },
            "tenant_name": {
                "type": "string",
                "minLength": NAME_MIN,
                "maxLength": NAME_MAX,
                "pattern": "^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f]*$",
                "description": f"The organisation's name: {NAME_MIN} to {NAME_MAX} characters"
                " once runs of whitespace are made one space, a letter or a digit (of any"
                " script) among them, no control characters.",
                "examples": ["Analytical Engines"],
            },
            "plan": {"type": "string", "enum": list(PLANS)},
        },
        required=list(SIGN_UP_FIELDS),
    )
    accepted = _object(
        {
            "id": {"type": "string", "format": "uuid", "pattern": UUID_PATTERN},
            "tenant_id": {"type": "string", "format": "uuid"},
            "state": {
                "type": "string",
                "enum": ["accepted", "provisioning", "completed", "failed"],
                "description": "`accepted` for a new sign-up; for a replay (the same"
                " `Idempotency-Key` and body), the onboarding's state now.",
            },
            "status_url": {"type": "string", "description": "`/v1/onboardings/{id}`"},
            "events_url": {
                "type": "string",
                "description": "The event stream's URL, the token in its query (for"
                " EventSource, which cannot send headers).",
            },
            "token": {
                "type": "string",
                "description": "The status token: Bearer (or `?token=`) for the status and"
                " the events of this onboarding. A replay issues a new one, valid from"
                " the replay on.",
            },
            "token_expires_at": _time(),
        }
    )
    onboarding = _object(
        {
            "id": {"type": "string", "format": "uuid"},
            "tenant_id": {"type": "string", "format": "uuid"},
            "state": {
                "type": "string",
                "enum": ["accepted", "provisioning", "completed", "failed"],
            },
            "version": {
                "type": "integer",
                "minimum": 1,
                "description": "The number of the onboarding's last event (its stream's id).",
            },
            "tenant_name": {"type": "string"},
            "plan": {"type": "string", "enum": list(PLANS)},
            "steps": {
                "type": "array",
                "items": _object(
                    {"step": {"type": "string", "enum": list(STEPS)}, "done_at": _time()}
                ),
                "description": "The provisioning steps done so far, in order.",
            },
            "failure_reason": {
                **_nullable({"type": "string"}),
                "description": "Why it failed (set when `state` is `failed`).",
            },
            "created_at": _time(),
            "updated_at": _time(),
        }
    )
    steps = {"type": "string", "enum": list(STEPS)}
    event_payload = {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": list(EVENT_TYPES)},
            "version": {"type": "integer", "minimum": 1},
            "at": {**_time(), "description": "When the event was committed."},
            "state": onboarding["properties"]["state"],
            "request_id": {
                "type": "string",
                "description": "The sign-up request's X-Request-ID.",
            },
            "step": steps,
            "done_at": _time(),
            "steps_done": {"type": "integer", "minimum": 1},
            "steps_total": {"type": "integer", "const": len(STEPS)},
            "code": {"type": "string", "enum": list(FAILURE_CODES)},
            "field": {
                **_nullable({"type": "string", "enum": ["email", "tenant_name"]}),
                "description": "The form field to correct, if any.",
            },
            "message": {"type": "string", "description": "For the person who signed up."},
            "reason": {"type": "string", "description": "The technical cause, for operators."},
            "failed_step": _nullable(steps),
            "undone": {
                "type": "array",
                "items": steps,
                "description": "The steps done before the failure whose effects were removed.",
            },
            "compensated": {
                "type": "array",
                "items": {"type": "string", "enum": ["tenant", "storage"]},
                "description": "What was removed.",
            },
        },
        "required": ["type", "version", "at", "state"],
        "additionalProperties": False,
    }
    sse_event = _object(
        {
            "id": {
                "type": "string",
                "pattern": "^[1-9][0-9]*$",
                "description": "The onboarding's version after the event: a `Last-Event-ID`.",
            },
            "event": {"type": "string", "enum": list(EVENT_TYPES)},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": event_payload,
                "description": "The event's payload, JSON on one line.",
            },
            "retry": {"type": "integer"},
        },
        required=["id", "event", "data"],
        description="One server-sent event of an onboarding's stream. Steps carry `step`,"
        " `done_at`, `steps_done` and `steps_total`; a failure `code`, `field`, `message`,"
        " `reason`, `failed_step`, `undone` and `compensated`.",
    )
    headers_object = {
        "type": "object",
        "maxProperties": endpoint_model.HEADERS_MAX,
        "propertyNames": {
            "pattern": "^" + endpoint_model.HEADER_NAME.pattern + "$",
            "not": {
                "anyOf": [
                    {"pattern": f"^{_case_insensitive(n)}$"}
                    for n in sorted(endpoint_model.RESERVED_HEADERS)
                ]
                + [{"pattern": f"^{_case_insensitive('webhook-')}"}]
            },
        },
        "additionalProperties": {
            "type": "string",
            "maxLength": endpoint_model.HEADER_VALUE_MAX,
            "pattern": "^[^\\x00-\\x1f\\x7f]*$",
        },
        "description": "Extra request headers sent with every delivery: not the ones the"
        " delivery sets itself (`webhook-*`, `Content-Type`, `User-Agent`, `Host` and the"
        " like, in any case), each name once whatever its case. Their values show as"
        " `[redacted]` in the attempt log.",
    }
    event_types = {
        "type": "array",
        "maxItems": endpoint_model.EVENT_TYPES_MAX,
        "items": {
            "type": "string",
            "pattern": "^(?:" + endpoint_model.EVENT_TYPE.pattern + ")$",
        },
        "description": "Exact event types and prefixes (`invoice.*`); `*`, or none, for"
        " every event. Repeats are dropped.",
        "examples": [["onboarding.completed", "invoice.*"]],
    }
    schedule = {
        "type": "array",
        "minItems": 1,
        "maxItems": 30,
        "items": {"type": "integer", "minimum": 0, "maximum": 7 * 86400},
        "description": "Seconds before each attempt (each but the first with ±20% jitter);"
        " after the last the delivery is dead. Null: the service's schedule.",
    }
    secret = {
        "type": "string",
        "pattern": "^"
        + re.escape(secrets.PREFIX)
        + _base64_pattern(secrets.MIN_BYTES, secrets.MAX_BYTES)
        + "$",
        "description": f"`{secrets.PREFIX}` and the standard base64 of {secrets.MIN_BYTES}"
        f" to {secrets.MAX_BYTES} random bytes (Standard Webhooks).",
    }
    settable: Json = {
        "url": {
            "type": "string",
            "minLength": 1,
            "maxLength": 2000,
            # Not `format: uri`: a host name in any script is accepted as it is (an IRI).
            "pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s\x00-\x1f\x7f]+$",
            "description": "`https://` (`http://` too where the service allows it:"
            " TENANTRY_WEBHOOK_ALLOW_HTTP), no user name or password, no `#fragment`, a"
            " host name of labels of at most 63 characters (in any script) that resolves"
            " to public addresses only (or to networks the service allows).",
            "examples": ["https://hooks.example.com/tenantry"],
        },
        "event_types": event_types,
        "description": {
            "type": "string",
            "maxLength": endpoint_model.DESCRIPTION_MAX,
            "pattern": "^[^\\x00]*$",
        },
        "headers": headers_object,
        "rate_limit": {
            **_nullable(
                {"type": "integer", "minimum": 1, "maximum": endpoint_model.RATE_LIMIT_MAX}
            ),
            "description": "Deliveries per second at most (a whole number); null: no limit.",
        },
        "timeout_seconds": {
            **_nullable({"type": "integer", "minimum": 1, "maximum": endpoint_model.TIMEOUT_MAX}),
            "description": "Seconds for one attempt (a whole number); null: the service's.",
        },
        "retry_schedule": _nullable(schedule),
    }
    endpoint_create = _object(
        {
            **settable,
            "secret": {
                **_nullable(_schema("WebhookSecret")),
                "description": "The signing secret; generated when absent or null.",
            },
        },
        required=["url"],
    )
    endpoint_patch = _object(
        {
            **settable,
            "enabled": {
                "type": "boolean",
                "description": "`true` re-enables a disabled endpoint, with a closed circuit.",
            },
        },
        required=[],
        description="The fields to change; the others stay as they are.",
    )
    endpoint_fields: Json = {
        "id": {"type": "string", "format": "uuid"},
        "url": {"type": "string"},
        "description": {"type": "string"},
        "event_types": {"type": "array", "items": {"type": "string"}},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "rate_limit": _nullable({"type": "integer"}),
        "timeout_seconds": _nullable({"type": "integer"}),
        "retry_schedule": _nullable({"type": "array", "items": {"type": "integer"}}),
        "enabled": {"type": "boolean"},
        "disabled_reason": _nullable({"type": "string"}),
        "disabled_at": _nullable(_time()),
        "circuit": _object(
            {
                "state": {"type": "string", "enum": ["closed", "open", "half_open"]},
                "consecutive_failures": {"type": "integer", "minimum": 0},
                "opened_at": _nullable(_time()),
                "retry_at": _nullable(_time()),
            }
        ),
        "last_success_at": _nullable(_time()),
        "failing_since": _nullable(_time()),
        "previous_secret_expires_at": {
            **_nullable(_time()),
            "description": "Until when the secret before the last rotation still signs.",
        },
        "created_at": _time(),
        "updated_at": _time(),
    }
    # (A schema with `additionalProperties: false` cannot be extended with allOf: each
    # variant lists its fields whole.)
    endpoint = _object(endpoint_fields, description="An endpoint, never its secret.")
    with_secret = _object(
        {
            **endpoint_fields,
            "secret": {
                **_schema("WebhookSecret"),
                "description": "The signing secret: shown only here and on rotation.",
            },
        },
        description="An endpoint with its signing secret.",
    )
    history_entry = _object(
        {
            "type": {
                "type": "string",
                "enum": [
                    "webhook.endpoint.disabled",
                    "webhook.endpoint.circuit_opened",
                    "webhook.endpoint.circuit_closed",
                ],
            },
            "at": _time(),
            "circuit": _nullable({"type": "string"}),
            "consecutive_failures": _nullable({"type": "integer"}),
            "reason": _nullable({"type": "string"}),
        }
    )
    endpoint_detail = _object(
        {
            **endpoint_fields,
            "history": {
                "type": "array",
                "items": history_entry,
                "description": "The circuit's changes and the disabling, oldest first.",
            },
        },
        description="An endpoint with its history, never its secret.",
    )
    delivery_fields: Json = {
        "id": {"type": "string", "format": "uuid"},
        "webhook_id": {
            "type": "string",
            "pattern": "^msg_[0-9a-f]{32}$",
            "description": "The `webhook-id` every attempt is sent with.",
        },
        "endpoint_id": {"type": "string", "format": "uuid"},
        "event_id": {"type": "integer"},
        "event_type": {"type": "string"},
        "state": {"type": "string", "enum": list(deliveries.STATES)},
        "attempts": {"type": "integer", "minimum": 0},
        "next_attempt_at": _nullable(_time()),
        "last_status": _nullable({"type": "integer"}),
        "last_error": _nullable({"type": "string"}),
        "reason": _nullable({"type": "string"}),
        "created_at": _time(),
        "updated_at": _time(),
        "finished_at": _nullable(_time()),
    }
    delivery = _object(delivery_fields)
    attempt = _object(
        {
            "attempt": {"type": "integer", "minimum": 1},
            "attempted_at": _time(),
            "url": {"type": "string"},
            "result": {
                "type": "string",
                "enum": ["delivered", "failed", "gone", "aborted", "refused", "interrupted"],
            },
            "request": _object(
                {
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "body": {"type": "string"},
                }
            ),
            "response": _nullable(
                _object(
                    {
                        "status": {"type": "integer"},
                        "headers": _nullable(
                            {"type": "object", "additionalProperties": {"type": "string"}}
                        ),
                        "body": _nullable({"type": "string"}),
                    }
                )
            ),
            "duration_ms": {"type": "number", "minimum": 0},
            "error_class": _nullable(
                {
                    "type": "string",
                    "enum": [
                        "timeout",
                        "dns",
                        "connect",
                        "tls",
                        "reset",
                        "protocol",
                        "refused",
                        "secret",
                        "interrupted",
                        "internal",
                    ],
                }
            ),
            "error": _nullable({"type": "string"}),
        }
    )
    delivery_detail = _object(
        {
            **delivery_fields,
            "body": {"type": "string", "description": "The body as signed and sent."},
            "attempt_log": {
                "type": "array",
                "items": attempt,
                "description": "Every attempt on record, oldest first.",
            },
        }
    )
    readiness = _object(
        {
            "status": {"type": "string", "enum": ["ready", "not ready"]},
            "checks": {
                "type": "object",
                "additionalProperties": {"type": "boolean"},
                "description": "Each check by name: `running`, `database`, `listener`,"
                " `migrations`; true when fine.",
            },
            "problems": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "What components report they cannot do right now, by name.",
            },
        }
    )
    return {
        "Problem": problem,
        "FieldError": field_error,
        "Tenant": tenant,
        "SignUp": sign_up,
        "OnboardingAccepted": accepted,
        "OnboardingEvent": sse_event,
        "Onboarding": onboarding,
        "WebhookSecret": secret,
        "WebhookEndpointCreate": endpoint_create,
        "WebhookEndpointPatch": endpoint_patch,
        "WebhookEndpoint": endpoint,
        "WebhookEndpointWithSecret": with_secret,
        "WebhookEndpointDetail": endpoint_detail,
        "WebhookDelivery": delivery,
        "WebhookDeliveryDetail": delivery_detail,
        "Readiness": readiness,
    }


# --- operations -------------------------------------------------------------------------


def _json(schema: Json) -> Json:
    return {"application/json": {"schema": schema}}


def _ok(description: str, schema: Json, status: str = "200", **headers: Json) -> Json:
    return {
        status: {
            "description": description,
            "headers": _headers(**headers),
            "content": _json(schema),
        }
    }


def _body(schema: Json, max_bytes: int, *, required: bool = True) -> Json:
    return {
        "required": required,
        "description": f"JSON (`application/json` or another `+json` type), at most"
        f" {max_bytes // 1024} KiB; it may be sent compressed (`Content-Encoding` gzip,"
        " deflate or br).",
        "content": _json(schema),
    }


def _path_id(what: str) -> Json:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "description": f"The {what}'s id (a UUID; anything else is a 404 like an unknown id).",
        "schema": {"type": "string", "format": "uuid"},
    }


_REQUEST_ID_PARAM = _ref("parameters", "X-Request-ID")
_TENANT_SECURITY: list[Json] = [{"ApiKey": []}]
# The status token travels as a Bearer or in `?token=` (EventSource sends no headers).
_STATUS_SECURITY: list[Json] = [{"StatusToken": []}, {}]
_BODY_ERRORS = ("BadRequest", "ContentTooLarge", "UnsupportedMediaType", "UnprocessableContent")


def _operation(
    operation_id: str,
    summary: str,
    tag: str,
    responses: Json,
    *,
    description: str | None = None,
    parameters: list[Json] | None = None,
    body: Json | None = None,
    security: list[Json] | None = None,
) -> Json:
    op: Json = {"operationId": operation_id, "summary": summary, "tags": [tag]}
    if description:
        op["description"] = description
    op["parameters"] = [*(parameters or []), _REQUEST_ID_PARAM]
    if body is not None:
        op["requestBody"] = body
    if security is not None:
        op["security"] = security
    op["responses"] = responses
    return op


def _endpoint_link(operation_id: str, description: str) -> Json:
    return {
        "operationId": operation_id,
        "parameters": {"path.id": "$response.body#/id"},
        "description": description,
    }


def _paths() -> Json:
    endpoint_links = {
        "GetEndpoint": _endpoint_link("getWebhookEndpoint", "Read the endpoint made."),
        "UpdateEndpoint": _endpoint_link("updateWebhookEndpoint", "Change it."),
        "DeleteEndpoint": _endpoint_link("deleteWebhookEndpoint", "Delete it."),
        "RotateSecret": _endpoint_link("rotateWebhookEndpointSecret", "Rotate its secret."),
        "TestEndpoint": _endpoint_link("testWebhookEndpoint", "Send it a test event."),
        "RecoverDeliveries": _endpoint_link(
            "recoverWebhookDeliveries", "Send its failed deliveries again."
        ),
        "ListItsDeliveries": {
            "operationId": "listWebhookDeliveries",
            "parameters": {"query.endpoint_id": "$response.body#/id"},
            "description": "Its deliveries.",
        },
    }
    delivery_links = {
        "GetDelivery": {
            "operationId": "getWebhookDelivery",
            "parameters": {"path.id": "$response.body#/delivery_id"},
            "description": "The test event's delivery.",
        },
        "ReplayDelivery": {
            "operationId": "replayWebhookDelivery",
            "parameters": {"path.id": "$response.body#/delivery_id"},
            "description": "Send it again.",
        },
    }
    accepted_201 = _ok(
        "The endpoint, with its signing secret.",
        _schema("WebhookEndpointWithSecret"),
        "201",
        Location={
            "description": "`/v1/webhook-endpoints/{id}`",
            "required": True,
            "schema": {"type": "string"},
        },
    )
    accepted_201["201"]["links"] = endpoint_links
    test_202 = _ok(
        "The test event was appended; its delivery is on its way.",
        _object(
            {
                "delivery_id": {"type": "string", "format": "uuid"},
                "event_id": {"type": "integer"},
                "delivery_url": {"type": "string"},
            }
        ),
        "202",
    )
    test_202["202"]["links"] = delivery_links
    sign_up_202 = _ok(
        "Accepted: provisioning runs as a job. The same `Idempotency-Key` and body again"
        " get the same onboarding (`id`, `tenant_id`, URLs), with `Idempotent-Replayed:"
        " true`, its `state` now and a new status token valid from then on.",
        _schema("OnboardingAccepted"),
        "202",
        Location={
            "description": "The status URL, `/v1/onboardings/{id}`.",
            "required": True,
            "schema": {"type": "string"},
        },
        **{
            "Idempotent-Replayed": {
                "description": "`true` when this is the answer to an earlier request with"
                " the same key and body.",
                "schema": {"type": "string", "const": "true"},
            }
        },
    )
    sign_up_202["202"]["links"] = {
        "GetOnboarding": {
            "operationId": "getOnboarding",
            "parameters": {"path.id": "$response.body#/id", "query.token": "$response.body#/token"},
            "description": "Follow the onboarding with its status token.",
        },
        "StreamEvents": {
            "operationId": "streamOnboardingEvents",
            "parameters": {"path.id": "$response.body#/id", "query.token": "$response.body#/token"},
            "description": "Follow its events.",
        },
    }
    onboarding_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "The onboarding's id, as `status_url` gives it (a lower-case UUID;"
        " any other form is a 404).",
        "schema": {"type": "string", "format": "uuid", "pattern": UUID_PATTERN},
    }
    token_query = {
        "name": "token",
        "in": "query",
        "required": False,
        "description": "The status token, for clients that cannot send headers (EventSource)."
        " With an `Authorization: Bearer` as well, both must be the same token (else 400).",
        "schema": {"type": "string"},
    }
    status_errors = _errors(
        "Forbidden",
        BadRequest="The `Authorization` header and `?token=` name different tokens.",
        Unauthorized="No status token, or one that is malformed, forged or expired.",
        NotFound="No onboarding has this id (or the id is not a lower-case UUID).",
    )
    # Read with whitespace around it removed (str.strip).
    event_id = {"type": "string", "pattern": f"^[{WHITESPACE}]*[0-9]{{1,9}}[{WHITESPACE}]*$"}

    return {
        "/healthz": {
            "get": _operation(
                "getHealth",
                "Liveness",
                "Operations",
                {
                    **_ok(
                        "The process runs.", _object({"status": {"type": "string", "const": "ok"}})
                    ),
                    **_errors(),
                },
                description="`200` while the process runs; it never reads the database.",
                security=[],
            )
        },
        "/readyz": {
            "get": _operation(
                "getReadiness",
                "Readiness",
                "Operations",
                {
                    **_ok(
                        "Ready: every check passes and no component reports a problem.",
                        _schema("Readiness"),
                    ),
                    "503": {
                        "description": "Not ready (stopping, the database or the listener"
                        " away, migrations behind, a component reporting a problem): `checks`"
                        " and `problems` say which.",
                        "headers": _headers(),
                        "content": _json(_schema("Readiness")),
                    },
                    **_errors(),
                },
                security=[],
            )
        },
        "/metrics": {
            "get": _operation(
                "getMetrics",
                "Prometheus metrics",
                "Operations",
                {
                    "200": {
                        "description": "This process's metrics in the Prometheus text format"
                        " (version 0.0.4).  With TENANTRY_METRICS_PORT set they are served"
                        " on that port instead, and this port answers 404.",
                        "headers": _headers(),
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(),
                },
                security=[],
            )
        },
        "/openapi.json": {
            "get": _operation(
                "getOpenApiDocument",
                "This document",
                "Operations",
                {**_ok("The OpenAPI 3.1 document of this API.", {"type": "object"}), **_errors()},
                security=[],
            )
        },
        "/v1/onboardings": {
            "post": _operation(
                "createOnboarding",
                "Sign up: start an onboarding",
                "Onboarding",
                {
                    **sign_up_202,
                    **_errors(
                        "Conflict",
                        "ContentTooLarge",
                        "UnsupportedMediaType",
                        "UnprocessableContent",
                        "TooManyRequests",
                        "ServiceUnavailable",
                        BadRequest="The body is not JSON (or cannot be read), or the"
                        " `Idempotency-Key` is not 1 to 255 printable ASCII characters.",
                        Conflict="The `Idempotency-Key` was used with another body.",
                    ),
                },
                description="One transaction: the onboarding, its first event and the"
                " provisioning job. Rate-limited per client address (IPv6: per network).",
                parameters=[
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "Makes a retry safe: the same key and body get the"
                        " same onboarding. Use a random UUID.",
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": onboarding_api.IDEMPOTENCY_KEY_MAX,
                            "pattern": "^[\\x20-\\x7e]+$",
                        },
                    }
                ],
                body=_body(_schema("SignUp"), onboarding_api.MAX_BODY),
                security=[],
            )
        },
        "/v1/onboardings/{id}": {
            "get": _operation(
                "getOnboarding",
                "An onboarding's state and steps",
                "Onboarding",
                {
                    **_ok("The onboarding.", _schema("Onboarding")),
                    **status_errors,
                    **_errors("ServiceUnavailable"),
                },
                parameters=[onboarding_id, token_query],
                security=_STATUS_SECURITY,
            )
        },
        "/v1/onboardings/{id}/events": {
            "get": _operation(
                "streamOnboardingEvents",
                "An onboarding's events, live (server-sent events)",
                "Onboarding",
                {
                    "200": {
                        "description": "A `text/event-stream`: `retry:` first, then each"
                        " event after `Last-Event-ID` (`id:` its version, `event:` its type,"
                        " `data:` its JSON payload with `type`, `version` and `at`), then the"
                        " live ones, with keepalive comments; it ends after the terminal"
                        " event (`onboarding.completed` or `onboarding.failed`). A failure"
                        f" carries `code` ({', '.join(FAILURE_CODES)}), `field`, `message`,"
                        " `reason`, `failed_step`, `undone` and `compensated`. While the"
                        " database is unavailable the stream is answered all the same and"
                        " waits for it.",
                        "headers": _headers(
                            **{
                                "Cache-Control": {
                                    "required": True,
                                    "schema": {"type": "string", "const": "no-cache"},
                                }
                            }
                        ),
                        # Before OpenAPI 3.2 (`itemSchema`), an event stream's schema
                        # describes each event.
                        "content": {"text/event-stream": {"schema": _schema("OnboardingEvent")}},
                    },
                    "204": {
                        "description": "The stream had ended: `Last-Event-ID` is its terminal"
                        " event (an EventSource stops reconnecting).",
                        "headers": _headers(),
                    },
                    **status_errors,
                    "400": {
                        "$ref": "#/components/responses/BadRequest",
                        "description": "`Last-Event-ID` is not a non-negative integer, or not"
                        " an id of this stream; or the `Authorization` header and `?token=`"
                        " name different tokens.",
                    },
                },
                parameters=[
                    onboarding_id,
                    token_query,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "Resume after this event (the last `id:` received).",
                        "schema": event_id,
                    },
                    {
                        "name": "last_event_id",
                        "in": "query",
                        "required": False,
                        "description": "As `Last-Event-ID`, for a first connect (the header"
                        " wins when both are sent).",
                        "schema": event_id,
                    },
                ],
                security=_STATUS_SECURITY,
            )
        },
        "/v1/tenant": {
            "get": _operation(
                "getTenant",
                "The API key's tenant",
                "Tenant",
                {
                    **_ok("The tenant.", _schema("Tenant")),
                    **_errors("Unauthorized", "NotFound", "ServiceUnavailable"),
                },
                security=_TENANT_SECURITY,
            )
        },
        "/v1/webhook-endpoints": {
            "post": _operation(
                "createWebhookEndpoint",
                "Register a webhook endpoint",
                "Webhooks",
                {
                    **accepted_201,
                    **_errors(
                        *_BODY_ERRORS,
                        "Unauthorized",
                        "ServiceUnavailable",
                        Conflict="The tenant has as many endpoints as it may"
                        " (TENANTRY_WEBHOOK_MAX_ENDPOINTS).",
                    ),
                },
                body=_body(_schema("WebhookEndpointCreate"), webhooks_api.MAX_BODY),
                security=_TENANT_SECURITY,
            ),
            "get": _operation(
                "listWebhookEndpoints",
                "The tenant's webhook endpoints",
                "Webhooks",
                {
                    **_ok(
                        "Every endpoint, oldest first.",
                        _object({"data": {"type": "array", "items": _schema("WebhookEndpoint")}}),
                    ),
                    **_errors("Unauthorized", "ServiceUnavailable"),
                },
                security=_TENANT_SECURITY,
            ),
        },
        "/v1/webhook-endpoints/{id}": {
            "get": _operation(
                "getWebhookEndpoint",
                "A webhook endpoint, with its history",
                "Webhooks",
                {
                    **_ok("The endpoint.", _schema("WebhookEndpointDetail")),
                    **_errors("Unauthorized", "NotFound", "ServiceUnavailable"),
                },
                parameters=[_path_id("endpoint")],
                security=_TENANT_SECURITY,
            ),
            "patch": _operation(
                "updateWebhookEndpoint",
                "Change a webhook endpoint",
                "Webhooks",
                {
                    **_ok("The endpoint as changed.", _schema("WebhookEndpoint")),
                    **_errors(*_BODY_ERRORS, "Unauthorized", "NotFound", "ServiceUnavailable"),
                },
                parameters=[_path_id("endpoint")],
                body=_body(_schema("WebhookEndpointPatch"), webhooks_api.MAX_BODY),
                security=_TENANT_SECURITY,
            ),
            "delete": _operation(
                "deleteWebhookEndpoint",
                "Delete a webhook endpoint",
                "Webhooks",
                {
                    **_ok(
                        "Deleted; its waiting deliveries were cancelled (reason"
                        " `endpoint_deleted`).",
                        _object(
                            {
                                "id": {"type": "string", "format": "uuid"},
                                "deleted": {"type": "boolean", "const": True},
                                "cancelled_deliveries": {"type": "integer", "minimum": 0},
                            }
                        ),
                    ),
                    **_errors("Unauthorized", "NotFound", "ServiceUnavailable"),
                },
                parameters=[_path_id("endpoint")],
                security=_TENANT_SECURITY,
            ),
        },
        "/v1/webhook-endpoints/{id}/rotate-secret": {
            "post": _operation(
                "rotateWebhookEndpointSecret",
                "Rotate an endpoint's signing secret",
                "Webhooks",
                {
                    **_ok(
                        "The endpoint, with its new secret.", _schema("WebhookEndpointWithSecret")
                    ),
                    **_errors(*_BODY_ERRORS, "Unauthorized", "NotFound", "ServiceUnavailable"),
                },
                description="A new secret, generated unless the body gives one. The old"
                " secret keeps signing beside it for TENANTRY_WEBHOOK_ROTATION_GRACE; rotating"
                " again within it ends the older one's grace at once.",
                parameters=[_path_id("endpoint")],
                body=_body(
                    _object(
                        {
                            "secret": {
                                **_nullable(_schema("WebhookSecret")),
                                "description": "The new secret; generated when absent or null.",
                            }
                        },
                        required=[],
                    ),
                    webhooks_api.MAX_BODY,
                    required=False,
                ),
                security=_TENANT_SECURITY,
            )
        },
        "/v1/webhook-endpoints/{id}/test": {
            "post": _operation(
                "testWebhookEndpoint",
                "Send an endpoint a test event",
                "Webhooks",
                {
                    **test_202,
                    **_errors(
                        "Unauthorized",
                        "NotFound",
                        "ServiceUnavailable",
                        Conflict="The endpoint is disabled (enable it first).",
                    ),
                },
                description="Appends a `webhook.test` event for this endpoint only. A body,"
                " if any, is not read.",
                parameters=[_path_id("endpoint")],
                security=_TENANT_SECURITY,
            )
        },
        "/v1/webhook-endpoints/{id}/recover": {
            "post": _operation(
                "recoverWebhookDeliveries",
                "Send an endpoint's failed deliveries again",
                "Webhooks",
                {
                    **_ok(
                        "How many deliveries are sent again.",
                        _object(
                            {
                                "endpoint_id": {"type": "string", "format": "uuid"},
                                "replaying": {"type": "integer", "minimum": 0},
                            }
                        ),
                        "202",
                    ),
                    **_errors(*_BODY_ERRORS, "Unauthorized", "NotFound", "ServiceUnavailable"),
                },
                description="Every dead delivery of the endpoint created in the window, and"
                " every one waiting for a retry, is sent again now.",
                parameters=[_path_id("endpoint")],
                body=_body(
                    _object(
                        {
                            "since": {
                                "type": "string",
                                "format": "date-time",
                                "description": "RFC 3339, with its offset.",
                            },
                            "until": {
                                **_nullable({"type": "string", "format": "date-time"}),
                                "description": "RFC 3339, after `since`; none: now.",
                            },
                        },
                        required=["since"],
                    ),
                    webhooks_api.MAX_BODY,
                ),
                security=_TENANT_SECURITY,
            )
        },
        "/v1/webhook-deliveries": {
            "get": _operation(
                "listWebhookDeliveries",
                "The tenant's webhook deliveries",
                "Webhooks",
                {
                    **_ok(
                        "A page of deliveries, newest first.",
                        _object(
                            {
                                "data": {"type": "array", "items": _schema("WebhookDelivery")},
                                "next_cursor": {
                                    **_nullable({"type": "string"}),
                                    "description": "`?cursor=` of the next page; null at the end.",
                                },
                            }
                        ),
                    ),
                    **_errors(
                        "Unauthorized",
                        "ServiceUnavailable",
                        UnprocessableContent="A query parameter is invalid, or unknown (each"
                        " is named).",
                    ),
                },
                description="Query parameters other than these are refused (422).",
                parameters=[
                    {
                        "name": "endpoint_id",
                        "in": "query",
                        "schema": {"type": "string", "format": "uuid"},
                    },
                    {
                        "name": "event_type",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "pattern": "^" + endpoint_model.EVENT_TYPE_NAME.pattern + "$",
                        },
                    },
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(deliveries.STATES)},
                    },
                    {
                        "name": "since",
                        "in": "query",
                        "description": "Created at or after (RFC 3339, with its offset).",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                    {
                        "name": "until",
                        "in": "query",
                        "description": "Created before (RFC 3339, with its offset).",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "description": "Deliveries per page (default 50).",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": deliveries.PAGE_MAX,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "`next_cursor` of the page before.",
                        "schema": {"type": "string"},
                    },
                ],
                security=_TENANT_SECURITY,
            )
        },
        "/v1/webhook-deliveries/{id}": {
            "get": _operation(
                "getWebhookDelivery",
                "A delivery, its body and every attempt",
                "Webhooks",
                {
                    **_ok("The delivery.", _schema("WebhookDeliveryDetail")),
                    **_errors("Unauthorized", "NotFound", "ServiceUnavailable"),
                },
                parameters=[_path_id("delivery")],
                security=_TENANT_SECURITY,
            )
        },
        "/v1/webhook-deliveries/{id}/replay": {
            "post": _operation(
                "replayWebhookDelivery",
                "Send a finished delivery again",
                "Webhooks",
                {
                    **_ok(
                        "Sent again now, with a fresh schedule and the same `webhook-id`.",
                        _object(
                            {
                                "id": {"type": "string", "format": "uuid"},
                                "state": {"type": "string", "const": "pending"},
                                "replayed_at": _time(),
                            }
                        ),
                        "202",
                    ),
                    **_errors(
                        "Unauthorized",
                        "NotFound",
                        "ServiceUnavailable",
                        Conflict="The delivery is still pending or sending, or its endpoint"
                        " was deleted.",
                    ),
                },
                parameters=[_path_id("delivery")],
                security=_TENANT_SECURITY,
            )
        },
    }


_DESCRIPTION = """\
Tenantry's HTTP interface: liveness, readiness and metrics; sign-up (onboarding) with its
status and live events; and, with a tenant API key, the tenant and its webhooks.

Every error is `application/problem+json` (RFC 9457): `type`, `title`, `status`,
`detail`, and `errors` where fields are at fault. An unknown address is a `404`; a method
an address does not answer is a `405` with `Allow`. What the HTTP parser refuses before
a request reaches a route (a malformed request line or header, an unknown method, a line
over 8,190 bytes, a broken chunk, a body that cannot be decompressed) is a `400` problem.
While the database is unavailable, a request that needs it is answered `503` with
`Retry-After`. Every answer carries `X-Request-ID`. Every `GET` also answers `HEAD`.

Times are RFC 3339 in UTC with microseconds and `Z` (`2026-12-01T07:51:00.123456Z`).
"""


def _components() -> Json:
    return {
        "schemas": _schemas(),
        "responses": {
            name: _problem_response(status, description, headers)
            for name, (status, description, headers) in _PROBLEMS.items()
        },
        "headers": HEADERS,
        "parameters": {
            "X-Request-ID": {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": "Your id for the request (a proxy's, a trace's): kept when it"
                " is 1-128 of letters, digits and `._:/+=-`, else replaced by one of ours.",
                "schema": {"type": "string"},
            }
        },
        "securitySchemes": {
            "ApiKey": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "tnt_<tenant id, 32 hex digits>_<secret>",
                "description": "A tenant API key (`tenantry tenants key create`), as"
                " `Authorization: Bearer <key>`.",
            },
            "StatusToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "The status token a sign-up answers with (`token`), valid for"
                " that onboarding only, until `token_expires_at`. Also accepted as"
                " `?token=`.",
            },
        },
    }


@cache
def document() -> Json:
    """The OpenAPI document (built once; treat it as read-only)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tenantry",
            "version": __version__,
            "description": _DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "Onboarding", "description": "Sign up, and follow the provisioning."},
            {"name": "Tenant", "description": "The tenant an API key belongs to."},
            {"name": "Webhooks", "description": "Endpoints, deliveries and their attempts."},
            {"name": "Operations", "description": "Probes, metrics and this document."},
        ],
        "paths": _paths(),
        "components": _components(),
    }


@cache
def document_json() -> bytes:
    return orjson.dumps(document())
