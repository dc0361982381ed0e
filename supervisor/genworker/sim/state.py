"""The simulator's state: its configuration, random stream, rate window, files and counters."""

from __future__ import annotations

import collections
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

# New faults go last: the draw walks this order, so old seeds keep their faults.
FAULTS = (
    "500",
    "timeout",
    "reset",
    "malformed",
    "content_type",
    "400",
    "401",
    "quota",
    "empty",
    "429",
)


@dataclass
class SimConfig:
    latency_ms: float = 50.0
    jitter_ms: float = 10.0
    rps: float | None = None  # the sim's own rate limit (None: none)
    fail_500: float = 0.0
    fail_timeout: float = 0.0  # hold the request for hang_s (past the client's timeout)
    fail_reset: float = 0.0  # close the connection with a TCP reset
    fail_malformed: float = 0.0  # 200 with truncated JSON
    fail_content_type: float = 0.0  # 200 with an HTML page
    fail_400: float = 0.0  # content policy refusal
    fail_401: float = 0.0  # invalid key (echoing the key sent, as providers do)
    fail_quota: float = 0.0  # 429 insufficient_quota
    fail_empty: float = 0.0  # 200 with "data": []
    fail_429: float = 0.0  # 429 rate_limit_exceeded with Retry-After, whatever the rate
    fault_retry_after_ms: float = 100.0  # the wait an injected 429 asks for
    hang_s: float = 3600.0
    api_key: str | None = None  # when set, requests must carry "Bearer <key>"
    seed: int = 1
    image_px: int = 8
    max_files: int = 10_000  # url results kept for GET /files/<name>
    lenient: bool = False  # accept what the real provider refuses (the pre-contract sim)

    def fault_rates(self) -> list[tuple[str, float]]:
        return [(name, float(getattr(self, f"fail_{name}"))) for name in FAULTS]


TIMELINE_MAX = 20_000  # requests kept in the stats' timeline (bounded memory)


class SimApi:
    """The server's state: config, random stream, rate window, stored files, counters."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.window: collections.deque[float] = collections.deque()
        self.files: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.seq = 0
        self.inflight = 0
        self.reset_stats()

    def reset_stats(self) -> None:
        self.by_status: collections.Counter[str] = collections.Counter()
        self.by_request_id: collections.Counter[str] = collections.Counter()
        self.by_fault: collections.Counter[str] = collections.Counter()
        # 400s of the request check by error code: zero means the client kept the contract
        self.refused: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque[float] = collections.deque()  # arrivals in the last 1 s
        self.max_per_s = 0  # most arrivals (any status) seen in one sliding second
        # images served per request id: a job's result can only come from one of these
        self.images_by_request_id: collections.Counter[str] = collections.Counter()
        # most requests held at once (a hung one until its client leaves)
        self.max_inflight = self.inflight
        self.started = time.monotonic()
        # (arrived, answered, status) of each request, seconds since the stats began:
        # lets a test check that nothing came during a Retry-After it asked for
        self.timeline: list[tuple[float, float, int]] = []

    def arrived(self, now: float) -> None:
        while self.recent and self.recent[0] <= now - 1.0:
            self.recent.popleft()
        self.recent.append(now)
        self.max_per_s = max(self.max_per_s, len(self.recent))

    def stats(self) -> dict[str, Any]:
        config = {k: v for k, v in asdict(self.config).items() if k != "api_key"}
        return {
            "simulated": True,
            "total": sum(self.by_status.values()),
            "by_status": dict(self.by_status),
            "by_fault": dict(self.by_fault),
            "refused": dict(self.refused),
            "by_request_id": dict(self.by_request_id),
            "images_by_request_id": dict(self.images_by_request_id),
            "max_in_any_second": self.max_per_s,
            "inflight": self.inflight,
            "max_inflight": self.max_inflight,
            "timeline": list(self.timeline),
            "elapsed_s": time.monotonic() - self.started,
            "config": config,
        }

    def rate_limited(self, now: float) -> float | None:
        """Seconds until the window has room, or None when this request is admitted."""
        rps = self.config.rps
        while self.window and self.window[0] <= now - 1.0:
            self.window.popleft()
        if rps and len(self.window) >= rps:
            return max(0.001, self.window[0] + 1.0 - now)
        self.window.append(now)
        return None

    def draw(self) -> tuple[str | None, float]:
        """The fault (or None) and the latency in seconds of the next request."""
        r = self.rng.random()
        jitter = self.rng.uniform(-self.config.jitter_ms, self.config.jitter_ms)
        latency = max(0.0, self.config.latency_ms + jitter) / 1000
        for name, rate in self.config.fault_rates():
            if r < rate:
                return name, latency
            r -= rate
        return None, latency

    def keep_file(self, name: str, data: bytes) -> None:
        self.files[name] = data
        while len(self.files) > self.config.max_files:
            self.files.popitem(last=False)
