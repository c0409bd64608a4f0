"""Text that PostgreSQL and JSON accept, whatever a handler's error said.

An exception's message may hold what no text column takes: a NUL byte, or a lone
surrogate (Python's stand-in for an undecodable byte, as in a file name from
`os.listdir` on a non-UTF-8 disk).  PostgreSQL refuses both in text and jsonb, and
orjson refuses surrogates.  Written as they are, one such error made every batch of
outcomes fail; logged as it is, it made the logger raise.  Both become visible escapes
(`\\x00`, `\\udcff`), so that what the text said stays readable.
"""

from __future__ import annotations

from typing import Any


def safe_text(text: str) -> str:
    """`text` with NUL bytes and lone surrogates written as backslash escapes."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def safe_json(value: Any) -> Any:
    """`value` with every string in it (keys included) made safe by `safe_text`."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe_json(k) if isinstance(k, str) else k: safe_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [safe_json(v) for v in value]
    return value
