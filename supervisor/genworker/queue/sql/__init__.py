"""SQL lives in .sql files: `queries.sql` holds named blocks, `migrations/` numbered files."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

_BLOCK = re.compile(r"^-- ([a-z0-9_]+) --\n", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def parse_blocks(text: str) -> dict[str, str]:
    """Split a file of `-- name --` blocks into {name: sql}; text before the first is a header."""
    parts = _BLOCK.split(text)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


@cache
def queries() -> dict[str, str]:
    return parse_blocks((resources.files(__package__) / "queries.sql").read_text("utf-8"))


def query(name: str) -> str:
    return queries()[name]


@cache
def migrations() -> tuple[Migration, ...]:
    found = []
    for entry in (resources.files(__package__) / "migrations").iterdir():
        m = _MIGRATION.match(entry.name)
        if m:
            found.append(Migration(int(m[1]), m[2], entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration files are not numbered 1..n without gaps: {versions}")
    return tuple(found)
