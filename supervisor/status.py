"""`genworker status` for humans: one screen, drawn with rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def render_status(
    doc: dict[str, Any], *, clear: bool = False, console: Console | None = None
) -> None:
    console = console or Console()
    if clear:
        console.clear()
    queue = Table(title="queue", title_justify="left")
    for col in ("plan", "queued", "scheduled", "running"):
        queue.add_column(col, justify="right" if col != "plan" else "left")
    for plan, states in sorted(doc["queue"].items()):
        queue.add_row(plan, *(str(states.get(s, 0)) for s in ("queued", "scheduled", "running")))
    if not doc["queue"]:
        queue.add_row("(empty)", "0", "0", "0")
    console.print(queue)
    tasks = ", ".join(f"{k} {v}" for k, v in sorted(doc["tasks"].items())) or "none"
    console.print(f"tasks: {tasks}; in flight: {doc['in_flight']}")
    nodes = Table(title="nodes", title_justify="left")
    for col in ("node", "status", "workers", "heartbeat", "alarms"):
        nodes.add_column(col)
    for n in doc["nodes"]:
        alarms = ", ".join(sorted((n.get("info") or {}).get("alarms", {}))) or "-"
        nodes.add_row(
            n["id"], n["status"], str(n["workers"]), f"{n['heartbeat_age_s']:.0f}s ago", alarms
        )
    if not doc["nodes"]:
        nodes.add_row("(none: start one with `genworker start`)", "", "", "", "")
    console.print(nodes)
