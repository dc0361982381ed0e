"""The short sub-commands: status, tasks, show, cancel, retry, migrate, prune, config."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from genworker.api.results import remove_results
from genworker.cli.main import print_json
from genworker.config import FIELDS, Settings, display_value, env_name, flag_name, mask_dsn
from genworker.errors import UsageError
from genworker.model import TaskStatus
from genworker.queue import schema, sql
from genworker.queue.client import Client, TaskInfo
from genworker.queue.db import connect, resolve_dsn, translated
from genworker.text import terminal_safe

WATCH_S = 2.0
LIVE_NODE_S = 120.0  # a node heard from within this long counts as running (heartbeats: lease/3)


def open_db(settings: Settings, *, migrated: bool = True) -> psycopg.Connection:
    dsn = resolve_dsn(settings)
    conn = connect(dsn, timeout_s=settings.db_pool_timeout_s)
    if migrated:
        if settings.database_url is None:
            # the embedded server is ours: bring it up to date instead of asking the user to.
            # Without settings: plans are synced by `migrate` and `start`, not by every command.
            schema.migrate(conn)
        schema.require_schema(conn)
    return conn


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    with open_db(settings, migrated=False) as conn:
        applied = schema.migrate(conn, settings)
        version = schema.schema_version(conn)
    if applied:
        print(f"applied {', '.join(applied)}; schema version {version}")
    else:
        print(f"schema is up to date (version {version})")
    return 0


def _seconds(later: datetime | None, earlier: datetime | None) -> str:
    if later is None or earlier is None:
        return "-"
    return f"{(later - earlier).total_seconds():.1f}s"


def task_line(info: TaskInfo) -> str:
    took = f" in {_seconds(info.finished_at, info.created_at)}" if info.finished_at else ""
    tail = f": {terminal_safe(info.error, 300)}" if info.error else ""
    return (
        f"task {info.id} {info.status}{took}: {info.succeeded}/{info.n_jobs} succeeded, "
        f"{info.dead} dead, {info.cancelled} cancelled{tail}"
    )


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    with open_db(settings) as conn:
        info = Client(conn=conn).get(args.task_id, jobs=True)
    if args.json:
        print_json(info.to_dict())
        return 0
    print(task_line(info))
    key = f", key {terminal_safe(info.idempotency_key)}" if info.idempotency_key else ""
    print(f"  plan {info.plan}, tenant {info.tenant}, kind {info.kind}{key}")
    print(
        f"  created {info.created_at:%Y-%m-%d %H:%M:%S}, waited "
        f"{_seconds(info.started_at, info.created_at)} for its first image, "
        f"took {_seconds(info.finished_at, info.created_at)}"
    )
    print(f"  params {terminal_safe(json.dumps(info.params), 200)}")
    if info.input_tokens or info.output_tokens:
        print(f"  usage: {info.input_tokens} input, {info.output_tokens} output tokens")
    for j in info.jobs:
        # a result (where the image is) is printed whole, whatever the terminal's width
        what = terminal_safe(j.error, 300) if j.error else _result_line(j.result)
        print(f"  #{j.index:<4} {j.status:<10} attempts={j.attempts} {what}")
    return 0


def _result_line(result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    where = result.get("path") or result.get("url")
    if isinstance(where, str):
        return terminal_safe(where)
    return terminal_safe(json.dumps(result))


def cmd_tasks(args: argparse.Namespace, settings: Settings) -> int:
    with open_db(settings) as conn:
        rows = Client(conn=conn).tasks(status=args.status, tenant=args.tenant, limit=args.limit)
    if args.json:
        print_json({"tasks": [r.to_dict() for r in rows]})
        return 0
    if not rows:
        print("no tasks" + (" match" if args.status or args.tenant else " yet"))
        return 0
    print(f"{'id':>8} {'status':<10} {'plan':<8} {'tenant':<16} {'done':>9}  {'created':<19}  took")
    for r in rows:
        done = f"{r.succeeded}/{r.n_jobs}"
        took = _seconds(r.finished_at, r.created_at)
        print(
            f"{r.id:>8} {r.status:<10} {r.plan:<8} {r.tenant[:16]:<16} {done:>9}  "
            f"{r.created_at:%Y-%m-%d %H:%M:%S}  {took}"
        )
    return 0


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 when the task is now cancelled, 1 when it had already finished otherwise."""
    with open_db(settings) as conn:
        status = Client(conn=conn).cancel(args.task_id)
    cancelled = status == TaskStatus.CANCELLED
    if args.json:
        print_json({"task": args.task_id, "status": str(status)})
    elif cancelled:
        print(f"task {args.task_id}: cancelled")
    else:
        print(f"task {args.task_id} had already {status}: nothing to cancel", file=sys.stderr)
    return 0 if cancelled else 1


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    """`retry TASK`, or `retry --status dead --since 1h`: every job that died since then."""
    if (args.task_id is None) == (args.since is None):
        raise UsageError(
            "retry takes a TASK, or --status dead --since AGE|TIME (e.g. 1h, 2024-05-01T08:00Z)"
        )
    if args.task_id is None:
        return _retry_dead(args, settings)
    with open_db(settings) as conn:
        n = Client(conn=conn).retry(args.task_id)
    print_json({"task": args.task_id, "requeued": n}) if args.json else print(
        f"task {args.task_id}: {n} dead jobs requeued"
    )
    return 0


RETRY_BATCH = 500  # dead jobs requeued per statement: short locks, however long the outage


def _retry_dead(args: argparse.Namespace, settings: Settings) -> int:
    total = 0
    with open_db(settings) as conn, translated():
        now = conn.execute(sql.query("db_now")).fetchone()
        before = now[0] if now else datetime.now(UTC)
        since = since_time(args.since, before)
        while True:
            row = conn.execute(
                sql.query("retry_dead"), {"since": since, "before": before, "limit": RETRY_BATCH}
            ).fetchone()
            n = int(row[0]) if row else 0
            total += n
            if n < RETRY_BATCH:
                break
    if args.json:
        print_json({"since": since.isoformat(), "requeued": total})
    else:
        print(f"{total} dead jobs requeued (died since {since.isoformat(timespec='seconds')})")
    return 0


_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_time(text: str, now: datetime) -> datetime:
    """--since: an age before `now` (90s, 30m, 1h, 2d) or an ISO 8601 time (UTC unless it
    names a zone)."""
    m = _AGE.match(text.strip())
    if m:
        return now - timedelta(seconds=float(m[1]) * _UNIT_S[m[2]])
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since {text[:40]!r}: give an age such as 1h or 30m, or an ISO time"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    """Prune finished tasks past the retention, and their result files in this host's
    output directory (no other job naming them)."""
    total = removed = 0
    with open_db(settings) as conn, translated():
        while True:  # small batches, so a large backlog never holds long locks
            row = conn.execute(
                sql.query("prune_with_files"),
                {"older_than_s": settings.retention_s, "limit": 500},
            ).fetchone()
            n, files = (row[0], row[1]) if row else (0, [])
            total += n
            removed += remove_results(settings.resolved_output_dir, list(files or []))
            if n < 500:
                break
    print(
        f"pruned {total} finished tasks older than {settings.retention_s:g}s "
        f"and {removed} result files"
    )
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from genworker.ops.status import status_document, status_view

    with open_db(settings) as conn:
        if not args.watch:
            doc = status_document(conn)
            print_json(doc) if args.json else render(status_view(doc))
            return 0
        return _watch(conn, json_lines=args.json)


def _watch(conn: psycopg.Connection, *, json_lines: bool) -> int:
    """Refresh every WATCH_S until Ctrl-C (which is how one leaves it: exit 0)."""
    from rich.console import Console
    from rich.live import Live

    from genworker.ops.status import status_document, status_view

    doc = status_document(conn)
    try:
        if json_lines:  # one compact document per line, for a pipe
            while True:
                sys.stdout.write(json.dumps(doc, default=str) + "\n")
                sys.stdout.flush()
                time.sleep(WATCH_S)
                doc = status_document(conn, doc)
        console = Console()
        if not console.is_terminal:  # a pipe or a file: one screen after the other
            while True:
                console.print(status_view(doc))
                time.sleep(WATCH_S)
                doc = status_document(conn, doc)
        with Live(status_view(doc), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(WATCH_S)
                doc = status_document(conn, doc)
                live.update(status_view(doc), refresh=True)
    except KeyboardInterrupt:
        return 0


def render(renderable: Any) -> None:
    from rich.console import Console

    Console().print(renderable)


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    rows = []
    for name in FIELDS:
        value = display_value(name, getattr(settings, name))
        if "://" in value:  # any URL (API, cache) may carry user:password@
            value = mask_dsn(value)
        if name == "database_url" and not value:  # say where commands will connect
            from genworker.queue.embedded import described

            value = described(settings.resolved_data_dir)
        rows.append(
            {
                "setting": name,
                "flag": flag_name(name),
                "env": env_name(name),
                "value": value,
                "source": args.sources.get(name, "default"),
            }
        )
    if args.json:
        print_json({"settings": rows})
        return 0
    width = max(len(r["setting"]) for r in rows)
    print(f"{'setting':<{width}}  {'value':<40} source")
    for r in rows:
        print(f"{r['setting']:<{width}}  {r['value'] or '-':<40} {r['source']}")
    return 0
