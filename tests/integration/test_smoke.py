"""The fixtures' path through the server (embedded in CI's smoke run): submit fans out."""

import psycopg
import pytest
from genworker.queue.client import Client

pytestmark = pytest.mark.embedded


def test_submit_fans_out_into_jobs(client: Client, conn: psycopg.Connection) -> None:
    task = client.submit("pro", "a lighthouse at dawn")
    info = client.get(task)
    assert info.n_jobs == 70
    assert (
        conn.execute("SELECT count(*) FROM genworker.jobs WHERE task_id = %s", (task,)).fetchone()[
            0
        ]
        == 70
    )
