"""The audit after a run: prove from the database, and from the simulated API's counters
when there are any, that no job was lost, none is stuck, none finished twice, and that
every API call beyond one per job has a cause.

`audit(dsn, sim_stats)` only reads; any run can call it at its end (the chaos tests, a
benchmark, an operator after an incident). What the run did to the system (kills,
restarts, recovery times) is the caller's to record, in `Faults`; the audit uses it to
explain the duplicates and prints it with its totals.

How "finished twice" is ruled out:
- in the database: a task's counters are bumped once per applied completion, so a
  second completion of one job would leave n_succeeded + n_dead above its jobs' count;
- at the simulated API: a worker sends X-Client-Request-Id gw-<job>-<token>, and a
  claim bumps the token. The completion is fenced by token (it lands only while the
  job still runs under the claim that made the call), so the row's token names the
  claim whose outcome was stored: a succeeded job must have exactly one image served
  under that token, and no claim may call the API twice.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

FINISHED = ("succeeded", "dead", "cancelled")
SHOWN = 5  # ids quoted per problem


@dataclass
class Faults:
    """What a run did to the system, as its driver recorded it."""

    worker_kills: int = 0
    supervisor_kills: int = 0
    supervisor_restarts: int = 0
    db_restarts: int = 0
    # jobs a supervisor held (running under its lease) when it was killed, or when it
    # stopped unable to write their outcomes: whether they come back through its restart
    # under the same node id or through their leases, no death is counted for them
    held_at_node_kills: set[int] = field(default_factory=set)
    recovery_s: dict[str, float] = field(default_factory=dict)  # event -> seconds to recover

    @property
    def max_recovery_s(self) -> float | None:
        return max(self.recovery_s.values()) if self.recovery_s else None


@dataclass
class AuditReport:
    jobs: int = 0
    tasks: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    dead_reasons: dict[str, int] = field(default_factory=dict)
    deaths: int = 0  # jobs given back by worker deaths and expired leases, summed over jobs
    api_calls: int | None = None  # answered calls, as the simulated API counted them
    calls_per_job: dict[int, int] = field(default_factory=dict)  # calls -> jobs with that many
    images: int | None = None  # calls answered with an image
    fault_answers: int | None = None  # calls answered with anything else
    excess_calls: int | None = None  # calls beyond one per job
    duplicates: int | None = None  # images whose outcome was lost (to a kill) and redone
    max_calls_per_claim: int | None = None
    faults: Faults = field(default_factory=Faults)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        f = self.faults
        rec = f.max_recovery_s
        lines = [
            f"audit: {'OK' if self.ok else f'{len(self.problems)} PROBLEMS'}",
            f"  jobs {self.jobs} in {self.tasks} tasks: "
            + ", ".join(f"{n} {s}" for s, n in sorted(self.by_status.items())),
            f"  kills: {f.worker_kills} workers, {f.supervisor_kills} supervisors; "
            f"restarts: {f.supervisor_restarts} supervisors, {f.db_restarts} databases; "
            f"jobs given back by deaths and expired leases: {self.deaths}",
        ]
        if self.api_calls is not None:
            lines.append(
                f"  API calls {self.api_calls}: {self.images} images, {self.fault_answers} "
                f"faults; excess over one per job {self.excess_calls}; duplicates "
                f"{self.duplicates}; most calls by one claim {self.max_calls_per_claim}"
            )
            lines.append(
                "  calls per job: "
                + ", ".join(f"{c}: {n}" for c, n in sorted(self.calls_per_job.items()))
            )
        lines.append(
            "  max recovery time: "
            + ("-" if rec is None else f"{rec:.1f}s")
            + "".join(f"; {k} {v:.1f}s" for k, v in f.recovery_s.items())
        )
        for reason, n in sorted(self.dead_reasons.items(), key=lambda kv: -kv[1])[:5]:
            lines.append(f"  dead x{n}: {reason}")
        lines.extend(f"  PROBLEM: {p}" for p in self.problems)
        return "\n".join(lines)


def _some(ids: Iterable[int]) -> str:
    ids = sorted(ids)
    more = f" (+{len(ids) - SHOWN} more)" if len(ids) > SHOWN else ""
    return f"{ids[:SHOWN]}{more}"


def _reason(error: str | None) -> str:
    """A dead job's reason without its variable tail (the provider's words after a colon)."""
    text = (error or "").strip()
    head, _, _ = text.partition(": ")
    return head[:80] if head else "(none)"


def audit(
    dsn: str,
    sim_stats: Mapping[str, Any] | None = None,
    *,
    submitted: int | None = None,
    faults: Faults | None = None,
) -> AuditReport:
    """Check a finished run. `submitted`: the jobs the run submitted, when it knows;
    `sim_stats`: GET /stats of the simulated API every worker called."""
    report = AuditReport(faults=faults or Faults())
    with psycopg.connect(dsn, autocommit=True) as conn:
        jobs = conn.execute(
            "SELECT id, task_id, idx, status, token, deaths, result IS NOT NULL, error,"
            " result ->> 'sha256' FROM genworker.jobs"
        ).fetchall()
        tasks = conn.execute(
            "SELECT id, status, n_jobs, n_succeeded, n_dead, n_cancelled, finished_at IS NOT NULL"
            " FROM genworker.tasks"
        ).fetchall()
    _check_rows(report, jobs, tasks, submitted)
    if sim_stats is not None:
        _check_calls(report, jobs, sim_stats)
    return report


def _check_rows(
    report: AuditReport,
    jobs: list[tuple[Any, ...]],
    tasks: list[tuple[Any, ...]],
    submitted: int | None,
) -> None:
    problems = report.problems
    report.jobs, report.tasks = len(jobs), len(tasks)
    report.by_status = dict(collections.Counter(j[3] for j in jobs))
    report.deaths = sum(j[5] for j in jobs)

    # lost: every task has its n jobs, and the jobs are the ones submitted
    per_task = collections.Counter(j[1] for j in jobs)
    short = [t[0] for t in tasks if per_task.get(t[0], 0) != t[2]]
    if short:
        problems.append(f"lost: tasks whose job count is not n_jobs: {_some(short)}")
    if submitted is not None and len(jobs) != submitted:
        problems.append(f"lost: {len(jobs)} jobs in the database, {submitted} submitted")
    idx = collections.Counter((j[1], j[2]) for j in jobs)
    if any(n > 1 for n in idx.values()):
        problems.append("a task has two jobs with one index")

    # stuck: nothing may be left runnable or running
    stuck = [j[0] for j in jobs if j[3] not in FINISHED]
    if stuck:
        problems.append(f"stuck: {len(stuck)} jobs not finished: {_some(stuck)}")
    open_tasks = [t[0] for t in tasks if t[1] in ("queued", "running") or not t[6]]
    if open_tasks:
        problems.append(f"stuck: {len(open_tasks)} tasks not finished: {_some(open_tasks)}")

    # every job succeeded (with its result) or is dead with the reason stored
    no_result = [j[0] for j in jobs if j[3] == "succeeded" and not j[6]]
    if no_result:
        problems.append(f"succeeded without a result: {_some(no_result)}")
    no_reason = [j[0] for j in jobs if j[3] in ("dead", "cancelled") and not (j[7] or "").strip()]
    if no_reason:
        problems.append(f"dead without a reason: {_some(no_reason)}")
    report.dead_reasons = dict(collections.Counter(_reason(j[7]) for j in jobs if j[3] == "dead"))
    shas = collections.Counter(j[8] for j in jobs if j[3] == "succeeded" and j[8])
    shared = [s for s, n in shas.items() if n > 1]
    if shared:
        problems.append(f"{len(shared)} stored images shared by two jobs (one call, two results?)")

    # finished twice: each applied completion bumps its task's counters once
    by_task: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for j in jobs:
        by_task[j[1]][j[3]] += 1
    wrong = [
        t[0]
        for t in tasks
        if (t[3], t[4], t[5])
        != (by_task[t[0]]["succeeded"], by_task[t[0]]["dead"], by_task[t[0]]["cancelled"])
    ]
    if wrong:
        problems.append(
            f"counted twice: tasks whose counters differ from their jobs: {_some(wrong)}"
        )
    mislabelled = [t[0] for t in tasks if t[1] != _task_status(by_task[t[0]], t[1])]
    if mislabelled:
        problems.append(f"tasks whose status does not follow their jobs: {_some(mislabelled)}")


def _task_status(jobs: collections.Counter[str], current: str) -> str:
    if current == "cancelled" or (jobs["cancelled"] and not jobs["dead"]):
        return "cancelled"
    if jobs["queued"] or jobs["scheduled"] or jobs["running"]:
        return current
    return "failed" if jobs["dead"] else "succeeded"


def _calls(counts: Mapping[str, int]) -> dict[tuple[int, int], int]:
    """{(job, token): n} from {"gw-<job>-<token>": n}; other ids are not ours."""
    out = {}
    for rid, n in counts.items():
        parts = rid.split("-")
        if len(parts) == 3 and parts[0] == "gw" and parts[1].isdigit() and parts[2].isdigit():
            out[int(parts[1]), int(parts[2])] = int(n)
    return out


def _check_calls(
    report: AuditReport, jobs: list[tuple[Any, ...]], stats: Mapping[str, Any]
) -> None:
    problems = report.problems
    calls = _calls(stats.get("by_request_id", {}))
    images = _calls(stats.get("images_by_request_id", {}))
    total = int(stats.get("total", sum(calls.values())))
    report.api_calls = total
    report.images = sum(images.values())
    report.fault_answers = total - report.images
    report.max_calls_per_claim = max(calls.values(), default=0)

    if sum(calls.values()) != total:
        problems.append(f"{total - sum(calls.values())} API calls carry no request id of a claim")
    twice = [k for k, n in calls.items() if n > 1]
    if twice:
        problems.append(
            f"{len(twice)} claims called the API more than once: {_some(j for j, _ in twice)}"
        )

    per_job_calls: collections.Counter[int] = collections.Counter()
    per_job_images: collections.Counter[int] = collections.Counter()
    for (job, _), n in calls.items():
        per_job_calls[job] += n
    for (job, _), n in images.items():
        per_job_images[job] += n
    known = {j[0] for j in jobs}
    strangers = set(per_job_calls) - known
    if strangers:
        problems.append(f"API calls for jobs the database does not have: {_some(strangers)}")

    not_once, unexplained = [], []
    duplicates = 0
    for job_id, _, _, status, token, deaths, *_ in jobs:
        kept = images.get((job_id, token), 0) if status == "succeeded" else 0
        if status == "succeeded" and kept != 1:
            not_once.append(job_id)
        lost = per_job_images[job_id] - kept
        duplicates += lost
        # an image whose outcome was never stored: the worker, or the supervisor, died
        # with it in hand (a death each), or a node killed holding it was restarted
        if lost > deaths + (job_id in report.faults.held_at_node_kills):
            unexplained.append(job_id)
    if not_once:
        problems.append(
            f"finished twice or from nowhere: {len(not_once)} succeeded jobs without exactly "
            f"one image under their final token: {_some(not_once)}"
        )
    if unexplained:
        problems.append(
            f"{len(unexplained)} jobs got more images than their kills explain: "
            f"{_some(unexplained)}"
        )
    report.duplicates = duplicates
    report.calls_per_job = dict(collections.Counter(per_job_calls.get(j[0], 0) for j in jobs))
    report.excess_calls = sum(max(0, n - 1) for n in per_job_calls.values())

    # every failed call is one the API failed on purpose (a fault drawn for a call whose
    # client died meanwhile is counted as injected but never answered: hence <=)
    if not stats.get("config", {}).get("rps"):
        injected = sum(int(n) for n in stats.get("by_fault", {}).values())
        if report.fault_answers > injected:
            problems.append(
                f"{report.fault_answers} calls failed but the API injected only {injected} faults"
            )


def main(argv: list[str] | None = None) -> int:
    """`python tests/audit.py [DSN] [--sim URL] [--submitted N]`: audit a finished run,
    print the totals, exit 0 when every invariant holds and 1 otherwise."""
    import argparse
    import json
    import os
    import urllib.request

    p = argparse.ArgumentParser(prog="python tests/audit.py", description=main.__doc__)
    p.add_argument("dsn", nargs="?", default=os.environ.get("DATABASE_URL"), help="$DATABASE_URL")
    p.add_argument("--sim", metavar="URL", help="the simulated API the workers called")
    p.add_argument("--submitted", type=int, help="jobs the run submitted")
    args = p.parse_args(argv)
    if not args.dsn:
        p.error("no DSN: give one or set DATABASE_URL")
    stats = None
    if args.sim:
        with urllib.request.urlopen(f"{args.sim.rstrip('/')}/stats", timeout=30) as r:
            stats = json.load(r)
    report = audit(args.dsn, stats, submitted=args.submitted)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
