"""`genworker status`: the document (`--json`) and one screen for humans (rich).

Everything comes from two places: the queue tables (depth by plan and state,
tasks by status) and the row each node publishes at every heartbeat (its
workers, counters, alarms, degraded, db_ok). Rates are the nodes' counters
over time: since each node started for one look, between refreshes with
`--watch`, and the node's own recent rates when it publishes them (`rates`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from genworker.queue import sql
from genworker.queue.db import translated

STATES = ("queued", "scheduled", "running")
API_ERRORS = ("api_4xx", "api_429", "api_5xx", "api_timeout", "api_conn")
USAGE_WINDOW = timedelta(hours=24)  # token usage of the tasks submitted this recently
USAGE_TENANTS = 50  # the biggest users shown; the document stays small however many tenants


def status_document(
    conn: psycopg.Connection, previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The stable JSON document of `genworker status --json` (see README).

    With `previous` (the last document, under --watch) rates cover the time between the two.
    """
    with translated():
        depth = conn.execute(sql.query("queue_depth")).fetchall()
        tasks = conn.execute(sql.query("task_counts")).fetchall()
        nodes = conn.execute(sql.query("list_nodes")).fetchall()
        usage = conn.execute(
            sql.query("tenant_usage"),
            {"since": datetime.now(UTC) - USAGE_WINDOW, "limit": USAGE_TENANTS},
        ).fetchall()
    by_plan: dict[str, dict[str, int]] = {}
    for plan, state, n in depth:
        by_plan.setdefault(plan, dict.fromkeys(STATES, 0))[state] = n
    doc: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "queue": by_plan,
        "in_flight": sum(v["running"] for v in by_plan.values()),
        "tasks": {status: n for status, n in tasks},
        "nodes": [_node(r) for r in nodes],
        "tenants": {
            tenant: {"input_tokens": int(i), "output_tokens": int(o)} for tenant, i, o in usage
        },
    }
    doc.update(_rates(doc, previous))
    doc["alarms"] = [
        {"node": n["id"], "name": name, "detail": detail}
        for n in doc["nodes"]
        if n["status"] == "alive"
        for name, detail in sorted((n["info"].get("alarms") or {}).items())
    ]
    return doc


def _node(r: Any) -> dict[str, Any]:
    info = r[7] or {}
    workers = info.get("workers") or []
    return {
        "id": r[0],
        "host": r[1],
        "pid": r[2],
        "status": r[3],
        "workers": r[4],
        "ready_workers": sum(1 for w in workers if w.get("state") == "ready"),
        "api_in_flight": sum(int(w.get("inflight", 0)) for w in workers),
        "started_at": r[5].isoformat(),
        "heartbeat_at": r[6].isoformat(),
        "heartbeat_age_s": round(float(r[8]), 1),
        "uptime_s": round((r[6] - r[5]).total_seconds(), 1),
        "info": info,
    }


def _rates(doc: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """Throughput and API error rate of the live nodes, and the window they cover.

    A node's counters are sampled when it heartbeats, so rates divide by heartbeat
    times: since the node started for one look; under --watch, between the last two
    heartbeats seen (a refresh without a new heartbeat keeps the last rate).
    """
    before = {n["id"]: n for n in (previous or {}).get("nodes", [])}
    images, calls, errors, windows = 0.0, 0.0, 0.0, set()
    for n in doc["nodes"]:
        if n["status"] != "alive":
            continue
        n["recent"] = _node_window(n, before.get(n["id"]))
        images += n["recent"]["images_per_s"]
        calls += n["recent"]["api_calls"]
        errors += n["recent"]["api_errors"]
        windows.add(n["recent"]["window"])
    alive = any(n["status"] == "alive" for n in doc["nodes"])
    return {
        "rates": {
            "window": " / ".join(sorted(windows)) or "no live node",
            "images_per_s": round(images, 2) if alive else None,
            "api_error_rate": round(errors / calls, 4) if calls > 0 else None,
        }
    }


def _node_window(node: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    totals = node["info"].get("totals") or {}
    if before is not None and "recent" in before and before["heartbeat_at"] == node["heartbeat_at"]:
        return before["recent"]  # no new sample since the last refresh
    if before is not None and before["started_at"] == node["started_at"]:
        old = before["info"].get("totals") or {}
        span = _seconds_between(before["heartbeat_at"], node["heartbeat_at"])
        window = "between heartbeats"
    else:
        old, span, window = {}, node["uptime_s"], "since the node started"
    delta = {k: max(0.0, float(v) - float(old.get(k, 0.0))) for k, v in totals.items()}
    errors = sum(delta.get(k, 0.0) for k in API_ERRORS)
    return {
        "window": window,
        "window_s": round(span, 1),
        "images_per_s": round(delta.get("done", 0.0) / span, 2) if span > 0 else 0.0,
        "api_calls": delta.get("api_2xx", 0.0) + errors,
        "api_errors": errors,
    }


def _seconds_between(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


# ------------------------------------------------------------------ rendering


def status_view(doc: dict[str, Any]) -> RenderableType:
    """One screen: queue, tasks and rates, nodes, alarms."""
    parts: list[RenderableType] = [_queue_table(doc), _summary_line(doc)]
    if any(n["status"] == "alive" for n in doc["nodes"]):
        parts.append(_nodes_table(doc))
    else:
        if doc["nodes"]:
            parts.append(_nodes_table(doc))
        parts.append(
            Text("no live node: jobs wait until you run `genworker start`", style="yellow")
        )
    if doc.get("tenants"):
        parts.append(_usage_line(doc["tenants"]))
    for a in doc["alarms"]:
        parts.append(Text(f"ALARM {a['name']} on {a['node']}: {a['detail']}", style="bold red"))
    return Group(*parts)


def _queue_table(doc: dict[str, Any]) -> Table:
    queue = Table(title="queue (jobs)", title_justify="left", box=box.SIMPLE_HEAD)
    queue.add_column("plan")
    for col in STATES:
        queue.add_column(col, justify="right")
    for plan, states in sorted(doc["queue"].items()):
        queue.add_row(plan, *(str(states.get(s, 0)) for s in STATES))
    if not doc["queue"]:
        queue.add_row("(empty)", "0", "0", "0")
    return queue


def _usage_line(tenants: dict[str, dict[str, int]], shown: int = 5) -> Text:
    top = list(tenants.items())[:shown]
    more = f", {len(tenants) - shown} more (see --json)" if len(tenants) > shown else ""
    users = ", ".join(
        f"{tenant} {u['input_tokens']} in / {u['output_tokens']} out" for tenant, u in top
    )
    return Text(f"tokens (tasks of the last 24 h): {users}{more}\n")


def _summary_line(doc: dict[str, Any]) -> Text:
    tasks = ", ".join(f"{n} {k}" for k, n in sorted(doc["tasks"].items())) or "none"
    r = doc["rates"]
    rate = "-" if r["images_per_s"] is None else f"{r['images_per_s']:g} images/s"
    err = "-" if r["api_error_rate"] is None else f"{100 * r['api_error_rate']:.1f}%"
    in_api = sum(n["api_in_flight"] for n in doc["nodes"] if n["status"] == "alive")
    return Text(
        f"tasks: {tasks}\n"
        f"jobs claimed: {doc['in_flight']}, API calls in flight: {in_api}\n"
        f"throughput: {rate}, API errors: {err} ({r['window']})\n"
    )


MAX_NODE_ROWS = 12
GONE_SHOWN_S = 3600.0  # stopped and dead nodes stay on the screen this long


def _shown_nodes(doc: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Live nodes first, then those gone within the hour; the rest only counted (one screen)."""
    alive = [n for n in doc["nodes"] if n["status"] == "alive"]
    gone = [
        n for n in doc["nodes"] if n["status"] != "alive" and n["heartbeat_age_s"] <= GONE_SHOWN_S
    ]
    shown = (alive + gone)[:MAX_NODE_ROWS]
    return shown, len(doc["nodes"]) - len(shown)


def _nodes_table(doc: dict[str, Any]) -> Table:
    shown, hidden = _shown_nodes(doc)
    caption = f"{hidden} older stopped or dead nodes not shown (see --json)" if hidden else None
    nodes = Table(
        title="nodes",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        caption=caption,
        caption_justify="left",
    )
    for col in ("node", "status", "workers", "in flight", "done", "heartbeat", "health"):
        nodes.add_column(col, justify="right" if col in ("in flight", "done") else "left")
    for n in shown:
        info = n["info"]
        health = []
        if info.get("degraded"):
            health.append("degraded")
        if info.get("db_ok") is False:
            health.append("db down")
        health += sorted(info.get("alarms") or {})
        alive = n["status"] == "alive"
        nodes.add_row(
            n["id"],
            n["status"],
            f"{n['ready_workers']}/{n['workers']} ready" if alive else "-",
            str(n["api_in_flight"]) if alive else "-",
            f"{(info.get('totals') or {}).get('done', 0):.0f}",
            f"{n['heartbeat_age_s']:.0f}s ago",
            ", ".join(health) or ("ok" if alive else "-"),
            style=None if alive else "dim",
        )
    return nodes


def render_status(doc: dict[str, Any], *, console: Console | None = None) -> None:
    (console or Console()).print(status_view(doc))
