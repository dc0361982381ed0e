"""docs/provider-contract.md's table says what contract.MODELS says, row by row."""

from __future__ import annotations

import re
from pathlib import Path

from genworker.contract import MODELS, ModelContract

DOC = Path(__file__).parents[2] / "docs" / "provider-contract.md"


def row(m: ModelContract) -> str:
    options = "; ".join(
        f"{name}: {values.start}-{values.stop - 1}"
        if isinstance(values, range)
        else f"{name}: {', '.join(values)}"
        for name, values in m.options.items()
    )
    formats = ", ".join(m.response_formats) or "refused (always b64_json)"
    n = "1" if m.n_max == 1 else f"1-{m.n_max}"
    return (
        f"| `{m.name}` | {', '.join(m.sizes)} | {m.max_prompt_chars} | {n} | {options} "
        f"| {formats} | {'yes' if m.usage else 'no'} |"
    )


def test_the_table_in_the_docs_is_the_table_in_the_code() -> None:
    text = DOC.read_text()
    table = re.search(r"<!-- contract-table -->\n(.*?)<!-- /contract-table -->", text, re.S)
    assert table, "docs/provider-contract.md has no contract table"
    rows = [line for line in table[1].splitlines() if line.startswith("| `")]
    assert rows == [row(m) for m in MODELS.values()]
