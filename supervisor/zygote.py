"""The zygote: a small process forked before the supervisor has an event loop,
threads, a DB pool or an HTTP session, which forks every worker on request.

Why: forking from a process with a running loop or threads copies their state
(and any lock a thread held) into the child. The zygote is single-threaded and
holds nothing but its control socket, so every worker starts clean.

Protocol on the control socket (SOCK_SEQPACKET, one pickle per packet):
  supervisor -> zygote  ("spawn", slot, generation, position) + the worker's channel fd
                        ("settings", Settings)   used for the next spawns (HUP)
  zygote -> supervisor  ("spawned", slot, generation, pid)
                        ("exited", pid, wait_status)
The zygote is the workers' parent, so it reaps them and reports how they died.
When the supervisor goes away (EOF), it stops every worker and exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pickle
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, NoReturn

from setproctitle import setproctitle

from .config import Settings

PR_SET_PDEATHSIG = 1

WorkerMain = Callable[[int, int, socket.socket, Settings, int], NoReturn]


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` when our parent exits (Linux); harmless elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


class ZygoteHandle:
    """The supervisor's side of the zygote."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock

    def spawn(self, slot: int, generation: int, channel_fd: int, position: int) -> None:
        msg = pickle.dumps(("spawn", slot, generation, position))
        socket.send_fds(self.sock, [msg], [channel_fd])

    def send_settings(self, settings: Settings) -> None:
        self.sock.send(pickle.dumps(("settings", settings)))

    def close(self) -> None:
        self.sock.close()


def start_zygote(settings: Settings, worker_main: WorkerMain) -> ZygoteHandle:
    """Fork the zygote. Call before creating any loop, thread, pool or session."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        parent_sock.close()
        code = 1
        try:
            code = Zygote(child_sock, settings, worker_main, parent_pid).run()
        finally:
            os._exit(code)
    child_sock.close()
    return ZygoteHandle(pid, parent_sock)


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
        setproctitle("genworker: zygote")
        die_with_parent(signal.SIGKILL)
        if os.getppid() != self.parent_pid:
            return 1  # the supervisor died before PDEATHSIG was armed: it will never fire
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
        return 0

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
                os._exit(1)  # the zygote died before PDEATHSIG was armed
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
