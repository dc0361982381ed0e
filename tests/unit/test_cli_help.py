"""Each sub-command's --help lists the settings it uses, and only those."""

from __future__ import annotations

import pytest
from genworker.cli.main import make_parser


def help_of(command: str) -> str:
    parser = make_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()  # type: ignore[index]


def test_submit_does_not_offer_plans_which_only_start_and_migrate_write() -> None:
    assert "--plans" not in help_of("submit")
    assert "--plans" in help_of("start")
    assert "--plans" in help_of("migrate")


@pytest.mark.parametrize("command", ["start", "submit", "status", "migrate", "prune"])
def test_every_flag_shows_its_environment_variable(command: str) -> None:
    text = help_of(command)
    assert "GENWORKER_" in text
