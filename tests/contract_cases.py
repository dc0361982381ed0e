"""Options a model does not take, as (model, params, words of the message): checked by
`contract.option_problem` (tests/unit/test_contract.py) and, with the same messages, by
`genworker.submit_task` (tests/integration/test_queue_contract.py)."""

from __future__ import annotations

from typing import Any

REFUSED_OPTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("gpt-image-1", {"style": "vivid"}, "does not take it"),
    (
        "gpt-image-1",
        {"quality": "hd"},
        "Supported values are: 'low', 'medium', 'high', and 'auto'",
    ),
    ("dall-e-3", {"size": "1536x1024"}, "dall-e-3 takes 1024x1024, 1792x1024, 1024x1792"),
    ("flux-pro", {"quality": "high"}, "is not one genworker knows"),
    ("gpt-image-1", {"output_compression": "80"}, "Expected an integer from 0 to 100"),
]
