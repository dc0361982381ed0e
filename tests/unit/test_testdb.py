"""The tests never use DATABASE_URL, which may point at production: only
GENWORKER_TEST_DATABASE_URL sends them to a server, and their clean-up only drops this
host's leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from testdb import HOST_TAG, database_name, leftover_pid, test_server_dsn

PRODUCTION = "postgresql://app:secret@127.0.0.1:1/production"


def test_database_url_alone_is_not_a_test_server() -> None:
    assert test_server_dsn({"DATABASE_URL": PRODUCTION}) is None
    assert test_server_dsn({"GENWORKER_DATABASE_URL": PRODUCTION}) is None
    both = {"DATABASE_URL": PRODUCTION, "GENWORKER_TEST_DATABASE_URL": "postgresql://t@h/test"}
    assert test_server_dsn(both) == "postgresql://t@h/test"


def test_this_session_does_not_carry_a_production_dsn() -> None:
    assert "DATABASE_URL" not in os.environ
    assert "GENWORKER_DATABASE_URL" not in os.environ


def test_a_run_given_only_database_url_forgets_it(tmp_path: Path) -> None:
    """A child pytest run with DATABASE_URL set: its tests see no DATABASE_URL at all, and
    are told so once."""
    probe = Path(__file__).parent / "test_testdb.py"
    env = {k: v for k, v in os.environ.items() if k != "GENWORKER_TEST_DATABASE_URL"}
    env["DATABASE_URL"] = PRODUCTION
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(probe.parents[1]),
            f"{probe}::test_this_session_does_not_carry_a_production_dsn",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "DATABASE_URL ignored" in done.stdout + done.stderr
    assert "secret" not in done.stdout + done.stderr


def test_clean_up_takes_only_this_hosts_databases() -> None:
    assert leftover_pid(database_name(4242, 7)) == 4242
    assert leftover_pid(database_name(4242, template=True)) == 4242
    other_host = "gwt_" + ("0" * 8 if HOST_TAG != "0" * 8 else "1" * 8) + "_4242_7"
    assert leftover_pid(other_host) is None
    assert leftover_pid("gwt_4242_7") is None  # the old shape, shared by every host
    assert leftover_pid("production") is None
