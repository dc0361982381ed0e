import pytest

pytestmark = pytest.mark.embedded

from supervisor.client import Client


def test_submit_fans_out_into_jobs(client: Client, conn) -> None:
    task = client.submit("pro", "a lighthouse at dawn")
    info = client.get(task)
    assert info.n_jobs == 70
    assert (
        conn.execute("SELECT count(*) FROM genworker.jobs WHERE task_id = %s", (task,)).fetchone()[
            0
        ]
        == 70
    )
