"""Alarms: each default fires and clears with exactly one log line each, with hysteresis."""

from __future__ import annotations

import logging

import pytest
from genworker.ops.alarms import Alarm, Alarms, ErrorRate, SlidingWindow, format_duration


def alarm_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "genworker.alarms"]


@pytest.fixture
def caplog_alarms(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="genworker.alarms")
    return caplog


def test_queue_depth_needs_half_a_minute_above_50_and_clears_below_40(
    caplog_alarms: pytest.LogCaptureFixture,
) -> None:
    alarms = Alarms()
    assert alarms.update("queue_depth", 80, now=0) is None  # a burst: not yet
    assert alarms.update("queue_depth", 30, now=10) is None  # and gone
    for t in range(100, 131, 5):
        alarms.update("queue_depth", 63, now=t)
    assert alarms.active() == {"queue_depth": "queue depth (tasks) 63 > 50"}
    for depth in (45, 55, 41, 40):  # inside the band it stays raised, and says so
        alarms.update("queue_depth", depth, now=140)
    assert alarms.active() == {"queue_depth": "queue depth (tasks) 40, clears below 40"}
    alarms.update("queue_depth", 39, now=160)
    assert alarms.active() == {}
    assert alarm_lines(caplog_alarms) == [
        (logging.WARNING, "alarm queue_depth raised: queue depth (tasks) 63 > 50"),
        (logging.INFO, "alarm queue_depth cleared after 30s: queue depth (tasks) 39"),
    ]


def test_api_error_rate_over_a_minute(caplog_alarms: pytest.LogCaptureFixture) -> None:
    alarms, rate = Alarms(), ErrorRate(window_s=60, min_calls=20)
    for i in range(100):  # 10 % of calls fail
        rate.record(now=i * 0.5, ok=i % 10 != 0)
        alarms.update("api_error_rate", rate.ratio(now=i * 0.5), now=i * 0.5)
    assert "api_error_rate" in alarms.active()
    for i in range(100, 400):  # then all succeed; the failures age out of the window
        rate.record(now=i * 0.5, ok=True)
        alarms.update("api_error_rate", rate.ratio(now=i * 0.5), now=i * 0.5)
    assert alarms.active() == {}
    lines = alarm_lines(caplog_alarms)
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO]
    assert lines[0][1].startswith("alarm api_error_rate raised: API error rate ")
    assert lines[0][1].endswith("> 5.0%")
    assert lines[1][1].startswith("alarm api_error_rate cleared after ")


def test_db_wait_is_the_longest_wait_of_the_last_minute(
    caplog_alarms: pytest.LogCaptureFixture,
) -> None:
    alarms, waits = Alarms(), SlidingWindow(60)
    waits.add(now=0, value=0.01)
    waits.add(now=1, value=7.5)
    alarms.update("db_wait", waits.max(now=2), now=2)
    waits.add(now=30, value=0.02)
    alarms.update("db_wait", waits.max(now=30), now=30)  # 7.5 s is still in the window
    alarms.update("db_wait", waits.max(now=62), now=62)
    assert alarm_lines(caplog_alarms) == [
        (logging.WARNING, "alarm db_wait raised: DB connection wait 7.5s > 5.0s"),
        (logging.INFO, "alarm db_wait cleared after 1m00s: DB connection wait 0.0s"),
    ]


def test_worker_restarts_per_minute(caplog_alarms: pytest.LogCaptureFixture) -> None:
    alarms, restarts = Alarms(), SlidingWindow(60)
    for t in range(6):
        restarts.add(now=t * 5)
        alarms.update("worker_restarts", restarts.count(now=t * 5), now=t * 5)
    assert alarms.active() == {"worker_restarts": "worker restarts 6/min > 5/min"}
    alarms.update("worker_restarts", restarts.count(now=70), now=70)  # 1 left: not yet
    assert "worker_restarts" in alarms.active()
    alarms.update("worker_restarts", restarts.count(now=90), now=90)  # a quiet minute
    assert alarm_lines(caplog_alarms) == [
        (logging.WARNING, "alarm worker_restarts raised: worker restarts 6/min > 5/min"),
        (logging.INFO, "alarm worker_restarts cleared after 1m05s: worker restarts 0/min"),
    ]


def test_bad_api_key_clears_on_the_next_success(caplog_alarms: pytest.LogCaptureFixture) -> None:
    alarms = Alarms()
    alarms.update("bad_api_key", 1, now=0, detail="401 Unauthorized from the API")
    alarms.update("bad_api_key", 1, now=1, detail="403 Forbidden from the API")  # still one line
    assert alarms.active() == {"bad_api_key": "403 Forbidden from the API"}
    alarms.update("bad_api_key", 0, now=5)
    alarms.update("bad_api_key", 0, now=6)
    assert alarm_lines(caplog_alarms) == [
        (logging.WARNING, "alarm bad_api_key raised: 401 Unauthorized from the API"),
        (logging.INFO, "alarm bad_api_key cleared after 5s: an API call succeeded"),
    ]


def test_bad_api_key_clears_after_a_quiet_while(caplog_alarms: pytest.LogCaptureFixture) -> None:
    alarms = Alarms()
    alarms.update("bad_api_key", 1, now=0)
    assert alarms.tick(now=299) == []
    assert alarms.tick(now=300) == [
        "alarm bad_api_key cleared after 5m00s: no new occurrence for 5m00s"
    ]
    assert alarms.tick(now=400) == []
    assert [level for level, _ in alarm_lines(caplog_alarms)] == [logging.WARNING, logging.INFO]
    assert "the API rejected the key" in alarm_lines(caplog_alarms)[0][1]


def test_a_value_hovering_at_the_threshold_does_not_flap(
    caplog_alarms: pytest.LogCaptureFixture,
) -> None:
    alarms = Alarms([Alarm("x", "x", raise_above=10, clear_below=5)])
    for t, v in enumerate([11, 9, 11, 9, 11, 6, 10, 4, 9, 11]):
        alarms.update("x", v, now=t)
    assert [level for level, _ in alarm_lines(caplog_alarms)] == [
        logging.WARNING,  # 11
        logging.INFO,  # 4
        logging.WARNING,  # 11 again
    ]


def test_summary_states_and_returned_lines() -> None:
    alarms = Alarms()
    assert alarms.summary() == ""
    line = alarms.update("db_wait", 6, now=0)
    assert line == "alarm db_wait raised: DB connection wait 6.0s > 5.0s"
    assert alarms.summary() == "ALARM DB connection wait 6.0s > 5.0s"
    assert alarms.states() == {
        "queue_depth": False,
        "api_error_rate": False,
        "db_wait": True,
        "worker_restarts": False,
        "bad_api_key": False,
        "insufficient_quota": False,
        "provider_down": False,
    }


def test_thresholds_are_configurable_and_checked() -> None:
    from genworker.ops.alarms import default_alarms

    alarms = Alarms(default_alarms(queue_depth=5))
    alarms.update("queue_depth", 6, now=0)
    alarms.update("queue_depth", 6, now=30)
    assert "queue_depth" in alarms.active()
    with pytest.raises(ValueError, match="clear_below"):
        Alarm("bad", "bad", raise_above=1, clear_below=2)
    with pytest.raises(KeyError):
        alarms.update("no_such_alarm", 1, now=0)


def test_sliding_window_forgets_after_the_window_and_stays_small() -> None:
    w = SlidingWindow(window_s=60)
    for i in range(100_000):  # ~1,700 events a second
        w.add(now=i * 0.0006, value=1.0)
    assert w.count(now=59.9995) == 100_000
    assert 95_000 < w.count(now=61) < 100_000  # the first second aged out
    assert len(w._buckets) <= 61
    assert w.count(now=200) == 0
    assert w.sum(now=200) == 0.0
    assert w.max(now=200) == 0.0


def test_error_rate_ignores_too_few_calls() -> None:
    rate = ErrorRate(min_calls=20)
    rate.record(now=0, ok=False)
    rate.record(now=0, ok=True)
    assert rate.ratio(now=1) == 0.0
    for _ in range(18):
        rate.record(now=1, ok=True)
    assert rate.ratio(now=1) == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59.6, "1m00s"), (125, "2m05s"), (3725, "1h02m")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_limits_parse_from_the_setting_and_name_a_bad_item() -> None:
    from genworker.ops.alarms import AlarmLimits, default_alarms, parse_limits

    assert parse_limits("") == AlarmLimits()
    limits = parse_limits(" queue_depth=5, window_s=10 ,queue_depth_hold_s=0")
    assert (limits.queue_depth, limits.window_s, limits.queue_depth_hold_s) == (5, 10, 0)
    assert parse_limits(AlarmLimits().to_text()) == AlarmLimits()
    for bad, says in [
        ("queue_depth", "name=value"),
        ("depth=5", "name=value"),
        ("queue_depth=lots", "not a number"),
        ("db_wait_s=-1", ">= 0"),
        ("window_s=0", "at least 1"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_limits(bad)
    restarts = {a.name: a for a in default_alarms(limits)}["worker_restarts"]
    assert restarts.reason(7) == "worker restarts 7/10s > 5/10s"


def test_quota_is_an_alarm_of_its_own(caplog_alarms: pytest.LogCaptureFixture) -> None:
    alarms = Alarms()
    alarms.update("insufficient_quota", 1, now=0)
    assert set(alarms.active()) == {"insufficient_quota"}
    alarms.update("insufficient_quota", 0, now=5)
    assert alarm_lines(caplog_alarms) == [
        (
            logging.WARNING,
            "alarm insufficient_quota raised: the API says the quota is spent (insufficient_quota)",
        ),
        (logging.INFO, "alarm insufficient_quota cleared after 5s: an API call succeeded"),
    ]


def test_error_rate_takes_sampled_counts() -> None:
    rate = ErrorRate(window_s=10, min_calls=20)
    rate.record_counts(now=0, calls=15, errors=3)
    assert rate.ratio(now=0.5) == 0.0  # 15 calls: too few to say
    rate.record_counts(now=1, calls=15, errors=0)
    assert rate.ratio(now=1.5) == pytest.approx(0.1)
    assert rate.calls(now=1.5) == 30
    assert rate.ratio(now=12) == 0.0  # the window moved past both samples
