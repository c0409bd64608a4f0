"""structlog JSON on stdout, rendered with orjson.  Nothing else in the package logs.

Libraries log through the standard library (asyncpg's pool when it cannot reconnect,
aiohttp): their records are rendered the same way, one JSON object per line on stdout,
so that operators parse every line of it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

from .safetext import safe_json, safe_text

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Keys whose values must never reach a log line, wherever they are bound.
_SECRET_KEYS = frozenset({"password", "secret", "token", "authorization", "api_key", "dsn"})


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event.keys() & _SECRET_KEYS:
        event[key] = "[redacted]"
    return event


def _library(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A standard-library record: named after the library that wrote it."""
    record = event.get("_record")
    if record is not None:
        event["component"] = record.name
    return event


def _str(obj: Any) -> str:
    return safe_text(str(obj))


def _dumps(obj: Any, default: Any = None) -> str:
    try:
        return orjson.dumps(obj, default=default or str).decode()
    except orjson.JSONEncodeError:
        # A lone surrogate somewhere (an error message about an undecodable file name):
        # the line is still written, with the surrogate escaped, rather than the
        # logger raising and the line, and the error it reports, being lost.
        return orjson.dumps(safe_json(obj), default=_str).decode()


_debug = False


def debug_enabled() -> bool:
    """Whether debug lines are written: lets hot paths skip building them at all."""
    return _debug


def configure(level: str = "info") -> None:
    global _debug  # noqa: PLW0603 - one process-wide logging setup
    _debug = _LEVELS[level] <= logging.DEBUG
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    render: list[Any] = [
        _redact,
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(serializer=_dumps),
    ]
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, _library],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries' own chatter stays out below a warning, whatever our level.
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    structlog.configure(
        processors=[*shared, *render],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )


Logger = structlog.stdlib.BoundLogger


def get(component: str, **bound: Any) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(component=component, **bound)
    return logger
