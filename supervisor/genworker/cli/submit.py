"""`genworker submit`: one task from the command line, and `--wait` for its outcome."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import psycopg

from genworker.cli.commands import LIVE_NODE_S, open_db, task_line
from genworker.cli.main import print_json
from genworker.config import Settings
from genworker.errors import GenworkerError, InvalidParams, InvalidPrompt
from genworker.model import TaskStatus
from genworker.queue import sql
from genworker.queue.client import Client, TaskInfo
from genworker.queue.db import translated
from genworker.text import terminal_safe


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    params = _params(args, settings)
    with open_db(settings) as conn:
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
        _warn_if_no_node(conn, args.kind)
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
        print(task_line(info))
    return 0 if info.status is TaskStatus.SUCCEEDED else 1


def _params(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.params:
        try:
            params = json.loads(args.params)
        except ValueError as e:
            raise InvalidParams(f"--params is not valid JSON: {e}") from None
        if not isinstance(params, dict):
            raise InvalidParams("--params must be a JSON object")
    if args.prompt is None and args.kind == "image" and "prompt" not in params:
        raise InvalidPrompt('--prompt is required for image jobs, e.g. --prompt "a lighthouse"')
    if args.sources.get("size") == "flag":
        params["size"] = settings.size
    if args.sources.get("model") == "flag":
        params["model"] = settings.model
    return params


def _warn_if_no_node(conn: psycopg.Connection, kind: str) -> None:
    """A first-time user's most likely surprise: a task that waits for a node never started,
    or for a node with a handler for its kind (nodes publish the kinds they run)."""
    with translated():
        row = conn.execute(
            sql.query("kind_runners"), {"kind": kind, "max_age_s": LIVE_NODE_S}
        ).fetchone()
    runs, any_live = row if row else (False, False)
    if not any_live:
        sys.stderr.write(
            "genworker: note: no node is running; the task waits until `genworker start` runs\n"
        )
    elif not runs:
        sys.stderr.write(
            f"genworker: note: no running node runs {terminal_safe(kind, 40)} jobs; the task "
            f"waits until a node starts with --handler {terminal_safe(kind, 40)}=pkg.module:func\n"
        )


def _wait(client: Client, task_id: int, timeout: float | None, *, quiet: bool) -> TaskInfo:
    try:
        if quiet or not sys.stderr.isatty():
            return client.wait(task_id, timeout_s=timeout)
        return _wait_with_bar(client, task_id, timeout)
    except TimeoutError:
        raise GenworkerError(
            f"task {task_id} not finished after {timeout:g}s; it keeps running "
            f"(`genworker show {task_id}`)"
        ) from None
    except KeyboardInterrupt:
        sys.stderr.write(f"genworker: task {task_id} keeps running (`genworker show {task_id}`)\n")
        raise


def _wait_with_bar(client: Client, task_id: int, timeout: float | None) -> TaskInfo:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        "ETA",
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        handle = bar.add_task(f"task {task_id}", total=None)

        def show(info: TaskInfo) -> None:
            what = "waiting for a worker" if info.status is TaskStatus.QUEUED else info.status
            bar.update(
                handle,
                description=f"task {task_id} ({info.plan}, {what})",
                total=info.n_jobs,
                completed=info.n_jobs - info.remaining,
            )

        return client.wait(task_id, timeout_s=timeout, progress=show)
