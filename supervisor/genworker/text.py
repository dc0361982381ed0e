"""Text from outside (prompts, keys, tenant names, provider errors) made safe to print.

A terminal acts on control characters: an escape sequence in an idempotency key can
rewrite the screen, move the cursor or set the window title. Before such text reaches
a terminal its control characters (C0, DEL, C1) and bidirectional overrides are shown
as escapes instead, so it stays one inert line.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_safe(text: str, cap: int | None = None) -> str:
    """`text` with every control character shown as an escape, cut to `cap` characters
    (with an ellipsis) when given."""
    if cap is not None and len(text) > cap:
        text = text[:cap] + "…"
    return _UNSAFE.sub(_escape, text)
