"""The Listener: a submit's NOTIFY wakes it, and after its connection is killed it
reconnects by itself and still wakes."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from genworker.queue.client import AsyncClient
from genworker.queue.store import Listener

WAKE_S = 5.0


async def _until(condition: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


async def _woken_by_a_submit(wake: asyncio.Event, client: AsyncClient) -> None:
    wake.clear()
    await client.submit("free", "wake up")
    await asyncio.wait_for(wake.wait(), WAKE_S)


async def _listen_kill_listen(dsn: str) -> Listener:
    wake, stop = asyncio.Event(), asyncio.Event()
    listener = Listener(dsn, wake, check_every_s=0.2)
    runner = asyncio.create_task(listener.run(stop))
    try:
        async with AsyncClient(dsn) as client:
            await _until(lambda: listener.connected, 10)
            await _woken_by_a_submit(wake, client)

            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
                cur = await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'genworker-listen' AND datname = current_database()"
                )
                assert await cur.fetchall() == [(True,)]
            await _until(lambda: listener.reconnects == 1 and listener.connected, 15)

            await _woken_by_a_submit(wake, client)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
    return listener


@pytest.mark.timeout(60)
def test_listener_wakes_on_submit_and_survives_a_killed_connection(dsn: str) -> None:
    listener = asyncio.run(_listen_kill_listen(dsn))
    assert not listener.connected
