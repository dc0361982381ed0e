"""The demo's figures: nearest-rank percentiles, per-plan times, rates and ratios."""

from __future__ import annotations

import io

import pytest
from genworker.demo.report import TaskFigure, figures, percentile, ratios, render
from rich.console import Console


def task(plan: str, arrival: float, wait: float, done: float, images: int = 2) -> TaskFigure:
    return TaskFigure(plan, arrival, wait, done, images, True, 0)


def test_percentiles_are_values_some_task_really_saw() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert percentile(values, 50) == 10.0
    assert percentile(values, 95) == 19.0
    assert percentile(values, 100) == 20.0
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 50) is None


def test_figures_per_plan_and_for_the_morning() -> None:
    tasks = [task("free", 0.0, 0.5, 1.0), task("free", 1.0, 0.1, 2.0), task("pro", 0.0, 0, 4, 70)]
    fig = figures(tasks, slots=10, busy_slot_s=20.0, plans=("free", "start", "pro"))
    assert list(fig["plans"]) == ["free", "pro"]  # plans with no task are left out
    assert fig["plans"]["free"]["wait_s"] == {"p50": 0.1, "p95": 0.5, "max": 0.5}
    assert fig["plans"]["free"]["completion_s"]["max"] == 2.0
    assert fig["makespan_s"] == 4.0  # first submit to the last image (task 2 ends at 3.0)
    assert fig["images"] == 74
    assert fig["images_per_s"] == 18.5
    assert fig["tasks_per_min"] == 45.0
    assert fig["slot_utilisation"] == 0.5


def test_unknown_busy_time_gives_no_utilisation_rather_than_a_guess() -> None:
    fig = figures([task("free", 0, 0, 1)], slots=10, busy_slot_s=None, plans=("free",))
    assert fig["slot_utilisation"] is None


def test_ratios_say_how_many_times_better_genworker_is() -> None:
    plans = ("free",)
    ours = figures([task("free", 0, 0.5, 1.0)], slots=40, busy_slot_s=30, plans=plans)
    old = figures([task("free", 0, 5.0, 6.0)], slots=40, busy_slot_s=20, plans=plans)
    r = ratios(ours, old)
    assert r["plans"]["free"]["wait_s_p95"] == 10.0  # old / ours for times
    assert r["plans"]["free"]["completion_s_max"] == 6.0
    assert r["makespan"] == 6.0
    assert r["images_per_s"] == pytest.approx(6.0, rel=0.02)  # ours / old for rates
    assert r["slot_utilisation"] == pytest.approx(9.0, rel=0.02)


def test_two_instant_times_are_equal_not_infinitely_better() -> None:
    ours = figures([task("free", 0, 0.01, 1.0)], slots=40, busy_slot_s=2, plans=("free",))
    old = figures([task("free", 0, 0.0, 1.0)], slots=40, busy_slot_s=2, plans=("free",))
    assert ratios(ours, old)["plans"]["free"]["wait_s_p50"] == 1.0


def test_the_summary_lists_every_plan_and_both_designs() -> None:
    plans = ("free", "start", "pro")
    tasks = [task("free", 0, 0.1, 1), task("start", 0, 0.1, 2, 30), task("pro", 0, 0.1, 3, 70)]
    ours = figures(tasks, slots=40, busy_slot_s=50, plans=plans)
    old = figures(tasks, slots=40, busy_slot_s=50, plans=plans)
    old["model"] = {"workers": 8, "calls_per_worker": 5, "queue": "fifo"}
    scenario = {"pro": 1, "free": 1, "start": 1, "window_s": 0, "latency_ms": 1000}
    doc = {
        "ok": True,
        "scenario": {**scenario, "jitter_ms": 0, "fail_rate": 0.0},
        "genworker": ours,
        "old_design": old,
        "ratios": ratios(ours, old),
    }
    out = io.StringIO()
    render(doc, Console(file=out, width=80))
    text = out.getvalue()
    for word in ("free", "start", "pro", "genworker", "old design", "slot utilisation"):
        assert word in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_a_ratio_where_we_are_slower_says_slower_by() -> None:
    from genworker.demo.report import _times

    assert _times(2.5) == "2.5x"
    assert _times(0.5) == "[red]slower by 2.0x[/]"
    assert _times(0.05) == "[red]slower by 20x[/]"
    assert _times(0.0) == "[red]slower[/]"
    assert "better" not in _times(0.01)
