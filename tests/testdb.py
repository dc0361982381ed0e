"""Which PostgreSQL server the tests may use, and the names of the databases they make.

Tests create and drop databases, so they never follow `DATABASE_URL`, which may point at
production: only `GENWORKER_TEST_DATABASE_URL` sends them to a server, and without it they
start an embedded PostgreSQL of their own. The names carry a tag of this host, so a run
that cleans up after a crashed one never drops another host's running test databases.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Mapping

TEST_DSN_VAR = "GENWORKER_TEST_DATABASE_URL"
# what a test process must never inherit: the production server's address
PRODUCTION_VARS = ("DATABASE_URL", "GENWORKER_DATABASE_URL")
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(rf"^gwt(pl)?_{HOST_TAG}_([0-9]+)(_[0-9]+)?$")


def test_server_dsn(env: Mapping[str, str]) -> str | None:
    """The server the tests may create databases on, or None for an embedded one."""
    return env.get(TEST_DSN_VAR) or None


def database_name(pid: int, n: int | None = None, *, template: bool = False) -> str:
    kind = "gwtpl" if template else "gwt"
    return f"{kind}_{HOST_TAG}_{pid}" + ("" if n is None else f"_{n}")


def leftover_pid(name: str) -> int | None:
    """The pid of the run on this host that made database `name`, or None if not ours."""
    m = _LEFTOVER.match(name)
    return int(m.group(2)) if m else None


def forget_production_database() -> list[str]:
    """Remove the production DSN variables from this process (and so its children)."""
    return [var for var in PRODUCTION_VARS if os.environ.pop(var, None) is not None]


test_server_dsn.__test__ = False  # type: ignore[attr-defined]  # not a test, despite its name
