"""`genworker status` from the documents alone: rates between heartbeats, one screen."""

from __future__ import annotations

import io
from typing import Any

from genworker.ops.status import _rates, status_view
from rich.console import Console


def node(heartbeat: str, done: float, errors: float, **info: Any) -> dict[str, Any]:
    return {
        "id": "n1",
        "status": "alive",
        "workers": 4,
        "ready_workers": 3,
        "api_in_flight": 7,
        "started_at": "2026-01-01T10:00:00+00:00",
        "heartbeat_at": heartbeat,
        "heartbeat_age_s": 1.0,
        "uptime_s": 100.0,
        "info": {"totals": {"done": done, "api_2xx": done, "api_5xx": errors}, **info},
    }


def doc_with(*nodes: dict[str, Any]) -> dict[str, Any]:
    return {"queue": {}, "in_flight": 0, "tasks": {}, "nodes": list(nodes), "alarms": []}


def test_one_look_divides_by_the_nodes_uptime() -> None:
    doc = doc_with(node("2026-01-01T10:01:40+00:00", 500, 25))
    rates = _rates(doc, None)["rates"]
    assert rates == {
        "window": "since the node started",
        "images_per_s": 5.0,
        "api_error_rate": round(25 / 525, 4),
    }


def test_watching_divides_by_the_time_between_heartbeats_and_keeps_it_until_the_next() -> None:
    first = doc_with(node("2026-01-01T10:01:40+00:00", 500, 25))
    first.update(_rates(first, None))
    second = doc_with(node("2026-01-01T10:01:50+00:00", 600, 25))
    second.update(_rates(second, first))
    assert second["rates"]["images_per_s"] == 10.0  # 100 images in 10 s
    assert second["rates"]["api_error_rate"] == 0.0
    assert second["rates"]["window"] == "between heartbeats"
    same = doc_with(node("2026-01-01T10:01:50+00:00", 600, 25))  # no heartbeat since
    same.update(_rates(same, second))
    assert same["rates"]["images_per_s"] == 10.0


def test_a_restarted_node_starts_its_window_again() -> None:
    before = doc_with(node("2026-01-01T10:01:40+00:00", 500, 0))
    before.update(_rates(before, None))
    restarted = node("2026-01-01T10:02:00+00:00", 20, 0)
    restarted["started_at"] = "2026-01-01T10:01:55+00:00"
    restarted["uptime_s"] = 5.0
    after = doc_with(restarted)
    assert _rates(after, before)["rates"]["images_per_s"] == 4.0


def test_the_screen_shows_workers_health_and_alarms() -> None:
    n = node("2026-01-01T10:01:40+00:00", 500, 25, degraded=True, db_ok=False)
    n["info"]["alarms"] = {"api_error_rate": "API errors 4.8% over 60s"}
    doc = doc_with(n)
    doc.update(_rates(doc, None))
    doc["alarms"] = [{"node": "n1", "name": "api_error_rate", "detail": "API errors 4.8% over 60s"}]
    doc["queue"] = {"pro": {"queued": 70, "scheduled": 0, "running": 10}}
    out = io.StringIO()
    Console(file=out, width=100).print(status_view(doc))
    text = out.getvalue()
    for words in ("pro", "70", "3/4 ready", "degraded", "db down", "ALARM api_error_rate",
                  "5 images/s", "4.8%"):  # fmt: skip
        assert words in text, words
    assert len(text.splitlines()) < 30  # one screen
