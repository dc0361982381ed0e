"""Rolling upgrades: nodes of the previous version (their SQL calls, verbatim) and of this
one share a database of this schema, both claiming and completing; a node runs against a
schema one version newer only when that version says it is compatible with it."""

from __future__ import annotations

import json

import psycopg
import pytest
from genworker.config import Settings
from genworker.errors import SchemaMissing
from genworker.model import Outcome, OutcomeKind
from genworker.queue import schema, sql
from queue_support import counts, sync_queue, task_row
from test_queue_migrations import catalog

# The blocks of queries.sql as version 3 (0003_scheduling) shipped them: what an old node
# still sends while the new ones roll out.
OLD_CLAIM = """
SELECT job_id, token, task_id, idx, kind, attempt, params::text AS params, deaths, urgency
  FROM genworker.claim_jobs(%(node)s, %(n)s, %(lease_s)s)
"""
OLD_COMPLETE = """
SELECT c.job_id, c.status
  FROM (SELECT array_agg((o ->> 0)::bigint ORDER BY n) AS ids,
               array_agg((o ->> 1)::bigint ORDER BY n) AS tokens,
               array_agg(o ->> 2 ORDER BY n) AS kinds,
               array_agg(nullif(o -> 3, 'null') ORDER BY n) AS results,
               array_agg(o ->> 4 ORDER BY n) AS errors,
               array_agg((o ->> 5)::float8 ORDER BY n) AS delays
          FROM jsonb_array_elements(%(batch)s::jsonb) WITH ORDINALITY AS b(o, n)) a,
       genworker.complete_jobs(a.ids, a.tokens, a.kinds, a.results, a.errors, a.delays,
                               %(snooze_max_s)s) c
"""
OLD_REGISTER = """
INSERT INTO genworker.nodes (id, host, pid, workers, status, info)
VALUES (%(node)s, %(host)s, %(pid)s, %(workers)s, 'alive', %(info)s)
ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid,
    workers = excluded.workers, status = 'alive', started_at = now(), heartbeat_at = now(),
    info = excluded.info
"""
OLD_SUBMIT = "SELECT genworker.submit_task(%s, %s::jsonb, %s, %s, %s, %s)"


def test_old_and_new_nodes_share_one_database(dsn: str, conn: psycopg.Connection) -> None:
    for i in range(4):
        conn.execute(OLD_SUBMIT, ("free", json.dumps({"prompt": f"p{i}"}), "t", "image", None, 2))
    conn.execute(OLD_REGISTER, {"node": "old", "host": "h", "pid": 1, "workers": 1, "info": "{}"})
    old = conn.execute(OLD_CLAIM, {"node": "old", "n": 4, "lease_s": 30}).fetchall()
    with sync_queue(dsn) as q:
        q.register_node("new", "h", 2, 1, {}, kinds=["image", "noop"])
        new = q.claim("new", 10, 30)
        assert len(old) == 4
        assert len(new) == 4
        assert not {r[0] for r in old} & {j.job_id for j in new}
        batch = [
            [job_id, token, "ok", {"path": "/r/a.png", "usage": {"output_tokens": 7}}, None, None]
            for job_id, token, *_ in old
        ]
        done = conn.execute(OLD_COMPLETE, {"batch": json.dumps(batch), "snooze_max_s": 3600})
        assert {status for _, status in done.fetchall()} == {"succeeded"}
        applied = q.complete([Outcome(j.job_id, j.token, OutcomeKind.OK, {}) for j in new])
        assert set(applied.applied.values()) == {"succeeded"}
    statuses = conn.execute("SELECT status, count(*) FROM genworker.tasks GROUP BY 1").fetchall()
    assert statuses == [("succeeded", 4)]
    tokens = conn.execute("SELECT sum(output_tokens) FROM genworker.tasks").fetchone()
    assert tokens == (28,)  # the old node's completions record usage too
    kinds = conn.execute("SELECT id, kinds FROM genworker.nodes ORDER BY id").fetchall()
    assert kinds == [("new", ["image", "noop"]), ("old", None)]
    assert counts(conn) == (4, 8)


def test_an_old_node_claims_every_kind(conn: psycopg.Connection) -> None:
    conn.execute(OLD_SUBMIT, ("free", '{"w": 1}', "t", "resize", None, 1))
    rows = conn.execute(OLD_CLAIM, {"node": "old", "n": 5, "lease_s": 30}).fetchall()
    assert [r[4] for r in rows] == ["resize"]
    assert task_row(conn, rows[0][2])["status"] == "running"


def _newer(conn: psycopg.Connection, *compatible_with: int | None) -> None:
    """Pretend later genworkers migrated this database, one version per argument."""
    have = len(sql.migrations())
    for i, compat in enumerate(compatible_with, start=1):
        conn.execute(
            sql.query("record_migration"),
            {"version": have + i, "name": f"future_{i}", "compatible_with": compat},
        )


def test_a_schema_one_version_newer_and_compatible_is_accepted(
    conn: psycopg.Connection,
) -> None:
    _newer(conn, len(sql.migrations()))
    # what the newer version wrote: a model this code does not know, its own settings
    conn.execute(
        "INSERT INTO genworker.image_models (name, max_prompt_chars, sizes, n_max)"
        " VALUES ('gpt-image-2', 32000, '{auto}', 10)"
    )
    conn.execute("UPDATE genworker.settings SET value = '2048' WHERE key = 'max_params_bytes'")
    assert schema.migrate(conn, Settings()) == []
    schema.require_schema(conn)
    # the older node left them as they were: it must not roll the newer nodes' contract back
    models = {r[0] for r in conn.execute("SELECT name FROM genworker.image_models")}
    assert "gpt-image-2" in models
    row = conn.execute("SELECT value FROM genworker.settings WHERE key = 'max_params_bytes'")
    assert row.fetchone() == (2048,)


@pytest.mark.parametrize(
    ("compatible_with", "words"),
    [
        ((None,), "not marked compatible with it"),
        ((99,), "needs genworker with schema 99 or later"),
        ((4, 4), "more than one version ahead"),
    ],
)
def test_a_newer_schema_that_is_not_compatible_is_refused_in_one_line(
    conn: psycopg.Connection, compatible_with: tuple[int | None, ...], words: str
) -> None:
    _newer(conn, *compatible_with)
    have = len(sql.migrations()) + len(compatible_with)
    for check in (lambda: schema.migrate(conn, Settings()), lambda: schema.require_schema(conn)):
        with pytest.raises(SchemaMissing) as caught:
            check()
        message = str(caught.value)
        assert message.startswith(f"schema version {have} is newer than this genworker")
        assert words in message
        assert message.endswith("upgrade genworker on this host")
        assert "\n" not in message


def test_every_migration_records_what_it_is_compatible_with(conn: psycopg.Connection) -> None:
    rows = conn.execute("SELECT version, compatible_with FROM genworker.migrations ORDER BY 1")
    assert rows.fetchall() == [(m.version, m.compatible_with) for m in sql.migrations()]
    assert sql.migrations()[3].compatible_with == 3


def test_migration_4_can_run_again(dsn: str, conn: psycopg.Connection) -> None:
    """A rollback that forgets version 4 and an upgrade that re-applies it: same schema."""
    before = catalog(dsn)
    conn.execute(sql.migrations()[3].sql.encode())
    assert catalog(dsn) == before
