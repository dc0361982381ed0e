"""`genworker start`: the flags become settings, and a node runs on them."""

from __future__ import annotations

import argparse

from genworker.config import Settings
from genworker.node.boot import run_node


def cmd_start(args: argparse.Namespace, settings: Settings) -> int:
    from genworker.cli.main import settings_from_args

    def reread() -> Settings:
        return settings_from_args(args)[0]

    return run_node(settings, reread)
