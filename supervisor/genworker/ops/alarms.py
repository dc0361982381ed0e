"""Health conditions with hysteresis: the old system's alerts, as alarms the supervisor feeds.

An alarm raises when its value goes above `raise_above` (for `min_duration_s`, if
set) and clears only when the value drops below `clear_below`, so a value hovering
at the threshold does not flap. Each change is one log line on `genworker.alarms`
(WARNING when raised, INFO when cleared); `Alarms.active()` feeds /readyz,
`genworker status` and the systemd STATUS line.

Pure code: every call takes `now` (a monotonic clock reading), so tests inject time.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace

log = logging.getLogger("genworker.alarms")


def _plain(value: float) -> str:
    return f"{value:g}"


def _percent(value: float) -> str:
    return f"{value * 100:.1f}%"


def _seconds(value: float) -> str:
    return f"{value:.1f}s"


def format_duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass(frozen=True)
class Alarm:
    """A condition on one observed value. `expire_s`: a raised alarm also clears after
    this long without an observation above `raise_above` (for event-driven alarms that
    may stop getting observations, like a rejected API key)."""

    name: str
    title: str
    raise_above: float
    clear_below: float
    min_duration_s: float = 0.0
    expire_s: float | None = None
    fmt: Callable[[float], str] = _plain
    raise_text: str | None = None  # fixed reasons, for yes/no conditions
    clear_text: str | None = None

    def __post_init__(self) -> None:
        if self.clear_below > self.raise_above:
            raise ValueError(f"alarm {self.name}: clear_below must not exceed raise_above")

    def reason(self, value: float) -> str:
        return self.raise_text or f"{self.title} {self.fmt(value)} > {self.fmt(self.raise_above)}"

    def cleared(self, value: float) -> str:
        return self.clear_text or f"{self.title} {self.fmt(value)}"


@dataclass(frozen=True)
class AlarmLimits:
    """The thresholds and windows of the default alarms (the `--alarms` setting).

    queue_depth counts tasks, not jobs: the old system's alert counted tasks waiting
    for a worker, and in jobs one Pro task alone (70) would raise it.
    """

    queue_depth: float = 50  # tasks waiting for their first image
    queue_depth_hold_s: float = 30  # ... for this long, so one burst is not an alarm
    api_error_rate: float = 0.05  # failed / all API calls over window_s
    db_wait_s: float = 5.0  # the longest DB pool wait over db_window_s
    worker_restarts: float = 5  # worker crashes over window_s
    window_s: float = 60.0  # API error rate and worker restarts
    db_window_s: float = 15.0
    bad_api_key_clear_s: float = 300.0  # a key alarm with no new occurrence clears then
    bad_api_key_pause_s: float = 60.0  # claims pause this long, then one job probes the key

    def to_text(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name):g}" for f in fields(self))


def parse_limits(text: str) -> AlarmLimits:
    """'queue_depth=50,api_error_rate=0.05,...' (any subset) -> AlarmLimits.

    Raises ValueError with a one-line message naming the bad item."""
    known = {f.name for f in fields(AlarmLimits)}
    values: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise ValueError(
                f"bad alarm setting {item!r}: write name=value with a name among "
                f"{', '.join(sorted(known))}"
            )
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(
                f"bad alarm setting {item!r}: {raw.strip()!r} is not a number"
            ) from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"bad alarm setting {item!r}: must be a number >= 0")
        values[name] = value
    limits = AlarmLimits(**values)
    for name in ("window_s", "db_window_s"):
        if getattr(limits, name) < 1:
            raise ValueError(f"bad alarm setting {name}: must be at least 1 (second)")
    return limits


def default_alarms(limits: AlarmLimits | None = None, **overrides: float) -> list[Alarm]:
    """The old system's alerts. What the supervisor feeds each one:

    - queue_depth: tasks waiting to start (the old system counted tasks; in jobs one
      Pro task alone is 70), for `queue_depth_hold_s` so one burst is not an alarm;
    - api_error_rate: `ErrorRate.ratio` over `window_s` (failed / all calls);
    - db_wait: the longest DB pool wait in the last `db_window_s` (`SlidingWindow.max`);
    - worker_restarts: worker crashes in the last `window_s` (`SlidingWindow.sum`);
    - bad_api_key, insufficient_quota: 1 when an API answer says so, 0 on the next
      success; cleared too after `bad_api_key_clear_s` without a new occurrence;
    - provider_down: raised by the node when its calls stop reaching the provider
      (node/outage.py), cleared when one gets through.
    """
    lim = limits if limits is not None else AlarmLimits()
    if overrides:
        lim = replace(lim, **{_OLD_NAMES.get(k, k): v for k, v in overrides.items()})
    per = f"/{lim.window_s:g}s" if lim.window_s != 60 else "/min"
    return [
        Alarm("queue_depth", "queue depth (tasks)", lim.queue_depth, lim.queue_depth * 0.8,
              min_duration_s=lim.queue_depth_hold_s),
        Alarm("api_error_rate", "API error rate", lim.api_error_rate, lim.api_error_rate * 0.4,
              fmt=_percent),
        Alarm("db_wait", "DB connection wait", lim.db_wait_s, lim.db_wait_s * 0.2, fmt=_seconds),
        Alarm("worker_restarts", "worker restarts", lim.worker_restarts,
              min(1, lim.worker_restarts), fmt=lambda v: f"{v:g}{per}"),
        Alarm("bad_api_key", "API key", 0.5, 0.5, expire_s=lim.bad_api_key_clear_s,
              raise_text="the API rejected the key (401/403)",
              clear_text="an API call succeeded"),
        Alarm("insufficient_quota", "API quota", 0.5, 0.5, expire_s=lim.bad_api_key_clear_s,
              raise_text="the API says the quota is spent (insufficient_quota)",
              clear_text="an API call succeeded"),
        Alarm("provider_down", "provider", 0.5, 0.5, raise_text="calls do not reach the provider",
              clear_text="a call got through"),
    ]  # fmt: skip


def low_disk_alarm(min_free_mb: float) -> Alarm:
    """Fed with the MB --output-dir's free space is short of `min_free_mb` (negative: to
    spare); clears once 10 % more than the limit is free again."""
    return Alarm(
        "low_disk",
        "output dir free space short by",
        0.0,
        -0.1 * min_free_mb,
        fmt=lambda v: f"{v:.0f} MB",
        clear_text="free space is back above the limit",
    )


# keyword names default_alarms() took before AlarmLimits existed
_OLD_NAMES = {
    "restarts_per_minute": "worker_restarts",
    "bad_api_key_expire_s": "bad_api_key_clear_s",
}


@dataclass
class _State:
    active: bool = False
    above_since: float | None = None  # when the value went above raise_above, while it stays
    raised_at: float = 0.0
    last_above: float = 0.0
    reason: str = ""


class Alarms:
    """A set of alarms fed with observations; logs and returns one line per change."""

    def __init__(self, alarms: Iterable[Alarm] | None = None, logger: logging.Logger = log) -> None:
        self._alarms = {a.name: a for a in (default_alarms() if alarms is None else alarms)}
        self._state = {name: _State() for name in self._alarms}
        self._log = logger

    def update(self, name: str, value: float, now: float, detail: str | None = None) -> str | None:
        """Feed one observation; the log line when the alarm raised or cleared, else None.

        `detail` replaces the generated reason (e.g. "401 from the API") when raising."""
        alarm, st = self._alarms[name], self._state[name]
        if value > alarm.raise_above and not math.isnan(value):
            st.last_above = now
            if st.above_since is None:
                st.above_since = now
            reason = detail or alarm.reason(value)
            if st.active:
                st.reason = reason  # keep the figure /readyz shows current
                return None
            if now - st.above_since < alarm.min_duration_s:
                return None
            st.active, st.raised_at, st.reason = True, now, reason
            return self._emit(logging.WARNING, f"alarm {name} raised: {reason}")
        st.above_since = None
        if not st.active:
            return None
        if value < alarm.clear_below:
            return self._clear(name, now, alarm.cleared(value))
        if alarm.clear_below < alarm.raise_above:  # in the hysteresis band
            st.reason = (
                f"{alarm.title} {alarm.fmt(value)}, clears below {alarm.fmt(alarm.clear_below)}"
            )
        return None

    def tick(self, now: float) -> list[str]:
        """Clear the alarms whose `expire_s` ran out; call it every few seconds."""
        lines = []
        for name, alarm in self._alarms.items():
            st = self._state[name]
            if st.active and alarm.expire_s is not None and now - st.last_above >= alarm.expire_s:
                quiet = format_duration(now - st.last_above)
                lines.append(self._clear(name, now, f"no new occurrence for {quiet}"))
        return lines

    def _clear(self, name: str, now: float, why: str) -> str:
        st = self._state[name]
        lasted = format_duration(now - st.raised_at)
        st.active, st.above_since, st.reason = False, None, ""
        return self._emit(logging.INFO, f"alarm {name} cleared after {lasted}: {why}")

    def _emit(self, level: int, line: str) -> str:
        self._log.log(level, "%s", line)
        return line

    def active(self) -> dict[str, str]:
        """Raised alarms and why, for /readyz and `genworker status`."""
        return {name: st.reason for name, st in self._state.items() if st.active}

    def states(self) -> dict[str, bool]:
        """Every alarm, raised or not (for the genworker_alarm_active gauge)."""
        return {name: st.active for name, st in self._state.items()}

    def summary(self) -> str:
        """One short phrase for the STATUS= line; empty when all is well."""
        active = self.active()
        return "ALARM " + "; ".join(active.values()) if active else ""


# ------------------------------------------------------------ sliding windows


class SlidingWindow:
    """Values added over the last `window_s` seconds, kept in `resolution_s` buckets, so
    memory stays bounded at any event rate (edges are exact to one bucket)."""

    def __init__(self, window_s: float = 60.0, resolution_s: float = 1.0) -> None:
        self.window_s = window_s
        self.resolution_s = resolution_s
        self._buckets: deque[list[float]] = deque()  # [bucket number, count, sum, max]

    def _expire(self, now: float) -> None:
        oldest = math.floor((now - self.window_s) / self.resolution_s)
        while self._buckets and self._buckets[0][0] <= oldest:
            self._buckets.popleft()

    def add(self, now: float, value: float = 1.0) -> None:
        self._expire(now)
        key = math.floor(now / self.resolution_s)
        if self._buckets and self._buckets[-1][0] == key:
            b = self._buckets[-1]
            b[1] += 1
            b[2] += value
            b[3] = max(b[3], value)
        else:
            self._buckets.append([key, 1, value, value])

    def count(self, now: float) -> int:
        self._expire(now)
        return int(sum(b[1] for b in self._buckets))

    def sum(self, now: float) -> float:
        self._expire(now)
        return sum(b[2] for b in self._buckets)

    def max(self, now: float) -> float:
        """The largest value in the window; 0.0 when it is empty."""
        self._expire(now)
        return max((b[3] for b in self._buckets), default=0.0)


class ErrorRate:
    """Failed / all calls over a window. Below `min_calls` it reads 0: one failure in
    two calls is not a 50 % outage."""

    def __init__(self, window_s: float = 60.0, min_calls: int = 20) -> None:
        self.min_calls = min_calls
        self._calls = SlidingWindow(window_s)
        self._errors = SlidingWindow(window_s)

    def record(self, now: float, ok: bool) -> None:
        self.record_counts(now, 1, 0 if ok else 1)

    def record_counts(self, now: float, calls: float, errors: float) -> None:
        """Add `calls` calls, `errors` of which failed (counters sampled every second)."""
        if calls > 0:
            self._calls.add(now, calls)
        if errors > 0:
            self._errors.add(now, errors)

    def calls(self, now: float) -> float:
        return self._calls.sum(now)

    def ratio(self, now: float) -> float:
        calls = self._calls.sum(now)
        if calls < self.min_calls:
            return 0.0
        return self._errors.sum(now) / calls
