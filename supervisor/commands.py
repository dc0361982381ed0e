"""The short sub-commands: submit, status, tasks, show, cancel, retry, migrate, prune, config."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import psycopg

from . import schema, sql
from .cli import print_json
from .client import Client, TaskInfo
from .config import FIELDS, Settings, display_value, env_name
from .db import connect, resolve_dsn, translated
from .errors import InvalidParams
from .model import TaskStatus


def _open(settings: Settings, *, migrated: bool = True) -> psycopg.Connection:
    dsn = resolve_dsn(settings)
    conn = connect(dsn, timeout_s=settings.db_pool_timeout_s)
    if migrated:
        if settings.database_url is None:
            # the embedded server is ours: bring it up to date instead of asking the user to
            schema.migrate(conn, settings)
        else:
            schema.require_schema(conn)
    return conn


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    with _open(settings, migrated=False) as conn:
        applied = schema.migrate(conn, settings)
        version = schema.schema_version(conn)
    if applied:
        print(f"applied {', '.join(applied)}; schema version {version}")
    else:
        print(f"schema is up to date (version {version})")
    return 0


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    params: dict[str, Any] = {}
    if args.params:
        try:
            params = json.loads(args.params)
        except ValueError as e:
            raise InvalidParams(f"--params is not valid JSON: {e}") from None
        if not isinstance(params, dict):
            raise InvalidParams("--params must be a JSON object")
    if args.sources.get("size") == "flag":
        params["size"] = settings.size
    if args.sources.get("model") == "flag":
        params["model"] = settings.model
    with _open(settings) as conn:
        client = Client(conn=conn)
        task_id = client.submit(
            args.plan,
            args.prompt,
            params=params,
            tenant=args.tenant,
            kind=args.kind,
            idempotency_key=args.idempotency_key,
            n=args.n,
        )
        if not args.wait:
            info = client.get(task_id)
            if args.json:
                print_json(info.to_dict())
            else:
                print(f"task {task_id}: {info.n_jobs} {info.kind} jobs queued (plan {info.plan})")
            return 0
        info = _wait(client, task_id, args.timeout, quiet=args.json)
    if args.json:
        print_json(info.to_dict())
    else:
        print(_one_line(info))
    return 0 if info.status is TaskStatus.SUCCEEDED else 1


def _wait(client: Client, task_id: int, timeout: float | None, *, quiet: bool) -> TaskInfo:
    if quiet or not sys.stderr.isatty():
        return client.wait(task_id, timeout_s=timeout)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        handle = bar.add_task(f"task {task_id}", total=None)

        def show(info: TaskInfo) -> None:
            bar.update(handle, total=info.n_jobs, completed=info.n_jobs - info.remaining)

        return client.wait(task_id, timeout_s=timeout, progress=show)


def _one_line(info: TaskInfo) -> str:
    took = ""
    if info.finished_at and info.created_at:
        took = f" in {(info.finished_at - info.created_at).total_seconds():.1f}s"
    tail = f": {info.error}" if info.error else ""
    return (
        f"task {info.id} {info.status}{took}: {info.succeeded}/{info.n_jobs} succeeded, "
        f"{info.dead} dead, {info.cancelled} cancelled{tail}"
    )


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    with _open(settings) as conn:
        info = Client(conn=conn).get(args.task_id, jobs=True)
    if args.json:
        print_json(info.to_dict())
        return 0
    print(_one_line(info))
    print(
        f"  plan {info.plan}, tenant {info.tenant}, kind {info.kind}, "
        f"created {info.created_at:%Y-%m-%d %H:%M:%S}"
    )
    for j in info.jobs:
        what = j.error or (json.dumps(j.result) if j.result else "")
        print(f"  #{j.index:<4} {j.status:<10} attempts={j.attempts} {what[:100]}")
    return 0


def cmd_tasks(args: argparse.Namespace, settings: Settings) -> int:
    with _open(settings) as conn:
        rows = Client(conn=conn).tasks(status=args.status, tenant=args.tenant, limit=args.limit)
    if args.json:
        print_json({"tasks": [r.to_dict() for r in rows]})
        return 0
    if not rows:
        print("no tasks")
    for r in rows:
        print(
            f"{r.id:>8} {r.status:<10} {r.plan:<8} {r.tenant:<16} "
            f"{r.succeeded:>4}/{r.n_jobs:<4} {r.created_at:%Y-%m-%d %H:%M:%S}"
        )
    return 0


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    with _open(settings) as conn:
        status = Client(conn=conn).cancel(args.task_id)
    print_json({"task": args.task_id, "status": str(status)}) if args.json else print(
        f"task {args.task_id}: {status}"
    )
    return 0


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    with _open(settings) as conn:
        n = Client(conn=conn).retry(args.task_id)
    print_json({"task": args.task_id, "requeued": n}) if args.json else print(
        f"task {args.task_id}: {n} dead jobs requeued"
    )
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    total = 0
    with _open(settings) as conn, translated():
        while True:  # small batches, so a large backlog never holds long locks
            row = conn.execute(
                sql.query("prune"), {"older_than_s": settings.retention_s, "limit": 500}
            ).fetchone()
            n = row[0] if row else 0
            total += n
            if n < 500:
                break
    print(f"pruned {total} finished tasks older than {settings.retention_s:g}s")
    return 0


def status_document(conn: psycopg.Connection) -> dict[str, Any]:
    """The stable JSON document of `genworker status --json` (see README)."""
    with translated():
        depth = conn.execute(sql.query("queue_depth")).fetchall()
        tasks = conn.execute(sql.query("task_counts")).fetchall()
        nodes = conn.execute(sql.query("list_nodes")).fetchall()
    by_plan: dict[str, dict[str, int]] = {}
    for plan, state, n in depth:
        by_plan.setdefault(plan, {"queued": 0, "scheduled": 0, "running": 0})[state] = n
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "queue": by_plan,
        "in_flight": sum(v["running"] for v in by_plan.values()),
        "tasks": {status: n for status, n in tasks},
        "nodes": [
            {
                "id": r[0],
                "host": r[1],
                "pid": r[2],
                "status": r[3],
                "workers": r[4],
                "started_at": r[5].isoformat(),
                "heartbeat_at": r[6].isoformat(),
                "heartbeat_age_s": round(float(r[8]), 1),
                "info": r[7],
            }
            for r in nodes
        ],
    }


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from .status import render_status

    with _open(settings) as conn:
        while True:
            doc = status_document(conn)
            if args.json:
                print_json(doc)
                return 0
            render_status(doc, clear=args.watch)
            if not args.watch:
                return 0
            time.sleep(2)


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    rows = []
    for name in FIELDS:
        value = getattr(settings, name)
        rows.append(
            {
                "setting": name,
                "env": env_name(name),
                "value": display_value(name, value),
                "source": args.sources.get(name, "default"),
            }
        )
    if args.json:
        print_json({"settings": rows})
        return 0
    width = max(len(r["setting"]) for r in rows)
    for r in rows:
        print(f"{r['setting']:<{width}}  {r['value'] or '-':<40} {r['source']}")
    return 0
