"""SQL lives in .sql files: named blocks in this folder's files, `migrations/` numbered files.

The one loader of SQL text: every `*.sql` here (queries.sql for the queue, cache.sql for
the result cache, ops.sql for the readings) is read once, and a block is found by its
name alone, so names are unique across the files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

_BLOCK = re.compile(r"^-- ([a-z0-9_]+) --\n", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# A migration's header may say which older code still runs against its schema.
_COMPATIBLE = re.compile(r"^-- compatible_with: (\d+)$", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def compatible_with(self) -> int | None:
        """The oldest code version (its number of migrations) that can run against this
        migration's schema, from its `-- compatible_with: N` line; None: only its own."""
        m = _COMPATIBLE.search(self.sql)
        return int(m[1]) if m else None


def parse_blocks(text: str) -> dict[str, str]:
    """Split a file of `-- name --` blocks into {name: sql}; text before the first is a header."""
    parts = _BLOCK.split(text)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


@cache
def queries() -> dict[str, str]:
    """Every named block of every .sql file here, read once."""
    found: dict[str, str] = {}
    files = sorted(resources.files(__package__).iterdir(), key=lambda entry: entry.name)
    for entry in files:
        if not entry.name.endswith(".sql"):
            continue
        blocks = parse_blocks(entry.read_text("utf-8"))
        twice = found.keys() & blocks.keys()
        if twice:
            raise RuntimeError(f"{entry.name}: SQL blocks named twice: {sorted(twice)}")
        found.update(blocks)
    return found


def query(name: str) -> str:
    """The SQL of the block `-- name --`."""
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
