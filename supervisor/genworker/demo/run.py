"""`genworker demo`: replay the old system's busiest morning on a real node.

It starts the simulated API and a `genworker start` node as child processes
(on the embedded PostgreSQL, in a database of its own, or on DATABASE_URL),
submits the morning's tasks at their arrival times, draws progress while the
node works, stops both children by PID, and prints what each plan's users saw
next to what the old design would have given them for the same arrivals.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from rich.console import Console

from genworker.cli.main import print_json
from genworker.config import FIELDS, Settings, flag_name, format_plans
from genworker.demo import baseline, report
from genworker.demo.live import TaskProgress, View, make_view
from genworker.demo.node import Child, DemoError, last_line, start_node, start_sim
from genworker.demo.noderow import wait_for_busy, wait_until_ready
from genworker.demo.scenario import Arrival, Morning
from genworker.model import TaskStatus
from genworker.procs import pid_alive
from genworker.queue import schema
from genworker.queue.client import Client, TaskInfo
from genworker.queue.db import connect, translated

PLANS = ("free", "start", "pro")
POLL_S = 0.25
# settings the demo sets itself on its node (the API is always the simulated one)
_OWN = {"api_url", "api_key", "api_key_file", "database_url", "node_id", "http", "output_dir"}
_DEFAULTS = {"lease_s": 9.0, "graceful_timeout_s": 5.0}  # a heartbeat every 3 s, a quick stop


@dataclass(frozen=True)
class Options:
    morning: Morning
    latency_ms: float
    jitter_ms: float
    fail_rate: float
    json: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        morning = Morning(args.pro, args.free, args.start, args.window, args.seed)
        if morning.tasks == 0:
            raise DemoUsage("nothing to replay: --pro, --free and --start are all 0")
        jitter = args.latency_ms / 5 if args.jitter_ms is None else args.jitter_ms
        if jitter > args.latency_ms:
            raise DemoUsage("--jitter-ms must not exceed --latency-ms")
        return cls(morning, args.latency_ms, jitter, args.fail_rate, args.json)


class DemoUsage(DemoError):
    exit_code = 2


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    opts = Options.from_args(args)
    missing = [p for p in PLANS if p not in settings.plan_map]
    if missing:
        raise DemoUsage(f"the demo replays plans free, start and pro; --plans lacks {missing[0]}")
    console = Console()
    view = make_view(console, json_only=opts.json, plans=PLANS, total_tasks=opts.morning.tasks)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        doc = _run(opts, settings, args.sources, view)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if opts.json:
        print_json(doc)
    else:
        report.render(doc, console)
    return 0 if doc["ok"] else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the same clean-up as Ctrl-C: children stopped by PID


def _run(opts: Options, settings: Settings, sources: dict[str, str], view: View) -> dict[str, Any]:
    workdir = settings.resolved_data_dir / "demo"
    shutil.rmtree(workdir / "results", ignore_errors=True)
    node_id = f"demo-{os.getpid()}"
    with contextlib.ExitStack() as stack:
        dsn = stack.enter_context(_database(settings, view))
        view.note(
            f"starting the simulated API ({opts.latency_ms:g}+-{opts.jitter_ms:g} ms per image) "
            f"and a node of {settings.workers} workers x {settings.concurrency} slots"
        )
        sim, url = start_sim(
            opts.latency_ms, opts.jitter_ms, opts.fail_rate, opts.morning.seed, workdir / "sim.log"
        )
        stack.callback(sim.stop, 5.0)
        log_path = workdir / "node.log"
        node = start_node(node_flags(settings, sources, url, node_id, workdir), dsn, log_path)
        stack.callback(node.stop, _effective(settings, sources, "graceful_timeout_s") + 15.0)
        stack.callback(view.close)  # first of all: leave the terminal tidy, then stop children
        with connect(dsn, timeout_s=settings.db_pool_timeout_s) as conn:
            wait_until_ready(conn, node_id, settings.workers, node, log_path)
            client = Client(conn=conn)
            tasks = Replayer(client, opts, view, node, log_path).run()
            view.close()
            view.note("all tasks finished; collecting the figures")
            tasks = [client.get(t.id, jobs=True) for t in tasks]  # attempts: the retries
            # the node publishes its counters at each heartbeat (every lease/3)
            calls = sum(j.attempts for t in tasks for j in t.jobs)
            lease = _effective(settings, sources, "lease_s")
            busy = wait_for_busy(conn, node_id, calls, timeout_s=max(15.0, 2.5 * lease / 3))
    return document(opts, settings, tasks, busy)


def _effective(settings: Settings, sources: dict[str, str], name: str) -> float:
    """A setting as the demo's node sees it: the user's flag, else the demo's own default."""
    if sources.get(name) == "flag" or name not in _DEFAULTS:
        return float(getattr(settings, name))
    return _DEFAULTS[name]


@contextlib.contextmanager
def _database(settings: Settings, view: View) -> Iterator[str]:
    """The demo's database: a fresh one on the embedded server, or DATABASE_URL as it is."""
    if settings.database_url:
        with connect(settings.database_url, timeout_s=settings.db_pool_timeout_s) as conn:
            schema.migrate(conn, settings)
            _warn_if_busy(conn, view)
        yield settings.database_url
        return
    from genworker.queue.embedded import ensure_embedded

    view.note(f"starting the embedded PostgreSQL in {settings.resolved_data_dir / 'pg'}")
    base = ensure_embedded(settings.resolved_data_dir)
    name = f"genworker_demo_{os.getpid()}"
    with connect(base) as admin, translated(base):
        _drop_stale(admin)
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(base, dbname=name)
    try:
        with connect(dsn) as conn:
            schema.migrate(conn, settings)
        yield dsn
    finally:
        with connect(base) as admin, translated(base):
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _drop_stale(admin: psycopg.Connection) -> None:
    """Drop demo databases left by demos that were killed before they could."""
    rows = admin.execute(
        "SELECT datname FROM pg_database WHERE datname ~ '^genworker_demo_[0-9]+$'"
    ).fetchall()
    for (name,) in rows:
        if pid_alive(int(name.rsplit("_", 1)[1])):
            continue  # that demo is still running
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _warn_if_busy(conn: psycopg.Connection, view: View) -> None:
    from genworker.ops.status import status_document

    doc = status_document(conn)
    queued = sum(sum(states.values()) for states in doc["queue"].values())
    if queued:
        view.note(
            f"note: {queued} other jobs are waiting in this database; the demo's node will "
            "work on them too, and its slot utilisation will count them"
        )


def node_flags(
    settings: Settings, sources: dict[str, str], url: str, node_id: str, workdir: Path
) -> list[str]:
    """The `genworker start` flags of the demo's node: the demo's own, then the user's."""
    flags = ["--api-url", url, "--node-id", node_id, "--http", ""]
    flags += ["--output-dir", str(workdir / "results"), "--log-level", "info"]
    for name, f in FIELDS.items():
        cmds = f.metadata["cmds"]
        if name in _OWN or (cmds != "*" and "start" not in cmds.split(",")):
            continue
        value = getattr(settings, name)
        if sources.get(name) != "flag":
            if name not in _DEFAULTS:
                continue  # the node reads it from the same environment and file
            value = _DEFAULTS[name]
        flags += _as_flag(name, value)
    return flags


def _as_flag(name: str, value: Any) -> list[str]:
    flag = flag_name(name)
    if value is None:
        return []
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if name == "plans":
        return [flag, format_plans(value)]
    if name == "handlers":
        return [flag, ",".join(value)]
    return [flag, f"{value:g}" if isinstance(value, float) else str(value)]


class Replayer:
    """Submit each task at its arrival time and follow the progress until all are done."""

    def __init__(
        self, client: Client, opts: Options, view: View, node: Child, log_path: Path
    ) -> None:
        self.client, self.opts, self.view = client, opts, view
        self.node, self.log_path = node, log_path
        self.arrivals: list[Arrival] = opts.morning.arrivals()
        self.by_id: dict[int, Arrival] = {}
        self.last: dict[int, TaskInfo] = {}
        self.stall_s = max(60.0, 30 * (opts.latency_ms + opts.jitter_ms) / 1000)

    def run(self) -> list[TaskInfo]:
        m = self.opts.morning
        self.view.note(
            f"replaying the morning: {m.pro} Pro tasks at once, then {m.free} Free and "
            f"{m.start} Start over {m.window_s:g}s"
        )
        t0 = time.monotonic()
        pending = list(self.arrivals)
        moved_at, done_before = time.monotonic(), -1
        while True:
            now = time.monotonic() - t0
            due = [a for a in pending if a.at_s <= now]
            if due:
                self._submit(due)
                pending = pending[len(due) :]
            done = self._poll()
            if done != done_before:
                moved_at, done_before = time.monotonic(), done
            if not pending and all(info.done for info in self.last.values()):
                return [self.last[i] for i in sorted(self.last)]
            self._check_alive(time.monotonic() - moved_at)
            wake = min([pending[0].at_s] if pending else [], default=now + POLL_S)
            time.sleep(max(0.0, min(wake - (time.monotonic() - t0), POLL_S)))

    def _submit(self, due: list[Arrival]) -> None:
        # tasks arriving together go in one round trip (and one transaction)
        ids = self.client.submit_many(
            [
                {"plan": a.plan, "prompt": f"{a.plan} order of {a.tenant}", "tenant": a.tenant}
                for a in due
            ]
        )
        self.by_id.update(zip(ids, due, strict=True))

    def _poll(self) -> int:
        """Refresh unfinished tasks and the view; returns the images done so far."""
        for task_id in self.by_id:
            if task_id not in self.last or not self.last[task_id].done:
                self.last[task_id] = self.client.get(task_id)
        self.view.update(
            [
                TaskProgress(
                    i,
                    self.by_id[i].plan,
                    self.by_id[i].tenant,
                    t.n_jobs,
                    t.n_jobs - t.remaining,
                    t.done,
                )
                for i, t in sorted(self.last.items())
            ]
        )
        return sum(t.n_jobs - t.remaining for t in self.last.values())

    def _check_alive(self, still_s: float) -> None:
        if not self.node.alive():
            raise DemoError(
                f"the node stopped (exit {self.node.proc.returncode}): "
                f"{last_line(self.log_path)} (see {self.log_path})"
            )
        if still_s > self.stall_s:
            raise DemoError(
                f"no image finished in {still_s:.0f}s; see the node's log {self.log_path}"
            )


def _seconds(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else (a - b).total_seconds()


def _figures_ours(client_tasks: list[TaskInfo]) -> list[report.TaskFigure]:
    base = min(t.created_at for t in client_tasks)
    return [
        report.TaskFigure(
            plan=t.plan,
            arrival_s=(t.created_at - base).total_seconds(),
            wait_s=_seconds(t.started_at, t.created_at),
            completion_s=_seconds(t.finished_at, t.created_at),
            images=t.n_jobs,
            succeeded=t.status is TaskStatus.SUCCEEDED,
            retries=sum(max(0, j.attempts - 1) for j in t.jobs),
        )
        for t in client_tasks
    ]


def _figures_old(
    ours: list[report.TaskFigure], opts: Options
) -> tuple[list[report.TaskFigure], baseline.Replay]:
    latency = baseline.Latency(
        opts.latency_ms / 1000, opts.jitter_ms / 1000, opts.fail_rate, opts.morning.seed
    )
    replay = baseline.replay_old_design([(t.arrival_s, t.images) for t in ours], latency)
    tasks = [
        report.TaskFigure(t.plan, r.arrival_s, r.wait_s, r.completion_s, r.images, True, r.retries)
        for t, r in zip(ours, replay.tasks, strict=True)
    ]
    return tasks, replay


def document(
    opts: Options, settings: Settings, tasks: list[TaskInfo], busy_slot_s: float | None
) -> dict[str, Any]:
    """The demo's JSON document (see README: JSON output)."""
    ours = _figures_ours(tasks)
    old, replay = _figures_old(ours, opts)
    slots = settings.workers * settings.concurrency
    mine = report.figures(ours, slots=slots, busy_slot_s=busy_slot_s, plans=PLANS)
    theirs = report.figures(old, slots=replay.slots, busy_slot_s=replay.busy_slot_s, plans=PLANS)
    theirs["model"] = {
        "workers": baseline.OLD_WORKERS,
        "calls_per_worker": baseline.OLD_CALLS_PER_WORKER,
        "queue": "fifo",
    }
    m = opts.morning
    return {
        "ok": all(t.status is TaskStatus.SUCCEEDED for t in tasks),
        "scenario": {
            "pro": m.pro,
            "free": m.free,
            "start": m.start,
            "window_s": m.window_s,
            "seed": m.seed,
            "latency_ms": opts.latency_ms,
            "jitter_ms": opts.jitter_ms,
            "fail_rate": opts.fail_rate,
            "workers": settings.workers,
            "concurrency": settings.concurrency,
            "database": "DATABASE_URL" if settings.database_url else "embedded",
        },
        "genworker": mine,
        "old_design": theirs,
        "ratios": report.ratios(mine, theirs),
    }
