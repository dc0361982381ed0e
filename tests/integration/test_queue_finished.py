"""The task-finished event: the transaction that finishes a task sends one NOTIFY on
genworker_task_finished with {"task", "status", "tenant"}, whichever way it finishes, and
`wait` wakes on it; polling stays the fallback when no notification comes."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from genworker import AsyncClient, Client, TaskInfo
from genworker.model import Outcome, OutcomeKind
from psycopg_pool import AsyncConnectionPool
from queue_support import expire_leases, sync_queue

CHANNEL = "genworker_task_finished"


@pytest.fixture
def listener(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"LISTEN {CHANNEL}")
        yield c


def heard(listener: psycopg.Connection, quiet_s: float = 0.3) -> list[dict[str, Any]]:
    """Every notification so far, read until the channel stays quiet for quiet_s."""
    out = []
    while True:
        got = [json.loads(n.payload) for n in listener.notifies(timeout=quiet_s, stop_after=1)]
        if not got:
            return out
        out += got


def finish(dsn: str, kind: OutcomeKind = OutcomeKind.OK, limit: int = 1000) -> int:
    """Play a node: claim up to `limit` runnable jobs and report `kind` for each."""
    with sync_queue(dsn) as q:
        jobs = q.claim("test-node", limit, 30.0)
        q.complete([Outcome(j.job_id, j.token, kind, result={}, error="refused") for j in jobs])
    return len(jobs)


def test_all_jobs_succeeded_sends_one_notification_when_the_last_one_does(
    dsn: str, client: Client, listener: psycopg.Connection
) -> None:
    task = client.submit("start", "a finished fox", tenant="acme@shop.example", n=3)
    assert finish(dsn, limit=2) == 2
    assert heard(listener) == []  # one job left: not finished
    assert finish(dsn) == 1
    assert heard(listener) == [{"task": task, "status": "succeeded", "tenant": "acme@shop.example"}]
    assert heard(listener) == []


def test_a_dead_job_fails_its_task_with_one_notification(
    dsn: str, client: Client, listener: psycopg.Connection
) -> None:
    task = client.submit("start", "a doomed owl", tenant="t1", n=2)
    with sync_queue(dsn) as q:
        a, b = q.claim("test-node", 2, 30.0)
        q.complete([Outcome(a.job_id, a.token, OutcomeKind.DEAD, error="refused")])
        assert heard(listener) == []  # the other job still runs
        q.complete([Outcome(b.job_id, b.token, OutcomeKind.OK, result={})])
    assert heard(listener) == [{"task": task, "status": "failed", "tenant": "t1"}]


def test_a_worker_death_that_kills_the_last_job_fails_the_task(
    dsn: str, client: Client, listener: psycopg.Connection
) -> None:
    task = client.submit("free", "a poison pill", tenant="t2", n=1)
    with sync_queue(dsn) as q:
        [job] = q.claim("test-node", 1, 30.0)
        assert q.release([(job.job_id, job.token)], reason="SIGKILL", max_deaths=1).applied == {
            job.job_id: "dead"
        }
    assert heard(listener) == [{"task": task, "status": "failed", "tenant": "t2"}]


def test_cancel_notifies_once_and_late_results_and_the_reaper_add_nothing(
    dsn: str, conn: psycopg.Connection, client: Client, listener: psycopg.Connection
) -> None:
    task = client.submit("start", "a cancelled parade", tenant="t3", n=3)
    with sync_queue(dsn) as q:
        a, b = q.claim("test-node", 2, 30.0)
        assert client.cancel(task) == "cancelled"
        assert heard(listener) == [{"task": task, "status": "cancelled", "tenant": "t3"}]
        assert client.cancel(task) == "cancelled"  # a second cancel finishes nothing
        q.complete([Outcome(a.job_id, a.token, OutcomeKind.OK, result={})])  # a late result
        expire_leases(conn, [b.job_id])
        assert q.reap(60).requeued == 0  # b leaves as cancelled
    assert heard(listener) == []


def test_nothing_for_unfinished_tasks_a_cancel_of_a_finished_one_or_a_rollback(
    dsn: str, conn: psycopg.Connection, client: Client, listener: psycopg.Connection
) -> None:
    done = client.submit("free", "an early bird", n=1)
    finish(dsn)
    assert heard(listener) == [{"task": done, "status": "succeeded", "tenant": "default"}]
    assert client.cancel(done) == "succeeded"

    open_task = client.submit("start", "a slow snail", n=2)
    with sync_queue(dsn) as q:
        a, b = q.claim("test-node", 2, 30.0)
        q.complete([Outcome(a.job_id, a.token, OutcomeKind.RETRY, error="e", delay_s=0)])
        expire_leases(conn, [b.job_id])
        assert q.reap(60).requeued == 1
    with psycopg.connect(dsn) as app:  # NOTIFY goes out at commit: a rollback sends nothing
        app.execute("SELECT genworker.cancel_task(%s)", (open_task,))
        app.rollback()
    assert heard(listener) == []
    assert client.get(open_task).status in ("queued", "running")


def wait_in_thread(
    gw: Client, task: int, **kw: Any
) -> tuple[threading.Thread, threading.Event, list[TaskInfo], list[TaskInfo]]:
    """Client.wait in a thread; returns it, an event set at its first reading, the readings
    and (once it returns) the result."""
    first, readings, result = threading.Event(), [], []

    def progress(info: TaskInfo) -> None:
        readings.append(info)
        first.set()

    thread = threading.Thread(
        target=lambda: result.append(gw.wait(task, progress=progress, **kw)), daemon=True
    )
    thread.start()
    return thread, first, readings, result


def test_wait_wakes_on_the_notification_without_a_poll(dsn: str, client: Client) -> None:
    task = client.submit("free", "a prompt answer", n=1)
    other = client.submit("free", "someone else's cat", n=1)
    with Client(dsn) as waiter:
        thread, first, readings, result = wait_in_thread(waiter, task, poll_s=3600, timeout_s=60)
        assert first.wait(10)
        client.cancel(other)  # another task's notification: not a reason to read
        finish(dsn)
        thread.join(30)
    assert not thread.is_alive()
    assert result[0].status == "succeeded"
    # the reading before and the one the notification brought; an hour's poll never came
    assert [r.status for r in readings] == ["queued", "succeeded"]


def test_wait_polls_when_no_notification_comes(dsn: str, client: Client) -> None:
    finished_before = client.submit("free", "already done", n=1)
    finish(dsn)
    readings: list[TaskInfo] = []
    assert client.wait(finished_before, poll_s=3600, progress=readings.append).done
    assert len(readings) == 1

    task = client.submit("free", "a silent finish", n=1)
    with Client(dsn) as waiter:
        thread, first, readings, result = wait_in_thread(waiter, task, poll_s=0.05, timeout_s=60)
        assert first.wait(10)
        with psycopg.connect(dsn, autocommit=True) as c:  # finished without the event
            c.execute(
                "UPDATE genworker.tasks SET status = 'succeeded', n_succeeded = 1,"
                " finished_at = now() WHERE id = %s",
                (task,),
            )
        thread.join(30)
    assert result[0].status == "succeeded"
    assert len(readings) >= 2


def test_inside_an_apps_transaction_wait_polls_and_leaves_listen_state_alone(
    dsn: str, client: Client
) -> None:
    task = client.submit("free", "a transactional wait", n=1)
    with psycopg.connect(dsn) as app:  # not autocommit: LISTEN would hear nothing till commit
        app.execute("SELECT 1")
        thread, first, _, result = wait_in_thread(Client(conn=app), task, poll_s=0.05, timeout_s=60)
        assert first.wait(10)
        finish(dsn)
        thread.join(30)
        assert result[0].status == "succeeded"
        assert app.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (0,)

    with psycopg.connect(dsn, autocommit=True) as app:  # idle in autocommit: it listens
        app.execute(f"LISTEN {CHANNEL}")  # the app's own LISTEN survives the wait
        assert Client(conn=app).wait(task, poll_s=3600).done
        assert app.execute("SELECT array(SELECT pg_listening_channels())").fetchone() == (
            [CHANNEL],
        )


def test_async_wait_on_a_pool_wakes_on_the_notification(dsn: str, client: Client) -> None:
    task = client.submit("free", "an async owl", n=1)
    readings: list[TaskInfo] = []

    async def main() -> TaskInfo:
        first = asyncio.Event()

        def progress(info: TaskInfo) -> None:
            readings.append(info)
            first.set()

        # no autocommit: the wait ends its own transactions so the notification can come
        async with AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool:
            gw = AsyncClient(pool=pool)
            waiting = asyncio.create_task(
                gw.wait(task, poll_s=3600, timeout_s=60, progress=progress)
            )
            await asyncio.wait_for(first.wait(), 10)
            await asyncio.to_thread(finish, dsn)
            return await asyncio.wait_for(waiting, 30)

    assert asyncio.run(main()).status == "succeeded"
    assert [r.status for r in readings] == ["queued", "succeeded"]
