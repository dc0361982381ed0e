"""The README's configuration reference is generated from the Settings declarations; this
test fails when they drift. Run this file with Python to rewrite the table."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from genworker.config import FIELDS, display_value, env_name, flag_name
from genworker.queue.client import TaskInfo

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- settings-reference -->", "<!-- /settings-reference -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_table() -> str:
    rows = ["| setting | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for name, f in FIELDS.items():
        default = f.default if not callable(f.default_factory) else f.default_factory()
        shown = display_value(name, default) or "-"
        rows.append(
            f"| `{name}` | `{flag_name(name)}` | `{env_name(name)}` | `{_cell(shown)}` "
            f"| {_cell(f.metadata['help'])} |"
        )
    return "\n".join(rows)


def _current(text: str) -> str:
    m = re.search(rf"{re.escape(START)}\n(.*?)\n{re.escape(END)}", text, re.S)
    assert m, f"README.md lacks the {START} ... {END} block"
    return m[1]


def test_the_configuration_reference_matches_the_settings() -> None:
    assert _current(README.read_text()) == reference_table(), (
        "README.md's settings table is out of date: run `python tests/unit/test_readme.py`"
    )


def test_every_task_field_is_documented() -> None:
    section = README.read_text().split("## JSON output", 1)[1]
    fields = set(TaskInfo.__dataclass_fields__) | {"remaining"}
    missing = sorted(f for f in fields if f"`{f}`" not in section)
    assert not missing, f"README's JSON output section lacks {missing}"


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(text.replace(_current(text), reference_table(), 1))
    sys.stdout.write("README.md: settings table rewritten\n")
