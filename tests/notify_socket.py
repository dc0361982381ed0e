"""The receiving end of NOTIFY_SOCKET: a real AF_UNIX datagram socket standing in for
systemd, read by a thread that stamps each message as it arrives."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path


class NotifySocket:
    """Binds `path` (a file, or "\\0name" for an abstract socket) and keeps every message
    as (monotonic time, fields); `on_message` is called in the reading thread."""

    def __init__(
        self, path: str | Path, on_message: Callable[[dict[str, str]], None] | None = None
    ) -> None:
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

    def messages(self, settle_s: float = 0.0) -> list[dict[str, str]]:
        """Every message so far, after waiting `settle_s` for any still on the way."""
        time.sleep(settle_s)
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
