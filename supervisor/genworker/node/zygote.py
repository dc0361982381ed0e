"""The zygote: a fork server that forks every worker on request.

Why: forking from a process with a running loop or threads copies their state
(and any lock a thread held) into the child. The zygote is a fresh interpreter
(started with exec, not forked from the supervisor), single-threaded, holding
nothing but its control socket and the shared block, and it imports only what a
worker needs, so every worker starts clean and small.

Protocol on the control socket (SOCK_SEQPACKET, one pickle per packet):
  supervisor -> zygote  ("settings", Settings)   first, and again on HUP
                        ("spawn", slot, generation, position) + the worker's channel fd
  zygote -> supervisor  ("spawned", slot, generation, pid)
                        ("exited", pid, wait_status)
The zygote is the workers' parent, so it reaps them and reports how they died.
When the supervisor goes away (EOF), it stops every worker and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import os
import pickle
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any, NoReturn

from setproctitle import setproctitle

from genworker.channels import SharedBlock
from genworker.config import Settings
from genworker.exits import EXIT_FAILED, EXIT_OK
from genworker.logs import setup_node_logging
from genworker.procs import child_environ, python_module

PR_SET_PDEATHSIG = 1

WorkerMain = Callable[[int, int, socket.socket, Settings, int], NoReturn]


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` when our parent exits (Linux); harmless elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


class ZygoteHandle:
    """The supervisor's side of the zygote."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc  # kept, so subprocess never reaps it behind our back
        self.pid = proc.pid
        self.sock = sock

    def spawn(self, slot: int, generation: int, channel_fd: int, position: int) -> None:
        msg = pickle.dumps(("spawn", slot, generation, position))
        socket.send_fds(self.sock, [msg], [channel_fd])

    def send_settings(self, settings: Settings) -> None:
        # the workers hold no database or cache connection: no DSN nor cache URL (passwords)
        self.sock.send(pickle.dumps(("settings", settings.with_(database_url=None, cache=None))))

    def close(self) -> None:
        self.sock.close()


def start_zygote(settings: Settings, block: SharedBlock, bucket_lock: str | None) -> ZygoteHandle:
    """Start the zygote as a fresh interpreter. Call before creating any loop, thread,
    pool or session (the exec leaves them behind anyway; the ordering keeps fds few)."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cmd = python_module(
        "genworker.node.zygote",
        "--control-fd", str(child_sock.fileno()), "--block-fd", str(block.fd),
        "--slots", str(block.max_workers), "--bucket-lock", bucket_lock or "",
        "--parent", str(os.getpid()),
    )  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        pass_fds=(child_sock.fileno(), block.fd),
        stdin=subprocess.DEVNULL,
        close_fds=True,
        env=child_environ(),  # workers get the key in their settings; no DSN at all
    )
    child_sock.close()
    handle = ZygoteHandle(proc, parent_sock)
    handle.send_settings(settings)  # secrets travel here, never on a command line
    return handle


def main(argv: list[str] | None = None) -> int:
    """The zygote process: `python -m genworker.node.zygote` (started by start_zygote only)."""
    setproctitle("genworker: zygote")
    p = argparse.ArgumentParser(prog="genworker zygote")
    for flag in ("--control-fd", "--block-fd", "--slots", "--parent"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--bucket-lock", default="")
    args = p.parse_args(argv)
    die_with_parent(signal.SIGKILL)
    if os.getppid() != args.parent:
        return EXIT_FAILED  # the supervisor died before PDEATHSIG was armed: it never fires
    sock = socket.socket(fileno=args.control_fd)
    block = SharedBlock(args.slots, fd=args.block_fd)
    first: tuple[Any, ...] = pickle.loads(sock.recv(1 << 20) or pickle.dumps(("eof",)))
    if first[0] != "settings":
        return EXIT_FAILED
    setup_node_logging(first[1])  # the node's format and level, its secrets hidden
    # What every worker needs, imported once here: workers share these pages and boot fast.
    import aiohttp  # noqa: F401
    import uvloop  # noqa: F401

    from genworker.api import limiter, openai  # noqa: F401
    from genworker.worker import handlers  # noqa: F401
    from genworker.worker.process import worker_main

    run = functools.partial(worker_main, block=block, bucket_lock=args.bucket_lock or None)
    return Zygote(sock, first[1], run, args.parent).run()


class Zygote:
    def __init__(
        self, sock: socket.socket, settings: Settings, worker_main: WorkerMain, parent_pid: int
    ) -> None:
        self.sock = sock
        self.settings = settings
        self.worker_main = worker_main
        self.parent_pid = parent_pid
        self.children: set[int] = set()
        self.sigchld_r, self.sigchld_w = os.pipe()

    def run(self) -> int:
        # The supervisor decides when everyone stops; Ctrl-C reaches the whole group.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        os.set_blocking(self.sigchld_w, False)
        signal.set_wakeup_fd(self.sigchld_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        try:
            while True:
                ready, _, _ = select.select([self.sock.fileno(), self.sigchld_r], [], [], 1.0)
                if self.sigchld_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.sigchld_r, 4096)
                self.reap()
                if self.sock.fileno() in ready and not self.handle_request():
                    break
        finally:
            self.stop_children()
        return EXIT_OK

    def handle_request(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 4)
        except OSError:
            return False
        if not data:
            return False  # the supervisor is gone
        msg: tuple[Any, ...] = pickle.loads(data)
        if msg[0] == "settings":
            self.settings = msg[1]
            setup_node_logging(self.settings)  # a new key file after a HUP: hide it too
        elif msg[0] == "spawn" and fds:
            self.spawn(msg[1], msg[2], fds[0], msg[3])
        for fd in fds[1:]:
            os.close(fd)
        return True

    def spawn(self, slot: int, generation: int, fd: int, position: int) -> None:
        zygote_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            self.sock.close()
            os.close(self.sigchld_r)
            os.close(self.sigchld_w)
            signal.set_wakeup_fd(-1)
            for sig in (
                signal.SIGCHLD,
                signal.SIGINT,
                signal.SIGTERM,
                signal.SIGHUP,
                signal.SIGQUIT,
            ):
                signal.signal(sig, signal.SIG_DFL)
            die_with_parent(signal.SIGKILL)
            if os.getppid() != zygote_pid:
                os._exit(EXIT_FAILED)  # the zygote died before PDEATHSIG was armed
            chan = socket.socket(fileno=fd)
            self.worker_main(slot, generation, chan, self.settings, position)
        os.close(fd)
        self.children.add(pid)
        self._send(("spawned", slot, generation, pid))

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self._send(("exited", pid, status))

    def _send(self, msg: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(pickle.dumps(msg))

    def stop_children(self) -> None:
        """The supervisor is gone: TERM every worker, KILL the ones still there after 1 s."""
        for pid in list(self.children):
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        for pid in list(self.children):
            _kill(pid, signal.SIGKILL)
        self.reap()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise


def describe_exit(status: int) -> tuple[str, int | None, int | None]:
    """How a child died: (text, exit code, signal). A SIGKILL is often the OOM killer."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        hint = " (out of memory? see dmesg)" if sig == signal.SIGKILL else ""
        return f"killed by {name}{hint}", None, sig
    code = os.waitstatus_to_exitcode(status)
    return f"exited with code {code}", code, None


if __name__ == "__main__":
    raise SystemExit(main())
