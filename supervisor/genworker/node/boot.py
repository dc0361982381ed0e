"""Bring a node up in the right order (`genworker start`).

1. settings and logging (nothing forked yet, no threads), the checks that can refuse the
   start: --output-dir writable with room, the --http port bound, the database (DATABASE_URL
   or the embedded server) migrated, no other live supervisor under this node id;
2. the shared block and the zygote, forked while this process is still clean;
3. the simulated API with --simulate (a child process of its own);
4. the supervisor loop (uvloop) until a signal ends it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from setproctitle import setproctitle

from genworker import channels as ch
from genworker import logs
from genworker.api.limiter import SharedTokenBucket
from genworker.api.results import make_private_dir, sweep_temp_files
from genworker.api.spool import Spool
from genworker.api.ssrf import AddressPolicy
from genworker.config import Settings, mask_dsn
from genworker.errors import GenworkerError, UsageError
from genworker.exits import EXIT_FAILED
from genworker.logs import Redactor, dsn_password
from genworker.node.arbiter import Arbiter, check_node_id, run_coroutine
from genworker.node.zygote import ZygoteHandle, die_with_parent, start_zygote
from genworker.ops.alarms import parse_limits
from genworker.ops.http import bind as bind_http
from genworker.ops.http import parse_address
from genworker.ops.service import Ops
from genworker.procs import child_environ, python_module
from genworker.queue.db import connect, resolve_dsn
from genworker.queue.schema import migrate

log = logging.getLogger("genworker.start")

MAX_SLOTS = 256  # shared-memory slots: the most workers one node can run (TTIN included)


def check_settings(settings: Settings, *, reload: bool = False) -> None:
    """Refuse settings that would only fail later, with one line each. On a reload the free
    space is not asked: a disk running low (the low_disk alarm says so) must not stop an
    operator from rotating a key."""
    parse_address(settings.http)
    try:
        parse_limits(settings.alarms)
    except ValueError as e:
        raise UsageError(f"--alarms: {e}") from None
    if settings.api_url and not settings.api_url.startswith(("http://", "https://")):
        raise UsageError(
            f"--api-url must start with http:// or https://, got {settings.api_url[:80]!r}"
        )
    AddressPolicy(settings.fetch_allow)  # a bad entry now, not when every worker boots
    settings.resolved_api_key()  # a missing key file is an error now, not in every worker
    out = settings.resolved_output_dir
    try:
        make_private_dir(out)  # tenants' images: 0700 when we create it
    except OSError as e:
        raise UsageError(f"cannot create --output-dir {out}: {e.strerror}") from None
    check_output_dir(out, 0 if reload else settings.min_free_disk_mb)
    check_provider(settings)


def check_output_dir(out: Path, min_free_mb: int) -> None:
    """Images can be written there (a probe file) and it has room (--min-free-disk)."""
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".genworker-probe-"):
            pass
        free_mb = shutil.disk_usage(out).free / 2**20
    except OSError as e:
        raise UsageError(f"cannot write to --output-dir {out}: {e.strerror}") from None
    if free_mb < min_free_mb:
        raise UsageError(
            f"--output-dir {out} has {free_mb:.0f} MB free, less than --min-free-disk "
            f"{min_free_mb} MB"
        )


def check_provider(settings: Settings) -> None:
    """A node runs against a provider or, when asked in so many words, the simulator: a
    unit whose environment lost its --api-url must not "succeed" every job with a
    placeholder image."""
    if settings.simulate and settings.api_url:
        raise UsageError("give --api-url or --simulate, not both")
    if not settings.simulate and not settings.api_url:
        raise UsageError(
            "no image provider: give --api-url (GENWORKER_API_URL), or --simulate for the "
            "simulated API (placeholder images)"
        )


class SimProcess:
    """The simulated image API in a child process, for a node started with --simulate."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def start(self, settings: Settings) -> str:
        cmd = python_module("genworker.sim", "--host", "127.0.0.1", "--port", "0", "--announce")
        self.proc = subprocess.Popen(
            cmd,
            env=child_environ(),  # the simulator needs no secret
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # Ctrl-C is ours to handle; we stop it ourselves
            # ... and if we are SIGKILLed, it must not live on: no orphans. (No thread runs
            # yet, so preexec_fn is safe here.)
            preexec_fn=functools.partial(_die_with, os.getpid()),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.stop()
            raise GenworkerError(
                "the simulated API did not start (run `genworker sim-api` to see why)"
            )
        return line

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _die_with(parent_pid: int) -> None:
    """In a child before exec: get SIGTERM when the supervisor dies, or go now if it has."""
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(EXIT_FAILED)


def _preflight(settings: Settings, redactor: Redactor) -> tuple[socket.socket | None, str]:
    """What can refuse the start, asked before anything is launched: the --http port (bound
    now, handed to aiohttp later), the database (migrated), another supervisor under this
    node id. Returns the bound socket and the DSN."""
    http_socket = bind_http(settings.http)
    try:
        dsn = resolve_dsn(settings)
        redactor.add(dsn_password(dsn))
        with connect(dsn, timeout_s=settings.db_pool_timeout_s) as conn:
            migrate(conn, settings)
            check_node_id(conn, settings.resolved_node_id, settings.lease_s)
    except BaseException:
        if http_socket is not None:
            http_socket.close()
        raise
    return http_socket, dsn


def run_node(settings: Settings, reread_settings: Callable[[], Settings]) -> int:
    """Run one node until a signal ends it; `reread_settings` gives the settings anew on HUP."""
    # Replace our argv in `ps` at once: it may hold --api-key or a DSN with a password, and
    # the zygote, forked below, would carry a copy of it until it sets its own title.
    setproctitle(f"genworker: supervisor node={settings.resolved_node_id} starting")
    check_settings(settings)
    redactor = setup_logging(settings)
    swept = sweep_temp_files(settings.resolved_output_dir)
    if swept:
        log.info("removed %d half-written result files of workers that were killed", swept)
    # never younger than a day: a job whose bytes wait may still be retried (--retention 0)
    stale = Spool.of(settings).sweep(max(settings.retention_s, 86400.0))
    if stale:
        log.info("removed %d spooled images kept past --retention (their jobs are gone)", stale)
    http_socket, dsn = _preflight(settings, redactor)
    announce(settings, dsn)
    block = ch.SharedBlock(MAX_SLOTS)
    lock_fd, lock_path = tempfile.mkstemp(prefix="genworker-bucket-", suffix=".lock")
    os.close(lock_fd)
    bucket = SharedTokenBucket(block.bucket_buffer(), lock_path)
    bucket.set_rate(settings.api_rps)  # the whole rate until the node count is known
    zygote = start_zygote(settings, block, lock_path)
    sim = SimProcess()
    try:
        if settings.simulate:
            settings = settings.with_(api_url=sim.start(settings))
            log.warning("simulated image API at %s: results are placeholders", settings.api_url)
            zygote.send_settings(settings)

        def reload_settings() -> Settings:
            new = reread_settings()
            check_settings(new, reload=True)
            if new.simulate != settings.simulate:
                raise UsageError("--simulate changes only with a restart")
            return new.with_(api_url=settings.api_url) if new.simulate else new

        arbiter = Arbiter(
            settings,
            dsn=dsn,
            zygote=zygote,
            block=block,
            reload_settings=reload_settings,
            hooks=Ops(settings, redactor=redactor, http_socket=http_socket),
            set_api_rate=bucket.set_rate,  # one live node's share of --api-rps, for every worker
        )
        return run_coroutine(arbiter.run())
    finally:
        if http_socket is not None:
            http_socket.close()  # aiohttp's cleanup closed it if the node got that far
        _stop_zygote(zygote)
        sim.stop()
        with contextlib.suppress(OSError):
            Path(lock_path).unlink()


def announce(settings: Settings, dsn: str) -> None:
    """Say where results go and which database is used; warn of calls without a key."""
    log.info("results go to %s", settings.resolved_output_dir.resolve())
    if settings.database_url:
        log.info("database: %s", mask_dsn(dsn))
    else:
        where = settings.resolved_data_dir
        log.info("database: the embedded server in %s (%s)", where, mask_dsn(dsn))
    if settings.api_url and not settings.resolved_api_key():
        log.warning("no API key: calls go unauthenticated")


def _stop_zygote(zygote: ZygoteHandle) -> None:
    """Close its socket (it stops its workers and exits) and reap it: no zombie."""
    zygote.close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        pid, _ = os.waitpid(zygote.pid, os.WNOHANG)
        if pid:
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(zygote.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(zygote.pid, 0)


def setup_logging(settings: Settings) -> Redactor:
    """Every line of this process and its children (forked later) through one redacting
    handler that knows the API key and the DB password; returns its Redactor."""
    root = logging.getLogger()
    for handler in list(root.handlers):  # the CLI's basicConfig: its lines would not be redacted
        root.removeHandler(handler)
    fmt: Literal["human", "json"] = "json" if settings.log_format == "json" else "human"
    secrets = [
        settings.resolved_api_key(),
        dsn_password(settings.database_url),
        dsn_password(settings.cache),  # redis://:password@host
    ]
    redactor = logs.setup_logging(settings.log_level, fmt, secrets)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return redactor


__all__ = ["run_node"]
