"""sd_notify without a dependency: one datagram to $NOTIFY_SOCKET per message.

The messages genworker sends (see sd_notify(3)):

- ``READY=1``: the database is reachable and every worker is up; also sent when a
  reload (rolling restart) has finished.
- ``STATUS=<one line>``: a summary shown by ``systemctl status``, every few seconds.
- ``WATCHDOG=1``: "the supervisor loop is alive", every WATCHDOG_USEC/2, and only
  while the loop is healthy, so a stuck loop gets the service restarted.
- ``RELOADING=1`` + ``MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>``: a HUP started a
  reload; systemd >= 253 (Type=notify-reload) matches it against the reload
  request by the timestamp, older versions just show "reloading".
- ``STOPPING=1``: shutdown started (graceful drain).
- ``EXTEND_TIMEOUT_USEC=<µs>``: the drain needs this much longer than the start/stop
  timeout allows; repeat before it runs out.

Outside systemd (NOTIFY_SOCKET unset) every call does nothing and returns False.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

log = logging.getLogger("genworker.systemd")

# A datagram to a local socket only blocks when systemd's receive queue is full;
# bound that so a wedged manager cannot stall the supervisor loop for long.
_SEND_TIMEOUT_S = 0.25


def _address(value: str) -> str | None:
    """The socket address in NOTIFY_SOCKET: a path, or '@name' for the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:..." (systemd >= 254, for VMs): not supported here


def notify(*lines: str) -> bool:
    """Send the lines as one message; True when it was delivered to the socket.

    Never raises for a missing or broken socket: the service manager being gone must
    not take the supervisor down. A line containing a newline is a programming error
    (it would smuggle in another assignment) and raises ValueError.
    """
    for line in lines:
        if "\n" in line:
            raise ValueError(f"sd_notify line contains a newline: {line!r}")
    value = os.environ.get("NOTIFY_SOCKET")
    if not value or not lines:
        return False
    address = _address(value)
    if address is None:
        log.debug("NOTIFY_SOCKET %r is not a unix socket address; not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as e:
        log.debug("sd_notify to %s failed: %s", value, e)
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(status_text: str | None = None) -> bool:
    return notify("READY=1", *_status_lines(status_text))


def status(text: str) -> bool:
    return notify(f"STATUS={_one_line(text)}")


def stopping(status_text: str | None = None) -> bool:
    return notify("STOPPING=1", *_status_lines(status_text))


def reloading(status_text: str | None = None) -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status_lines(status_text))


def extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more from now before the start/stop/runtime timeout fires."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def _status_lines(text: str | None) -> tuple[str, ...]:
    return () if text is None else (f"STATUS={_one_line(text)}",)


def watchdog_interval_s() -> float | None:
    """How often to ping: half of WATCHDOG_USEC, when the watchdog is meant for us."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # a forked worker inherited the variables; the pings are not its job
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


class Notifier:
    """Periodic STATUS= and WATCHDOG=1, run as one task of the supervisor's loop.

    The pings come from the loop itself (no thread), so a blocked loop stops them and
    systemd restarts the service; `healthy_fn` lets the supervisor withhold them when
    the loop runs but is not making progress.
    """

    def __init__(
        self, status_interval_s: float = 5.0, ping_interval_s: float | None = None
    ) -> None:
        """`ping_interval_s` None: from WATCHDOG_USEC (no pings when that is unset)."""
        self.status_interval_s = status_interval_s
        self.ping_interval_s = ping_interval_s if ping_interval_s else watchdog_interval_s()

    async def run(
        self,
        stop_event: asyncio.Event,
        status_fn: Callable[[], str],
        healthy_fn: Callable[[], bool],
    ) -> None:
        """Until `stop_event` is set: STATUS every status interval, WATCHDOG while healthy."""
        loop = asyncio.get_running_loop()
        next_status = next_ping = loop.time()
        while not stop_event.is_set():
            now = loop.time()
            if self.ping_interval_s is not None and now >= next_ping:
                if healthy_fn():
                    watchdog()
                next_ping = now + self.ping_interval_s
            if now >= next_status:
                status(self._status_text(status_fn))
                next_status = now + self.status_interval_s
            wake = next_status if self.ping_interval_s is None else min(next_status, next_ping)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_event.wait(), timeout=max(0.0, wake - loop.time()))

    @staticmethod
    def _status_text(status_fn: Callable[[], str]) -> str:
        # The status line is cosmetic: a bug in it must not stop the watchdog pings.
        try:
            return status_fn()
        except Exception:
            log.exception("building the STATUS line failed")
            return "status unavailable (see the log)"
