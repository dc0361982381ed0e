"""Text from outside reaches a terminal inert: every control character shown as an escape."""

from __future__ import annotations

from genworker.text import terminal_safe


def test_escape_sequences_and_bidi_overrides_are_shown_not_obeyed() -> None:
    hostile = "key\x1b]0;owned\x07\x1b[2J\r\nnext\x9b\u202eevil\x00"
    safe = terminal_safe(hostile)
    assert safe == "key\\x1b]0;owned\\x07\\x1b[2J\\x0d\\x0anext\\x9b\\u202eevil\\x00"
    assert safe.isprintable()


def test_plain_text_and_other_scripts_pass_unchanged() -> None:
    assert terminal_safe("a lighthouse — 灯台, café") == "a lighthouse — 灯台, café"


def test_a_cap_cuts_before_escaping() -> None:
    assert terminal_safe("x" * 10, 4) == "xxxx…"
