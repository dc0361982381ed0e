"""The node's operations without processes: what the tick feeds the alarms, when READY=1
goes out, the STATUS line, readiness, the pool's waits and the finished-task watermark."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from exposition import parse, value
from genworker import channels as ch
from genworker.config import Settings
from genworker.logs import Redactor
from genworker.node.feeder import FeederStats
from genworker.node.handles import State
from genworker.ops import service as ops_module
from genworker.ops.metrics import DB_WAIT_BUCKETS_S
from genworker.ops.readings import DbFigures, PoolWaits, latency_counts
from genworker.ops.service import Ops

COUNTERS = list(ch.COUNTER_FIELDS)


@dataclass
class FakeHandle:
    position: int
    state: State = State.READY
    jobs: dict[int, Any] = field(default_factory=dict)
    slot: list[float] = field(default_factory=lambda: [0.0] * ch.SLOT_DOUBLES)

    def counter(self, index: int) -> float:
        return self.slot[index]


class FakePool:
    def __init__(self) -> None:
        self.stats: dict[str, int] = {"pool_size": 2, "pool_available": 2}

    def get_stats(self) -> dict[str, int]:
        return dict(self.stats)


@dataclass
class FakeFeeder:
    pool: FakePool = field(default_factory=FakePool)
    db_ok: bool = True
    db_problem: str = "unreachable"
    stats: FeederStats = field(default_factory=FeederStats)
    buffer: list[Any] = field(default_factory=list)
    suspects: list[Any] = field(default_factory=list)
    pending: list[Any] = field(default_factory=list)
    live_nodes: int = 1

    def jobs_held(self) -> dict[str, int]:
        return {"buffer": len(self.buffer) + len(self.suspects), "writing": len(self.pending)}


class FakeArbiter:
    def __init__(self, workers: int = 2) -> None:
        self.settings = Settings()
        self.target = workers
        self.handles = [FakeHandle(i) for i in range(workers)]
        self.feeder = FakeFeeder()
        self.retired = [0.0] * ch.SLOT_DOUBLES
        self.restarts_by_reason: dict[str, int] = {}
        self.stops_by_reason: dict[str, int] = {}
        self.stopping = self.reloading = self.degraded = False
        self.positions: dict[int, Any] = {}
        self.monitored_at = 0.0

    def live_handles(self) -> list[FakeHandle]:
        return self.handles

    def totals(self) -> dict[str, float]:
        return {
            name: self.retired[i] + sum(h.slot[i] for h in self.handles)
            for name, i in ch.COUNTER_FIELDS.items()
        }

    def count(self, field_index: int, n: float, worker: int = 0) -> None:
        self.handles[worker].slot[field_index] += n


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """What would have gone to systemd."""
    out: list[tuple[str, ...]] = []
    monkeypatch.setattr(ops_module.systemd, "notify", lambda *lines: out.append(lines) or True)
    return out


def make_ops(alarms: str = "window_s=10", **kw: Any) -> tuple[Ops, FakeArbiter]:
    ops = Ops(Settings(alarms=alarms, **kw), redactor=Redactor(["sk-secretkey123"]))
    arbiter = FakeArbiter()
    ops.arbiter = arbiter
    return ops, arbiter


def test_ready_goes_out_once_when_the_database_and_every_worker_are_up(
    sent: list[tuple[str, ...]],
) -> None:
    ops, a = make_ops()
    a.feeder.db_ok = False
    ops.tick(1.0)
    a.feeder.db_ok = True
    a.handles[1].state = State.SPAWNING
    ops.tick(2.0)
    assert sent == []
    a.handles[1].state = State.READY
    ops.tick(3.0)
    ops.tick(4.0)
    assert sent == [("READY=1", "STATUS=2/2 workers, 0 jobs in flight, 0 done, 0 dead")]


def test_the_error_rate_counts_overload_not_refusals(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="genworker.alarms")
    ops, a = make_ops()
    ops.tick(0.0)
    a.count(ch.API_2XX, 50)
    a.count(ch.API_4XX, 50)  # content-policy refusals: calls, not errors
    ops.tick(1.0)
    assert "api_error_rate" not in ops.alarms.active()
    a.count(ch.API_5XX, 5)
    a.count(ch.API_TIMEOUT, 3, worker=1)
    ops.tick(2.0)
    assert ops.alarms.active()["api_error_rate"] == "API error rate 7.4% > 5.0%"
    ops.tick(13.0)  # the window (10 s) moved past every call
    assert "api_error_rate" not in ops.alarms.active()
    lines = [r.getMessage() for r in caplog.records if "api_error_rate" in r.getMessage()]
    assert len(lines) == 2


def test_restarts_count_crashes_not_planned_replacements() -> None:
    ops, a = make_ops("worker_restarts=2,window_s=10")
    ops.tick(0.0)
    a.stops_by_reason["reload"] = 8  # a HUP replaced every worker: no alarm
    ops.tick(1.0)
    assert "worker_restarts" not in ops.alarms.active()
    a.restarts_by_reason.update(exit=2, signal=1)
    ops.tick(2.0)
    assert ops.alarms.active()["worker_restarts"] == "worker restarts 3/10s > 2/10s"
    ops.tick(12.5)
    assert "worker_restarts" not in ops.alarms.active()


def test_a_key_alarm_clears_on_the_next_success_and_never_shows_the_key() -> None:
    ops, a = make_ops()
    ops.tick(0.0)
    ops.alarm("bad_api_key", "HTTP 401: Incorrect API key provided: sk-secretkey123")
    reason = ops.alarms.active()["bad_api_key"]
    assert "sk-secretkey123" not in reason
    assert reason.endswith("(claims paused)")
    ready, reasons = ops.readiness()
    assert not ready
    assert reasons[0].startswith("alarm bad_api_key: HTTP 401")
    ops.tick(1.0)  # no success yet
    assert "bad_api_key" in ops.alarms.active()
    a.count(ch.API_2XX, 1)
    ops.tick(2.0)
    assert ops.alarms.active() == {}
    ops.alarm("no_such_alarm", "from a newer worker")  # logged, not raised
    assert ops.alarms.active() == {}


def test_db_wait_sees_both_served_waits_and_ongoing_ones() -> None:
    ops, a = make_ops("db_wait_s=2,db_window_s=5")
    s = a.feeder.pool.stats
    ops.tick(0.0)
    s.update(requests_num=10, requests_queued=2, requests_wait_ms=6000)  # 3 s each
    ops.tick(1.0)
    assert ops.alarms.active()["db_wait"] == "DB connection wait 3.0s > 2.0s"
    ops.tick(7.0)
    assert "db_wait" not in ops.alarms.active()
    s.update(requests_waiting=1)  # one waits and is not served yet
    for t in (8.0, 9.0, 10.0, 11.0):
        ops.tick(t)
    assert ops.alarms.active()["db_wait"] == "DB connection wait 3.0s > 2.0s"


def test_readiness_and_status_name_every_reason(sent: list[tuple[str, ...]]) -> None:
    ops, a = make_ops()
    assert ops.readiness() == (True, [])
    a.feeder.db_ok = False
    a.handles[0].state = State.SPAWNING
    a.degraded = True
    a.positions = {0: type("P", (), {"held_back": True})()}
    ready, reasons = ops.readiness()
    assert not ready
    assert reasons == [
        "database unreachable",
        "workers down: 1 of 2",
        "degraded: 1 crash-looping workers held back",
    ]
    a.stopping = True
    assert ops.readiness()[1][0] == "stopping"
    assert ops.status_line() == (
        "stopping: 1/2 workers, 0 jobs in flight, 0 done, 0 dead, database unreachable, degraded"
    )


def test_a_long_drain_asks_for_more_time_every_few_seconds(
    sent: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ops, a = make_ops()
    now = [100.0]
    monkeypatch.setattr(ops_module.time, "monotonic", lambda: now[0])
    ops.stopping(a)
    for t in (101.0, 104.0, 105.5, 107.0, 110.6, 111.0):
        now[0] = t
        ops.draining(seconds_left=130 - t)
    extends = [lines[0] for lines in sent if lines[0].startswith("EXTEND")]
    assert extends == [
        f"EXTEND_TIMEOUT_USEC={int((130 - 105.5 + 20) * 1e6)}",
        f"EXTEND_TIMEOUT_USEC={int((130 - 110.6 + 20) * 1e6)}",
    ]
    assert sent[0][0] == "STOPPING=1"


def test_metrics_text_reads_memory_only_and_parses() -> None:
    ops, a = make_ops()
    a.count(ch.API_2XX, 3)
    a.count(ch.API_429, 2)
    a.count(ch.LIMIT, 4)
    a.count(ch.INFLIGHT, 6)  # more held than the limit: busy is the limit
    a.feeder.stats.claimed = 7
    a.feeder.buffer = [1, 2]
    a.restarts_by_reason["signal"] = 1
    a.stops_by_reason["recycle"] = 2
    _, samples = parse(ops.metrics_text())
    assert value(samples, "genworker_jobs_claimed_total") == 7
    assert value(samples, "genworker_api_responses_total", status_class="4xx") == 2
    assert value(samples, "genworker_api_rate_limited_total") == 2
    assert value(samples, "genworker_worker_slots_limit", worker="0") == 4
    assert value(samples, "genworker_worker_slots_busy", worker="0") == 4
    assert value(samples, "genworker_jobs_in_flight", where="buffer") == 2
    assert value(samples, "genworker_worker_restarts_total", reason="signal") == 1
    assert value(samples, "genworker_worker_restarts_total", reason="recycle") == 2
    assert value(samples, "genworker_ready") == 1
    assert value(samples, "genworker_alarm_active", alarm="queue_depth") == 0


def test_latency_buckets_become_per_bucket_counts_with_retired_workers() -> None:
    a = FakeArbiter()
    for seconds, worker in ((0.01, 0), (0.3, 0), (0.3, 1), (500.0, 1)):
        slot = a.handles[worker].slot
        slot[ch.LATENCY_SUM] += seconds
        slot[ch.LATENCY_COUNT] += 1
        for i, bound in enumerate(ch.LATENCY_BUCKETS_S):
            if seconds <= bound:
                slot[ch.LATENCY_BUCKET0 + i] += 1
    a.retired[ch.LATENCY_COUNT] += 1  # a gone worker's call of 0.02 s
    a.retired[ch.LATENCY_SUM] += 0.02
    for i in range(len(ch.LATENCY_BUCKETS_S)):
        a.retired[ch.LATENCY_BUCKET0 + i] += 1
    counts, total = latency_counts(a)
    assert len(counts) == len(ch.LATENCY_BUCKETS_S) + 1
    assert counts[0] == 2  # 0.01 and 0.02 <= 0.025
    assert counts[ch.LATENCY_BUCKETS_S.index(0.5)] == 2
    assert counts[-1] == 1  # 500 s: +Inf only
    assert sum(counts) == 5
    assert total == pytest.approx(500.63)


def test_pool_waits_bucket_the_queued_requests_at_their_mean() -> None:
    w = PoolWaits.for_buckets(len(DB_WAIT_BUCKETS_S))
    assert w.sample({"requests_num": 5}, 0.0, DB_WAIT_BUCKETS_S) == 0.0
    got = w.sample(
        {"requests_num": 9, "requests_queued": 2, "requests_wait_ms": 400,
         "pool_size": 4, "pool_available": 1},
        1.0,
        DB_WAIT_BUCKETS_S,
    )  # fmt: skip
    assert got == pytest.approx(0.2)
    assert w.counts[0] == 5 + 2  # served at once
    assert w.counts[DB_WAIT_BUCKETS_S.index(0.25)] == 2
    assert sum(w.counts) == 9
    assert w.total_s == pytest.approx(0.4)
    assert (w.size, w.idle) == (4, 1)


def test_finished_tasks_are_counted_once_across_overlapping_reads() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    f = DbFigures(since=t0)
    rows = [
        (1, "free", 3.0, t0 + timedelta(seconds=1), "succeeded"),
        (2, "pro", 90.0, t0 + timedelta(seconds=2), "failed"),
    ]
    f._take_finished(rows)
    f._take_finished([*rows, (3, "free", 4.0, t0 + timedelta(seconds=3), "succeeded")])  # overlap
    assert f.finished == [("free", "succeeded", 3.0), ("pro", "failed", 90.0),
                          ("free", "succeeded", 4.0)]  # fmt: skip
    assert f.since == t0 + timedelta(seconds=3)
    late = t0 + timedelta(seconds=30)
    f._take_finished([(4, "start", 5.0, late, "cancelled")])
    assert set(f.seen) == {4}  # older ones fell behind the overlap: forgotten
    f._take_finished([(1, "free", 3.0, t0 + timedelta(seconds=1), "succeeded")])  # too old
    assert len(f.finished) == 4
