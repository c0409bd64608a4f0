"""Named SQL blocks, loaded once from the `.sql` file next to the module that owns them.

A file holds blocks introduced by `-- name: <name>` lines; everything up to the next
such line is the statement.  Keeping SQL in files keeps it reviewable and greppable,
and nothing is ever assembled from input.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


class Queries:
    def __init__(self, blocks: dict[str, str]) -> None:
        self._blocks = blocks

    def __getitem__(self, name: str) -> str:
        return self._blocks[name]

    def names(self) -> list[str]:
        return sorted(self._blocks)


def parse(text: str) -> dict[str, str]:
    parts = _NAME.split(text)
    blocks: dict[str, str] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in blocks:
            raise ValueError(f"duplicate SQL block name {name!r}")
        blocks[name] = body.strip()
    return blocks


@cache
def load(path: Path) -> Queries:
    return Queries(parse(path.read_text(encoding="utf-8")))


def queries_for(module_file: str, filename: str = "queries.sql") -> Queries:
    return load(Path(module_file).with_name(filename))
