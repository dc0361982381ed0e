"""What crosses processes: framed messages on per-worker socket pairs, and the
shared-memory block of counters.

Each worker has its own socket pair with the supervisor, so no lock is shared
between processes: a worker SIGKILLed mid-write can only garble its own
channel, which dies with it. Frames are length-prefixed pickles, read by an
asyncio Protocol on both ends (no feeder threads, no blocking reads).

The shared block is one anonymous MAP_SHARED mapping created before any fork:
a header for host-wide state (the API token bucket) and one slot of float64
counters per worker. Each slot has a single writer, its worker; the supervisor
only reads them, so there is nothing to lock.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from typing import Any

_HEADER = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024


# ------------------------------------------------------------------ messages
# Supervisor -> worker
JOBS = "jobs"  # (JOBS, [Job, ...])
STOP = "stop"  # (STOP, None): finish what you hold, then exit
# Worker -> supervisor
READY = "ready"  # (READY, pid)
DONE = "done"  # (DONE, [Outcome, ...])
EVENT = "event"  # (EVENT, {"alarm": ..., ...})


class ProtocolError(Exception):
    """A peer sent something that is not a frame we understand."""


class Channel(asyncio.Protocol):
    """One end of a worker channel: send objects, receive them via a callback."""

    def __init__(
        self,
        on_message: Callable[[Any], None],
        on_close: Callable[[Exception | None], None],
    ) -> None:
        self._on_message = on_message
        self._on_close = on_close
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buf += data
        for msg in self._frames():
            self._on_message(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_close(exc)

    def _frames(self) -> Iterator[Any]:
        buf, pos, end = self._buf, 0, len(self._buf)
        try:
            while end - pos >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buf, pos)
                if size > MAX_FRAME:
                    raise ProtocolError(f"frame of {size} bytes")
                if end - pos - _HEADER.size < size:
                    break
                start = pos + _HEADER.size
                pos = start + size
                yield pickle.loads(memoryview(buf)[start:pos])
        finally:
            del buf[:pos]

    def send(self, msg: Any) -> None:
        if self.transport is None or self.closed or self.transport.is_closing():
            raise ConnectionResetError("channel closed")
        payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        self.transport.write(_HEADER.pack(len(payload)) + payload)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_channel(
    sock: Any, on_message: Callable[[Any], None], on_close: Callable[[Exception | None], None]
) -> Channel:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_unix_connection(lambda: Channel(on_message, on_close), sock=sock)
    return proto


# ------------------------------------------------------------- shared memory

HEADER_BYTES = 4096  # host-wide state; the token bucket lives at offset 0
BUCKET_BYTES = 256
SLOT_DOUBLES = 64

# Slot fields (float64 each). Counters are cumulative for one worker's life.
PID = 0
GENERATION = 1
HEARTBEAT = 2  # time.monotonic() of the worker's last loop tick
INFLIGHT = 3
LIMIT = 4  # current adaptive slot limit
DONE_OK = 5
FAILED = 6  # dead outcomes
RETRIED = 7
SNOOZED = 8
API_2XX = 9
API_4XX = 10
API_429 = 11
API_5XX = 12
API_TIMEOUT = 13
API_CONN = 14  # connection errors and resets
LATENCY_SUM = 15
LATENCY_COUNT = 16
RSS = 17  # bytes
STARTED = 18  # time.monotonic() at boot
JOBS_SEEN = 19
# API latency histogram: cumulative buckets in seconds, one counter each.
LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_BUCKET0 = 20  # fields 20..31
# Fields 32..63: the ids of the jobs the worker is running (0.0: a free place; float64 holds
# ids exactly up to 2**53). When a worker dies, only these were in flight: the jobs queued
# behind its busy slots never started and take no death. Kept when concurrency <= 32.
RUNNING0 = 32
RUNNING_PLACES = 32

COUNTER_FIELDS = {
    "done": DONE_OK, "failed": FAILED, "retried": RETRIED, "snoozed": SNOOZED,
    "api_2xx": API_2XX, "api_4xx": API_4XX, "api_429": API_429, "api_5xx": API_5XX,
    "api_timeout": API_TIMEOUT, "api_conn": API_CONN, "latency_sum": LATENCY_SUM,
    "latency_count": LATENCY_COUNT,
}  # fmt: skip


class SharedBlock:
    """The shared mapping, in an anonymous memory file (memfd): forked children inherit
    the mapping, and a process started fresh (the zygote) maps it from the passed fd."""

    def __init__(self, max_workers: int, fd: int | None = None) -> None:
        self.max_workers = max_workers
        self.size = HEADER_BYTES + max_workers * SLOT_DOUBLES * 8
        if fd is None:
            fd = os.memfd_create("genworker-counters", 0)  # inheritable only on purpose
            os.ftruncate(fd, self.size)
        self.fd = fd
        self.mm = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED)
        self._doubles: memoryview[float] = memoryview(self.mm)[HEADER_BYTES:].cast("d")

    def bucket_buffer(self) -> memoryview:
        return memoryview(self.mm)[:BUCKET_BYTES]

    def slot(self, index: int) -> memoryview[float]:
        """The float64 fields of one worker's slot (write only from that worker)."""
        if not 0 <= index < self.max_workers:
            raise IndexError(f"worker slot {index} out of range 0..{self.max_workers - 1}")
        start = index * SLOT_DOUBLES
        return self._doubles[start : start + SLOT_DOUBLES]


def clear_slot(slot: memoryview[float]) -> None:
    for i in range(len(slot)):
        slot[i] = 0.0


def observe_latency(slot: memoryview[float], seconds: float) -> None:
    slot[LATENCY_SUM] += seconds
    slot[LATENCY_COUNT] += 1
    for i, bound in enumerate(LATENCY_BUCKETS_S):
        if seconds <= bound:
            slot[LATENCY_BUCKET0 + i] += 1
