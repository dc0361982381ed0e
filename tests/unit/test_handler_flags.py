"""--handler: given twice, both kinds run; a malformed entry is refused with the other
flags (exit 2), not when a worker boots (exit 3)."""

from __future__ import annotations

import pytest
from genworker.cli.main import main, make_parser, settings_from_args


def settings_of(*argv: str):  # type: ignore[no-untyped-def]
    return settings_from_args(make_parser().parse_args(["config", *argv]))[0]


def test_two_handler_flags_keep_both() -> None:
    s = settings_of("--handler", "a=pkg.mod:fa", "--handler", "b=pkg.mod:fb,c=pkg.mod:fc")
    assert s.handlers == ("a=pkg.mod:fa", "b=pkg.mod:fb", "c=pkg.mod:fc")


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("garbage", "write kind=pkg.module:func"),
        ("Video=pkg.mod:f", "bad handler kind 'Video'"),
        ("video=not a target", "is not pkg.module:func"),
        ("video=pkg.mod", "is not pkg.module:func"),
    ],
)
def test_a_malformed_handler_is_a_usage_error(
    entry: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "--handler", entry]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--handler" in err[0]
    assert words in err[0]
