"""Limits on calls to the provider: a per-worker AIMD slot limit and a host-wide token bucket.

`Aimd` is a worker's own number of calls in flight, in [1, max]. `SharedTokenBucket`
is the host's request rate, in a small shared-memory buffer every worker of the
host draws from. Without a configured rate the bucket learns one from 429s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import math
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# ---------------------------------------------------------------------- AIMD


class Aimd:
    """A worker's slot limit in [1, max]: halve on congestion, +1 after a run of successes.

    Congestion is a 429, or a burst of timeouts (TIMEOUT_BURST among the last
    TIMEOUT_WINDOW outcomes). After a halving, the next `old limit` outcomes
    cannot halve again: they were already in flight when it happened, so their
    429s report the same event. The run that earns +1 is `limit` successes in a
    row, one round of the current window as in TCP congestion avoidance; any
    failure restarts it. From 1 back to 5 that is 1+2+3+4 = 10 successes.
    """

    TIMEOUT_WINDOW = 10
    TIMEOUT_BURST = 3

    def __init__(self, max_limit: int) -> None:
        if max_limit < 1:
            raise ValueError(f"max_limit must be at least 1, got {max_limit}")
        self.max_limit = max_limit
        self.limit = max_limit
        self._run = 0
        self._grace = 0
        self._recent: collections.deque[bool] = collections.deque(maxlen=self.TIMEOUT_WINDOW)

    def _outcome(self, timeout: bool) -> None:
        self._recent.append(timeout)
        if self._grace:
            self._grace -= 1

    def _halve(self) -> None:
        if self._grace == 0:
            self._grace = self.limit
            self.limit = max(1, self.limit // 2)
            self._recent.clear()
        self._run = 0

    def on_success(self) -> int:
        self._outcome(False)
        self._run += 1
        if self._run >= self.limit:
            self._run = 0
            self.limit = min(self.max_limit, self.limit + 1)
        return self.limit

    def on_rate_limited(self) -> int:
        self._outcome(False)
        self._halve()
        return self.limit

    def on_timeout(self) -> int:
        self._outcome(True)
        if sum(self._recent) >= self.TIMEOUT_BURST:
            self._halve()
        else:
            self._run = 0
        return self.limit

    def on_error(self) -> int:
        """Any other failure: not congestion, but not a success either."""
        self._outcome(False)
        self._run = 0
        return self.limit


# ------------------------------------------------------------ shared bucket

BUCKET_BYTES = 64
_LAYOUT = struct.Struct("<8d")  # 8 float64 fields; all zero is the valid initial state
assert _LAYOUT.size == BUCKET_BYTES

DEFAULT_BURST_FRACTION = 0.1  # set_rate without a burst: a tenth of a second's worth (at least 1)
LEARNED_BURST_FRACTION = 0.05  # a learned rate sits near the provider's limit: burst little
CUT_FACTOR = 0.9  # a 429 cuts the learned rate to 90 % ...
CUT_HOLD_S = 1.0  # ... at most once a second: the 429s of calls in flight are the same event
# While the bucket is the bottleneck the learned rate grows, 2 %/s right after a cut and
# faster the longer no 429 comes (+2 %/s per second, at most 25 %/s): careful next to the
# limit just found, quick to climb back after a cut that was too deep (CUBIC's idea).
GROWTH_PER_S = 0.02
GROWTH_ACCEL_S = 1.0
MAX_GROWTH_PER_S = 0.25
MIN_GROWTH_RPS = 0.5  # ... and by at least this much per second
MIN_RATE = 0.1
EST_TAU_S = 1.0  # the grant-rate estimate (used for the first cut) decays over a second
MAX_PAUSE_S = 300.0
MAX_SLEEP_S = 0.25  # a waiter re-reads the bucket at least this often (rate changes, pauses)


@dataclass
class _State:
    rate: float  # configured share of --api-rps; 0: none (written by the supervisor only)
    burst: float  # configured burst in requests (written by the supervisor only)
    tat: float  # theoretical arrival time of the next request (GCRA), monotonic seconds
    paused_until: float  # monotonic; no grant before it
    learned: float  # rate learned from 429s; 0: nothing learned yet
    last_cut: float  # monotonic time of the last cut of `learned`
    est_count: float  # grants, exponentially decayed over EST_TAU_S
    est_t: float  # when est_count was last decayed


@dataclass(frozen=True)
class BucketState:
    """What the metrics show: the rate in force, the learned one, and the pause left."""

    rate: float | None
    configured: float | None
    learned: float | None
    paused_for_s: float


def _finite(x: float, lo: float, hi: float, default: float) -> float:
    if not math.isfinite(x):
        return default
    return min(max(x, lo), hi)


class SharedTokenBucket:
    """A host-wide request rate over shared memory, safe against any process dying.

    The buffer (`BUCKET_BYTES`, zero-filled) is mapped by the supervisor before
    it forks; each process builds its own SharedTokenBucket on it. Updates are
    serialised by `fcntl.flock` on `lock_path`, which each process opens itself
    (a descriptor inherited over fork shares one lock with its parent, so the
    object reopens it when it finds itself in a new process). The kernel drops
    a flock when its holder dies, and every read clamps the fields, so a
    process SIGKILLed mid-update leaves at worst a state that is clamped sane.

    The rate is a GCRA (one "theoretical arrival time"): at most rate x 1 s +
    burst grants in any second. Rate 0 means unlimited until a 429 teaches one:
    the first 429 sets the learned rate to the recent grant rate (a decayed count,
    which errs low), each later one (at most one a second) cuts it by 10 %, and
    while the bucket is the bottleneck it grows, slowly just after a cut and
    faster the longer no 429 comes: AIMD on the host's rate, which settles just
    under the provider's limit. A configured rate caps the learned one.
    """

    def __init__(
        self,
        buf: memoryview,
        lock_path: str | os.PathLike[str],
        *,
        adaptive: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if len(buf) < BUCKET_BYTES or buf.readonly:
            raise ValueError(f"the bucket needs a writable buffer of {BUCKET_BYTES} bytes")
        self._buf = buf[:BUCKET_BYTES]
        self._lock_path = os.fspath(lock_path)
        self._adaptive = adaptive
        self._clock = clock
        self._fd = -1
        self._pid = -1
        self._local: asyncio.Lock | None = None

    # ---------------------------------------------------------- plumbing
    def _lock_fd(self) -> int:
        if self._pid != os.getpid():
            self._fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
            self._local = None  # an asyncio.Lock belongs to the parent's loop
        return self._fd

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = self._lock_fd()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _load(self, now: float) -> _State:
        s = _State(*_LAYOUT.unpack_from(self._buf))
        s.rate = _finite(s.rate, 0.0, 1e9, 0.0)
        s.burst = _finite(s.burst, 0.0, 1e9, 0.0)
        s.learned = _finite(s.learned, 0.0, 1e9, 0.0)
        s.paused_until = _finite(s.paused_until, 0.0, now + MAX_PAUSE_S, 0.0)
        s.last_cut = _finite(s.last_cut, 0.0, now, 0.0)
        s.est_count = _finite(s.est_count, 0.0, 1e9, 0.0)
        s.est_t = _finite(s.est_t, 0.0, now, now)
        rate, burst = self._effective(s)
        # a grant leaves tat at most burst intervals ahead; more can only be a torn write
        s.tat = _finite(s.tat, 0.0, now + (burst / rate if rate else 0.0), now)
        return s

    def _store(self, s: _State) -> None:
        _LAYOUT.pack_into(
            self._buf, 0, s.rate, s.burst, s.tat, s.paused_until, s.learned, s.last_cut,
            s.est_count, s.est_t,
        )  # fmt: skip

    @staticmethod
    def _effective(s: _State) -> tuple[float, float]:
        """(rate, burst) in force; rate 0 means unlimited."""
        if s.learned and (not s.rate or s.learned < s.rate):
            return s.learned, max(1.0, s.learned * LEARNED_BURST_FRACTION)
        if s.rate:
            return s.rate, max(1.0, s.burst or s.rate * DEFAULT_BURST_FRACTION)
        return 0.0, 0.0

    # ---------------------------------------------------------- public
    def set_rate(self, rps: float | None, burst: float | None = None) -> None:
        """The supervisor's share of --api-rps for this host (None or 0: no configured rate)."""
        rps = rps if rps and rps > 0 else 0.0
        with self._locked():
            s = self._load(self._clock())
            s.rate = rps
            s.burst = max(1.0, burst if burst else rps * DEFAULT_BURST_FRACTION) if rps else 0.0
            if s.rate and s.learned > s.rate:
                s.learned = s.rate
            self._store(s)

    def try_acquire(self) -> float:
        """Take one request now (returns 0.0), or return how long to wait before asking again."""
        with self._locked():
            now = self._clock()
            s = self._load(now)
            rate, burst = self._effective(s)
            interval = 1.0 / rate if rate else 0.0
            wait = max(s.paused_until, s.tat - (burst - 1.0) * interval) - now
            if wait > 0:
                self._store(s)  # the clamped state, if this load found a torn one
                return wait
            if rate:
                saturated = s.tat > now - interval  # a grant waited on the bucket, or nearly
                if s.learned and saturated and (not s.rate or s.learned < s.rate):
                    # saturated: demand keeps up with the learned rate, so probe upward
                    pct = GROWTH_PER_S * (1.0 + (now - s.last_cut) / GROWTH_ACCEL_S)
                    per_s = max(MIN_GROWTH_RPS, min(pct, MAX_GROWTH_PER_S) * s.learned)
                    growth = per_s * interval
                    s.learned = min(s.learned + growth, s.rate or math.inf)
                s.tat = max(s.tat, now) + interval
            s.est_count = s.est_count * math.exp(-(now - s.est_t) / EST_TAU_S) + 1.0
            s.est_t = now
            self._store(s)
            return 0.0

    async def acquire(self) -> None:
        """Wait (asleep, never blocking the loop beyond the lock) until a request may go."""
        if self._local is None or self._pid != os.getpid():
            self._lock_fd()
            self._local = asyncio.Lock()
        # one waiter per process polls the shared state; the others queue here in order
        async with self._local:
            while True:
                wait = self.try_acquire()
                if wait <= 0:
                    return
                await asyncio.sleep(min(wait, MAX_SLEEP_S))

    def pause_until(self, t: float) -> None:
        """No grant on this host before monotonic time `t` (a 429's Retry-After)."""
        with self._locked():
            now = self._clock()
            s = self._load(now)
            s.paused_until = max(s.paused_until, min(t, now + MAX_PAUSE_S))
            self._store(s)

    def on_rate_limited(self, retry_after_s: float | None = None) -> None:
        """A 429 came back: pause the host for its Retry-After, and cut the learned rate."""
        with self._locked():
            now = self._clock()
            s = self._load(now)
            if retry_after_s is not None and retry_after_s > 0:
                s.paused_until = max(s.paused_until, now + min(retry_after_s, MAX_PAUSE_S))
            if self._adaptive and (s.last_cut == 0.0 or now - s.last_cut >= CUT_HOLD_S):
                if s.learned:
                    base = s.learned
                elif s.rate and s.tat >= now:
                    base = s.rate  # the configured rate was in force and used up: it overshot
                else:
                    # the decayed count of recent grants: under the true rate in the first
                    # second, so it is not cut further
                    base = s.est_count * math.exp(-(now - s.est_t) / EST_TAU_S) / EST_TAU_S
                    base = (min(base, s.rate) if s.rate else base) / CUT_FACTOR
                s.learned = max(MIN_RATE, base * CUT_FACTOR)
                s.last_cut = now
                s.tat = max(s.tat, now)  # spend any saved-up burst: it is what overshot
            self._store(s)

    def state(self) -> BucketState:
        with self._locked():
            now = self._clock()
            s = self._load(now)
        rate, _ = self._effective(s)
        return BucketState(
            rate=rate or None,
            configured=s.rate or None,
            learned=s.learned or None,
            paused_for_s=max(0.0, s.paused_until - now),
        )

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = -1, -1
