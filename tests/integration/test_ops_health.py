"""/healthz and /readyz of a real node: 503 with the reason while its PostgreSQL is stopped
(a private server: the machine's shared one is never touched), 200 once it is back; the
db_wait alarm fires and clears with one line each; a port in use stops the start with
one line."""

from __future__ import annotations

import signal
import socket

import psycopg
from genworker.queue.client import Client
from ops_support import alarm_lines, get, http_address, private_postgres, readyz
from supervisor_harness import (
    Launcher,
    launch_fixture,  # noqa: F401  (the launch fixture)
    wait_for,
)


def test_readyz_turns_503_while_postgresql_is_stopped_and_200_when_it_is_back(
    launch: Launcher,
) -> None:
    with private_postgres() as pg:
        dsn = pg.migrated_db("gwops_readyz")
        sim = launch.sim(latency_ms=50)
        node = launch.node(
            sim, "test-readyz", "--http", "127.0.0.1:0", "--db-pool-timeout", "2",
            "--alarms", "db_wait_s=1,db_window_s=4",
            dsn=dsn, workers=2, lease_s=3,
        )  # fmt: skip
        address = http_address(node)
        node.wait_workers(2)
        wait_for(lambda: readyz(address)[0] == 200, "ready", 20)
        with Client(dsn) as client:
            client.submit("free", "before the outage")

        pg.stop()
        _, doc = wait_for(
            lambda: (r := readyz(address))[0] == 503 and r, "503 with the database down", 30
        )
        assert doc["ready"] is False
        assert "database unreachable" in doc["reasons"], doc
        assert get(address, "/healthz") == (200, "ok\n")  # the process itself answers
        wait_for(lambda: "alarm db_wait raised" in node.log(), "the db_wait alarm", 30)
        node.check_running()  # an outage is no reason to exit

        pg.start()
        _, doc = wait_for(lambda: (r := readyz(address))[0] == 200 and r, "200 again", 60)
        assert doc == {"ready": True, "reasons": []}
        with Client(dsn) as client:  # and it works again
            task = client.submit("free", "after the outage")
            assert client.wait(task, timeout_s=30).status == "succeeded"
        node.signal(signal.SIGTERM)
        assert node.wait(30) == 0, node.log()[-3000:]
        lines = alarm_lines(node.log())
        assert lines.get("db_wait") == ["raised", "cleared"], node.log()[-3000:]
        assert "database unreachable" in node.log()
        assert "database reachable again" in node.log()


def test_a_port_in_use_ends_the_start_with_one_line(launch: Launcher, dsn: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sim = launch.sim(latency_ms=50)
        node = launch.node(sim, "test-busy-port", "--http", f"127.0.0.1:{port}")
        code = node.wait(30)
    assert code == 1
    lines = node.log().strip().splitlines()
    assert lines == [
        f"genworker: error: cannot serve metrics on 127.0.0.1:{port}: port in use "
        "(another genworker? choose another --http, or '' to disable)"
    ]
    with psycopg.connect(dsn) as conn:  # nothing was claimed or registered
        assert conn.execute("SELECT count(*) FROM genworker.nodes").fetchone() == (0,)
