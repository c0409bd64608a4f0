"""Schemathesis hooks of the contract fuzz, loaded by `schemathesis run` (its
configuration names this module) in its own process: the check "no write on a 4xx".

A request the service refuses must leave the database as it was: before each call the
hook takes a fingerprint of every table (tests/acceptance/fingerprint.py), and after a
4xx the check takes another and fails on any difference, naming the tables.  Only the
requests write while the service is fuzzed (it runs without a worker, see
test_contract_fuzz.py), one at a time (one Schemathesis worker).

The database is the superuser's URL in TENANTRY_FUZZ_ADMIN_URL."""

from __future__ import annotations

import os
from typing import Any

import schemathesis

from tests.acceptance.fingerprint import Fingerprint, Fingerprinter, changed

_db: Fingerprinter | None = None
_before: dict[int, Fingerprint] = {}


def _database() -> Fingerprinter:
    global _db  # noqa: PLW0603 - one connection for the whole run, made on first use
    if _db is None:
        _db = Fingerprinter(os.environ["TENANTRY_FUZZ_ADMIN_URL"])
    return _db


@schemathesis.hook
def before_call(
    context: schemathesis.HookContext, case: schemathesis.Case[Any], **kwargs: Any
) -> None:
    _before[id(case)] = _database().fingerprint()


@schemathesis.check
def no_write_on_4xx(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> bool | None:
    """A request answered with a 4xx changed nothing in the database."""
    before = _before.pop(id(case), None)
    if before is None or not 400 <= response.status_code < 500:
        return None
    after = _database().fingerprint()
    tables = changed(before, after)
    if tables:
        raise AssertionError(
            f"answered {response.status_code}, yet wrote to {', '.join(tables)}"
            f" (rows and newest xmin before: { {t: before.get(t) for t in tables} },"
            f" after: { {t: after.get(t) for t in tables} })"
        )
    return True
