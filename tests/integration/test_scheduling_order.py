"""Order of service: plan priority, then the smallest task, then arrival; aging bounds every
wait; the knobs come from the settings; a node's buffer hands jobs out in the same order."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from genworker import channels as ch
from genworker.api.limiter import Aimd
from genworker.config import Plan, Settings
from genworker.model import Job
from genworker.node.feeder import Feeder
from genworker.queue import schema
from genworker.queue.client import Client
from genworker.worker.process import Worker
from queue_support import sync_queue

DEFAULTS = Settings()
PRO_OFFSET_S = 2 * DEFAULTS.priority_step_s + 70 * DEFAULTS.size_step_s  # a Pro task's lead


def claim_order(dsn: str, batch: int, limit: int = 10_000) -> list[tuple[int, int]]:
    """(task, index) of every job, in the order claims hand them out, `batch` at a time."""
    order: list[tuple[int, int]] = []
    with sync_queue(dsn) as q:
        for _ in range(limit):
            jobs = q.claim("node-a", batch, 30)
            if not jobs:
                return order
            order += [(j.task_id, j.idx) for j in jobs]
    raise AssertionError(f"the queue did not drain in {limit} claims")


def task_runs(order: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The order as (task, jobs in a row): one run per task when tasks are not interleaved."""
    runs: list[list[int]] = []
    for task, _ in order:
        if runs and runs[-1][0] == task:
            runs[-1][1] += 1
        else:
            runs.append([task, 1])
    return [(t, n) for t, n in runs]


def submit(client: Client, plan: str, n: int, tenant: str = "default") -> int:
    """One task in its own transaction, so each task has its own arrival time."""
    return int(client.submit(plan, "a lighthouse at dusk", n=n, tenant=tenant))


@pytest.mark.parametrize("batch", [1, 7, 100])
def test_known_tasks_are_claimed_by_plan_then_size_then_arrival(
    dsn: str, client: Client, batch: int
) -> None:
    pro_big = submit(client, "pro", 70)
    start_big = submit(client, "start", 30)
    free_two = submit(client, "free", 2)
    start_small = submit(client, "start", 5)
    free_one = submit(client, "free", 1)
    pro_small = submit(client, "pro", 3)
    pro_big_later = submit(client, "pro", 70)

    order = claim_order(dsn, batch)

    assert task_runs(order) == [
        (free_one, 1),  # free first, the smaller free task before the earlier one
        (free_two, 2),
        (start_small, 5),
        (start_big, 30),
        (pro_small, 3),
        (pro_big, 70),  # equal sizes: arrival order, each task whole before the next
        (pro_big_later, 70),
    ]
    # within a task, images go in index order
    for task in (pro_big, start_big):
        assert [i for t, i in order if t == task] == sorted(i for t, i in order if t == task)


def test_equal_tasks_finish_one_after_another_not_all_at_the_end(dsn: str, client: Client) -> None:
    """With equal sizes, fewest-left-first is arrival order: the first of ten Pro tasks has all
    its images claimed before any of the second's (no sharing that would delay all ten)."""
    tasks = client.submit_many([{"plan": "pro", "params": {"prompt": "p"}}] * 10)  # one transaction
    order = claim_order(dsn, 40)
    assert task_runs(order) == [(t, 70) for t in tasks]


def _waited(conn: psycopg.Connection, task_id: int, seconds: float) -> None:
    """Make a task look as if it had been submitted `seconds` ago (instead of sleeping)."""
    conn.execute(
        "UPDATE genworker.jobs j SET urgency = genworker.urgency(t.priority, t.n_jobs,"
        "       t.created_at - make_interval(secs => %(s)s)),"
        "       created_at = t.created_at - make_interval(secs => %(s)s)"
        "  FROM genworker.tasks t WHERE t.id = j.task_id AND t.id = %(task)s",
        {"task": task_id, "s": seconds},
    )
    conn.execute(
        "UPDATE genworker.tasks SET created_at = created_at - make_interval(secs => %s)"
        " WHERE id = %s",
        (seconds, task_id),
    )


@pytest.mark.parametrize(
    ("waited_s", "first"),
    [(PRO_OFFSET_S - 60, "free"), (PRO_OFFSET_S + 60, "pro")],
    ids=["waited-less-than-its-offset", "waited-longer"],
)
def test_aging_a_starved_pro_task_goes_first_once_it_has_waited_its_offset(
    dsn: str, conn: psycopg.Connection, client: Client, waited_s: float, first: str
) -> None:
    pro = submit(client, "pro", 70)
    _waited(conn, pro, waited_s)
    # a flood of small tasks, all arriving now
    client.submit_many([{"plan": "free", "params": {"prompt": "p"}}] * 200)
    with sync_queue(dsn) as q:
        [job] = q.claim("node-a", 1, 30)
    plan = conn.execute("SELECT plan FROM genworker.tasks WHERE id = %s", (job.task_id,)).fetchone()
    assert plan == (first,)


def test_no_stream_of_small_tasks_holds_a_big_one_back_past_its_offset(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    """The bound: small tasks that arrive later than the big task's key minus their own
    offset queue behind it, however many there are."""
    pro = submit(client, "pro", 70)
    _waited(conn, pro, PRO_OFFSET_S)  # it arrived exactly its offset ago
    free_size_s = 2 * DEFAULTS.size_step_s
    before = client.submit_many([{"plan": "free", "params": {"prompt": "p"}}] * 5)
    for task in before:  # these arrived before the Pro task's key minus their own offset
        _waited(conn, task, free_size_s + 30)
    after = client.submit_many([{"plan": "free", "params": {"prompt": "p"}}] * 500)
    runs = task_runs(claim_order(dsn, 100))
    assert [t for t, _ in runs[:6]] == [*before, pro]
    assert sorted(t for t, _ in runs[6:]) == sorted(after)


def _resync(conn: psycopg.Connection, **changes: Any) -> None:
    schema.sync_settings(conn, Settings(**changes))


def test_priorities_and_steps_are_settings(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    # bigger plans first, and size does not count: then it is priority and arrival only
    _resync(
        conn,
        plans=(Plan("free", 2, 2), Plan("start", 30, 1), Plan("pro", 70, 0)),
        size_step_s=0.0,
    )
    free = submit(client, "free", 2)
    pro_big = submit(client, "pro", 70)
    pro_small = submit(client, "pro", 1)
    assert task_runs(claim_order(dsn, 100)) == [(pro_big, 70), (pro_small, 1), (free, 2)]


def test_a_zero_priority_step_leaves_size_then_arrival(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    _resync(conn, priority_step_s=0.0)
    start = submit(client, "start", 3)
    pro = submit(client, "pro", 2)
    free = submit(client, "free", 2)
    assert task_runs(claim_order(dsn, 100)) == [(pro, 2), (free, 2), (start, 3)]


def test_a_retried_job_keeps_its_place(dsn: str, conn: psycopg.Connection, client: Client) -> None:
    """A retry comes back with its task's key: ahead of tasks that arrived after its task."""
    first = submit(client, "free", 1)
    with sync_queue(dsn) as q:
        [job] = q.claim("node-a", 1, 30)
        conn.execute(
            "UPDATE genworker.jobs SET status = 'scheduled', lease_expires = NULL,"
            " run_after = now() - interval '1 second' WHERE id = %s",
            (job.job_id,),
        )
        later = submit(client, "free", 1)
        [again] = q.claim("node-a", 1, 30)
    assert (again.task_id, later) == (first, later)


class Holder:
    """A worker as the feeder sees it, with `free` slots."""

    slot = 0

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.free = 0
        self.sent: list[Job] = []

    def free_slots(self) -> int:
        return self.free - len(self.jobs)

    def send_jobs(self, jobs: list[Job]) -> bool:
        self.sent += jobs
        self.jobs.update((j.job_id, j) for j in jobs)
        return True

    def holds_suspect(self) -> bool:
        return False


def test_a_node_hands_a_later_claimed_urgent_job_to_the_next_free_slot(
    dsn: str, client: Client
) -> None:
    """A node claimed Pro jobs into its buffer, then a Free task arrived and was claimed: the
    next free slots get the Free jobs, as the database would have ordered them."""
    pro = submit(client, "pro", 70)
    worker = Holder()
    feeder = Feeder(Settings(), dsn, "node-a", lambda: [worker], lambda name, detail: None)
    with sync_queue(dsn) as q:
        for job in q.claim("node-a", 40, 30):
            feeder.holdings.buffer.append(job)
        free = submit(client, "free", 2)
        for job in q.claim("node-a", 40, 30):
            feeder.holdings.buffer.append(job)
    worker.free = 3
    feeder.dispatch()
    assert [j.task_id for j in worker.sent] == [free, free, pro]
    assert [j.idx for j in worker.sent] == [0, 1, 0]


def test_a_worker_starts_the_most_urgent_of_its_waiting_jobs_first() -> None:
    """Quick calls get a job queued behind each busy slot of a worker; a slot that frees up
    takes the most urgent waiting job, not the one sent first."""
    started: list[str] = []

    async def call(job: Job, session: Any) -> dict[str, Any]:
        started.append(job.params["plan"])
        await asyncio.sleep(0.01)
        return {}

    async def scenario() -> None:
        mine, theirs = socket.socketpair()
        with mine, theirs:
            worker = Worker(0, 1, mine, Settings(concurrency=1), ch.SharedBlock(1), None)
            worker.aimd, worker.bucket, worker.handlers = Aimd(1), None, {"image": call}
            worker.session = None  # type: ignore[assignment]  # the handler above needs none
            worker.chan = SimpleNamespace(closed=False, send=lambda message: None)  # type: ignore[assignment]

            def job(i: int, plan: str, urgency: float) -> Job:
                return Job(i, 1, i, 0, "image", {"plan": plan}, 1, 0, urgency)

            worker.on_message((ch.JOBS, [job(1, "pro", 2000.0)]))  # takes the only slot
            worker.on_message((ch.JOBS, [job(2, "pro", 2000.0), job(3, "start", 900.0)]))
            worker.on_message((ch.JOBS, [job(4, "free", 20.0)]))  # sent last
            for _ in range(100):
                if worker.running == 0 and not worker.waiting:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert started == ["pro", "free", "start", "pro"]
