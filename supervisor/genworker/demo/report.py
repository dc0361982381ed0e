"""The demo's figures: per plan wait and completion times, throughput, slot use.

Both designs are measured the same way, from the same arrivals: `wait` is
submit -> first image started, `completion` is submit -> last image done,
`makespan` is first submit -> last image of the morning. Percentiles are
nearest-rank, so every figure is a time some task really saw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

TIMES = ("wait_s", "completion_s")


@dataclass(frozen=True)
class TaskFigure:
    plan: str
    arrival_s: float  # since the first submit
    wait_s: float | None  # None: the task never started
    completion_s: float | None  # None: the task did not finish
    images: int
    succeeded: bool
    retries: int


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of values; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": _r(percentile(values, 50)),
        "p95": _r(percentile(values, 95)),
        "max": _r(max(values) if values else None),
    }


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def figures(
    tasks: Sequence[TaskFigure], *, slots: int, busy_slot_s: float | None, plans: Sequence[str]
) -> dict[str, Any]:
    """One design's figures, as the JSON document's `genworker` / `old_design` part."""
    by_plan: dict[str, Any] = {}
    for plan in plans:
        mine = [t for t in tasks if t.plan == plan]
        if not mine:
            continue
        by_plan[plan] = {
            "tasks": len(mine),
            "images": sum(t.images for t in mine),
            "succeeded": sum(t.succeeded for t in mine),
            "wait_s": distribution([t.wait_s for t in mine if t.wait_s is not None]),
            "completion_s": distribution(
                [t.completion_s for t in mine if t.completion_s is not None]
            ),
            "retries": sum(t.retries for t in mine),
        }
    ends = [t.arrival_s + t.completion_s for t in tasks if t.completion_s is not None]
    makespan = max(ends) - min(t.arrival_s for t in tasks) if ends else None
    images = sum(t.images for t in tasks)
    utilisation = None
    if busy_slot_s is not None and makespan:
        utilisation = busy_slot_s / (slots * makespan)
    return {
        "plans": by_plan,
        "tasks": len(tasks),
        "images": images,
        "succeeded": sum(t.succeeded for t in tasks),
        "retries": sum(t.retries for t in tasks),
        "slots": slots,
        "makespan_s": _r(makespan),
        "images_per_s": _r(images / makespan if makespan else None),
        "tasks_per_min": _r(len(tasks) * 60 / makespan if makespan else None),
        "busy_slot_s": _r(busy_slot_s, 1),
        "slot_utilisation": _r(utilisation, 4),
    }


TIE_S = 0.05  # two times both under this are the same to a user: the ratio says 1


def _ratio(num: float | None, den: float | None, *, times: bool = False) -> float | None:
    if num is None or den is None:
        return None
    if times and num < TIE_S and den < TIE_S:
        return 1.0
    if den <= 0:
        return None
    return round(num / den, 2)


def ratios(ours: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """How many times better genworker is: old/ours for times, ours/old for rates."""
    plans = {}
    for plan, mine in ours["plans"].items():
        theirs = old["plans"].get(plan)
        if theirs is None:
            continue
        plans[plan] = {
            f"{what}_{q}": _ratio(theirs[what][q], mine[what][q], times=True)
            for what in TIMES
            for q in ("p50", "p95", "max")
        }
    return {
        "plans": plans,
        "makespan": _ratio(old["makespan_s"], ours["makespan_s"], times=True),
        "images_per_s": _ratio(ours["images_per_s"], old["images_per_s"]),
        "tasks_per_min": _ratio(ours["tasks_per_min"], old["tasks_per_min"]),
        "slot_utilisation": _ratio(ours["slot_utilisation"], old["slot_utilisation"]),
    }


# ------------------------------------------------------------------ rendering


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 10:
        return f"{x:.2f}s"
    return f"{x:.1f}s" if x < 100 else f"{x:.0f}s"


def _times(x: float | None) -> str:
    """A ratio old/ours in the "better by" column; below 1 we are slower, and say so."""
    if x is None:
        return "-"
    if x < 1:
        if x <= 0:
            return "[red]slower[/]"  # the old design took no time at all (a wait of 0 s)
        slower = 1 / x
        return (
            f"[red]slower by {slower:.0f}x[/]"
            if slower >= 10
            else f"[red]slower by {slower:.1f}x[/]"
        )
    return f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"


def plan_table(doc: dict[str, Any]) -> Table:
    ours, old, ratio = doc["genworker"], doc["old_design"], doc["ratios"]
    table = Table(
        title="wait: submit -> first image claimed;  done: submit -> last image finished",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    table.add_column("plan / design", no_wrap=True)
    table.add_column("tasks", justify="right", no_wrap=True)
    for what in ("wait", "done"):
        for q in ("p50", "p95", "max"):
            table.add_column(f"{what}\n{q}", justify="right", no_wrap=True)
    for plan, mine in ours["plans"].items():
        theirs = old["plans"].get(plan)
        ok = f"{mine['succeeded']}/{mine['tasks']}"
        table.add_row(f"[bold]{plan:<6}[/]genworker", ok, *_dist_cells(mine))
        if theirs is None:
            continue
        table.add_row("      old design", str(theirs["tasks"]), *_dist_cells(theirs))
        r = ratio["plans"].get(plan, {})
        xs = [r.get(f"{w}_{q}") for w in TIMES for q in ("p50", "p95", "max")]
        better = [_times(x) if x is None or x >= 1 else "" for x in xs]
        slower = [_slower(x) if x is not None and x < 1 else "" for x in xs]
        if any(slower):  # two short rows: the table stays narrow enough for 80 columns
            table.add_row("      [green]better by[/]", "", *better)
            table.add_row("      [red]slower by[/]", "", *slower, end_section=True)
        else:
            table.add_row("      [green]better by[/]", "", *better, end_section=True)
    return table


def _slower(x: float) -> str:
    """How many times slower we are, for a ratio old/ours under 1."""
    if x <= 0:
        return "[red]-[/]"  # the old design took no time at all (a wait of 0 s)
    return f"[red]{_times(1 / x)}[/]"


def _dist_cells(fig: dict[str, Any]) -> list[str]:
    return [_secs(fig[w][q]) for w in TIMES for q in ("p50", "p95", "max")]


def overall_table(doc: dict[str, Any]) -> Table:
    ours, old, ratio = doc["genworker"], doc["old_design"], doc["ratios"]
    table = Table(title="the whole morning", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("", "genworker", "old design", "better by"):
        table.add_column(col, justify="left" if not col else "right", no_wrap=True)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    table.add_row(
        "makespan", _secs(ours["makespan_s"]), _secs(old["makespan_s"]), _times(ratio["makespan"])
    )
    table.add_row(
        "images/s",
        num(ours["images_per_s"]),
        num(old["images_per_s"]),
        _times(ratio["images_per_s"]),
    )
    table.add_row(
        "tasks/min",
        num(ours["tasks_per_min"]),
        num(old["tasks_per_min"]),
        _times(ratio["tasks_per_min"]),
    )
    table.add_row(
        "slot utilisation",
        pct(ours["slot_utilisation"]),
        pct(old["slot_utilisation"]),
        _times(ratio["slot_utilisation"]),
    )
    table.add_row("API slots", str(ours["slots"]), str(old["slots"]), "")
    table.add_row("retries", str(ours["retries"]), str(old["retries"]), "")
    return table


def render(doc: dict[str, Any], console: Console) -> None:
    s = doc["scenario"]
    console.print()
    console.print(
        f"[bold]The morning[/]: {s['pro']} Pro tasks at once, {s['free']} Free and "
        f"{s['start']} Start over {s['window_s']:g}s; simulated API "
        f"{s['latency_ms']:g}+-{s['jitter_ms']:g} ms, {100 * s['fail_rate']:g}% errors (retried)."
    )
    model = doc["old_design"]["model"]
    console.print(plan_table(doc))
    console.print(overall_table(doc))
    console.print(
        f"[dim]old design: one worker holds a whole task, {model['workers']} workers x "
        f"{model['calls_per_worker']} calls, FIFO; modelled from the same arrivals and API "
        "latency (genworker/demo/baseline.py).[/]"
    )
    ours = doc["genworker"]
    verdict = "every task succeeded" if doc["ok"] else "NOT every task succeeded"
    console.print(f"{ours['succeeded']}/{ours['tasks']} tasks, {ours['images']} images: {verdict}.")
