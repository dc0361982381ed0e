"""The Python client inside a web app: on the app's own connection or pool, in the app's
transaction (a rolled-back submit leaves nothing), and the follow-up calls (get, wait
with a progress callback, cancel, retry) from both `Client` and `AsyncClient`."""

from __future__ import annotations

import asyncio
import threading

import psycopg
import pytest
from genworker import AsyncClient, Client, TaskInfo
from genworker.errors import GenworkerError, InvalidPlan, TaskNotFound
from genworker.model import Outcome, OutcomeKind, TaskStatus
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from queue_support import counts, sync_queue


def finish_all(dsn: str, kind: OutcomeKind = OutcomeKind.OK) -> int:
    """Play a node: claim every runnable job and report `kind` for each."""
    with sync_queue(dsn) as q:
        jobs = q.claim("test-node", 1000, 30.0)
        q.complete(
            [Outcome(j.job_id, j.token, kind, result={"n": j.idx}, error="refused") for j in jobs]
        )
    return len(jobs)


def test_a_submit_rolled_back_with_the_apps_transaction_leaves_nothing(dsn: str) -> None:
    with psycopg.connect(dsn) as app:  # not autocommit: the app's own transaction
        app.execute("CREATE TEMP TABLE orders (id int)")  # the app's own work, same transaction
        Client(conn=app).submit("pro", "a lighthouse", tenant="acme")
        assert counts(app) == (1, 70)  # visible inside the transaction...
        app.rollback()
    with psycopg.connect(dsn, autocommit=True) as other:
        assert counts(other) == (0, 0)  # ...and gone with it


def test_a_submit_commits_with_the_apps_transaction(dsn: str) -> None:
    with psycopg.connect(dsn) as app:
        with app.transaction():
            task = Client(conn=app).submit("free", "a cat", tenant="acme")
            with psycopg.connect(dsn, autocommit=True) as other:
                assert counts(other) == (0, 0)  # nobody sees it before the commit
        with psycopg.connect(dsn, autocommit=True) as other:
            assert Client(conn=other).get(task).n_jobs == 2


def test_a_failed_submit_raises_a_typed_error_and_the_app_decides(dsn: str) -> None:
    with psycopg.connect(dsn) as app:
        client = Client(conn=app)
        client.submit("free", "kept")
        with pytest.raises(InvalidPlan):
            client.submit("platinum", "no such plan")
        app.rollback()  # the app's transaction is aborted: rolling back is its call
        assert counts(app) == (0, 0)


def test_the_apps_pool_serves_every_call(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, max_size=2, open=True) as pool:
        client = Client(pool=pool)
        task = client.submit("start", "a red bicycle", tenant="acme")
        assert client.get(task).status is TaskStatus.QUEUED
        assert [t.id for t in client.tasks(tenant="acme")] == [task]
        assert client.cancel(task) is TaskStatus.CANCELLED
        assert client.get(task).cancelled == 30


def test_wait_reports_progress_until_the_task_is_done(dsn: str) -> None:
    with Client(dsn) as client:
        task = client.submit("free", "a cat")
        seen: list[TaskInfo] = []
        worker = threading.Timer(0.3, finish_all, args=(dsn,))
        worker.start()
        try:
            info = client.wait(task, timeout_s=60, poll_s=0.05, progress=seen.append)
        finally:
            worker.join()
    assert info.status is TaskStatus.SUCCEEDED
    assert info.succeeded == 2
    assert seen[0].remaining == 2
    assert seen[-1] == info


def test_wait_gives_up_after_its_timeout(dsn: str) -> None:
    with Client(dsn) as client:
        task = client.submit("free", "nobody runs me")
        with pytest.raises(TimeoutError, match=f"task {task} not finished"):
            client.wait(task, timeout_s=0.2, poll_s=0.05)


def test_retry_requeues_the_dead_jobs_of_a_failed_task(dsn: str) -> None:
    with Client(dsn) as client:
        task = client.submit("free", "refused at first")
        assert finish_all(dsn, OutcomeKind.DEAD) == 2
        assert client.get(task).status is TaskStatus.FAILED
        assert client.retry(task) == 2
        assert client.get(task).status is TaskStatus.RUNNING
        finish_all(dsn)
        assert client.get(task, jobs=True).status is TaskStatus.SUCCEEDED


def test_the_async_client_in_the_apps_transaction_and_pool(dsn: str) -> None:
    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as app:
            await AsyncClient(conn=app).submit("pro", "rolled back")
            await app.rollback()
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False)
        await pool.open()
        try:
            client = AsyncClient(pool=pool)
            task = await client.submit("free", "kept")
            seen: list[int] = []
            done = asyncio.get_running_loop().run_in_executor(None, finish_all, dsn)
            info = await client.wait(
                task, timeout_s=60, poll_s=0.05, progress=lambda i: seen.append(i.remaining)
            )
            await done
            assert info.status is TaskStatus.SUCCEEDED
            assert seen[-1] == 0
            assert [t.id for t in await client.tasks()] == [task]
            with pytest.raises(TaskNotFound):
                await client.get(task + 1000)
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_client_with_no_argument_uses_database_url(
    dsn: str, conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", dsn)  # removed for the tests; set for this one
    monkeypatch.setenv("GENWORKER_CONFIG", "/dev/null")  # no host config file in the way
    with Client() as gw:
        task = gw.submit("free", "a gull", tenant="acme")
        assert gw.get(task).tenant == "acme"

    async def from_async() -> int:
        async with AsyncClient() as gw:
            return int(await gw.submit("free", "a tern"))

    asyncio.run(from_async())
    assert counts(conn) == (2, 4)


def test_a_client_takes_at_most_one_source(dsn: str) -> None:
    with psycopg.connect(dsn) as c, pytest.raises(GenworkerError):
        Client(dsn, conn=c)
