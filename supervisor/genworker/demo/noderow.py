"""Reading the demo node's row in the nodes table: is it ready, how busy were its slots."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg

from genworker.demo.node import Child, DemoError, last_line
from genworker.queue import sql
from genworker.queue.db import translated

READY_TIMEOUT_S = 120.0  # a loaded 2-core machine can take a while to fork and boot 8 workers


def node_row(conn: psycopg.Connection, node_id: str) -> dict[str, Any] | None:
    """The node's heartbeat time and published info, or None before it registers."""
    with translated():
        rows = conn.execute(sql.query("list_nodes")).fetchall()
    for r in rows:
        if r[0] == node_id:
            return {"status": r[3], "heartbeat_at": r[6], "info": r[7] or {}}
    return None


def ready_workers(row: dict[str, Any] | None) -> int:
    if row is None or row["status"] != "alive":
        return 0
    return sum(1 for w in row["info"].get("workers", []) if w.get("state") == "ready")


def wait_until_ready(
    conn: psycopg.Connection, node_id: str, workers: int, node: Child, log_path: Path
) -> None:
    """Block until the node says every worker is ready (it says so at each heartbeat)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while ready_workers(node_row(conn, node_id)) < workers:
        if not node.alive():
            raise DemoError(
                f"the node exited at start (code {node.proc.returncode}): "
                f"{last_line(log_path) or 'no output'} (see {log_path})"
            )
        if time.monotonic() > deadline:
            raise DemoError(
                f"the node's workers were not ready after {READY_TIMEOUT_S:.0f}s (see {log_path})"
            )
        time.sleep(0.1)


def wait_for_busy(
    conn: psycopg.Connection, node_id: str, calls: int, timeout_s: float
) -> float | None:
    """The node's busy slot-seconds (the time its API calls took), once it has counted
    at least `calls` calls; None when that takes longer than timeout_s (unknown, not guessed).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = node_row(conn, node_id)
        totals = row["info"].get("totals", {}) if row is not None else {}
        if totals.get("latency_count", 0) >= calls and "latency_sum" in totals:
            return float(totals["latency_sum"])
        time.sleep(0.2)
    return None
