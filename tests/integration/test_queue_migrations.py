"""Migrations: idempotent, safe from several processes at once, and an install
upgraded step by step ends with exactly the schema of a fresh install."""

from __future__ import annotations

import multiprocessing as mp
import queue as stdqueue
from typing import Any

import psycopg
import pytest
from genworker.config import Settings
from genworker.queue import schema, sql

# What a schema is, as the catalog sees it. Every query is ordered, so two dumps
# compare with ==; ordinal positions are left out (a column added later lands last).
CATALOG: dict[str, str] = {
    "relations": """
        SELECT c.relname, c.relkind, c.relpersistence, coalesce(c.reloptions::text, '')
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'genworker' ORDER BY 1""",
    "columns": """
        SELECT table_name, column_name, data_type, udt_name, is_nullable,
               coalesce(column_default, ''), is_identity, coalesce(identity_generation, ''),
               coalesce(collation_name, '')
          FROM information_schema.columns WHERE table_schema = 'genworker' ORDER BY 1, 2""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid)
          FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
         WHERE n.nspname = 'genworker' ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
         WHERE schemaname = 'genworker' ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid)
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'genworker' ORDER BY 1, 2""",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid)
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'genworker' AND NOT t.tgisinternal ORDER BY 1, 2""",
    "views": """
        SELECT table_name, view_definition FROM information_schema.views
         WHERE table_schema = 'genworker' ORDER BY 1""",
    "types": """
        SELECT t.typname, t.typtype,
               coalesce((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                           FROM pg_enum e WHERE e.enumtypid = t.oid), '')
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE n.nspname = 'genworker' AND t.typtype IN ('e', 'd', 'r') ORDER BY 1""",
    "migrations": "SELECT version, name FROM genworker.migrations ORDER BY 1",
}


def catalog(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(dsn) as c:
        return {name: c.execute(query).fetchall() for name, query in CATALOG.items()}


def all_names() -> list[str]:
    return [f"{m.version:04d}_{m.name}" for m in sql.migrations()]


def test_migrate_twice_applies_nothing_the_second_time(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert schema.migrate(c, Settings()) == all_names()
        first = catalog(empty_dsn)
        assert schema.migrate(c, Settings()) == []
        assert schema.schema_version(c) == len(sql.migrations())
        schema.require_schema(c)
    assert catalog(empty_dsn) == first


def _migrate_in_process(dsn: str, start: Any, results: Any) -> None:
    start.wait(60)
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            results.put(("ok", schema.migrate(c, Settings())))
    except Exception as e:  # reported to the parent, which fails the test with it
        results.put(("error", f"{type(e).__name__}: {e}"))


@pytest.mark.timeout(120)
def test_four_processes_migrating_at_once_apply_it_once(empty_dsn: str) -> None:
    processes = 4
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_migrate_in_process, args=(empty_dsn, start, results))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=90) for _ in procs]
        for p in procs:
            p.join(10)
    except stdqueue.Empty:
        pytest.fail("a migrating process did not report back in time")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)

    assert [kind for kind, _ in outcomes] == ["ok"] * processes, outcomes
    applied = sorted((names for _, names in outcomes), key=len)
    assert applied == [[]] * (processes - 1) + [all_names()]
    with psycopg.connect(empty_dsn) as c:
        rows = c.execute("SELECT version FROM genworker.migrations ORDER BY 1").fetchall()
    assert rows == [(m.version,) for m in sql.migrations()]


def _install_up_to(dsn: str, version: int) -> None:
    """An install that stopped at `version`: what an older genworker's migrate left."""
    with psycopg.connect(dsn, autocommit=True) as c, c.transaction():
        c.execute(sql.query("migrate_bootstrap"))
        for mig in sql.migrations()[:version]:
            c.execute(mig.sql.encode())
            c.execute(
                sql.query("record_migration"),
                {"version": mig.version, "name": mig.name, "compatible_with": mig.compatible_with},
            )


# Every starting point: 0 is a fresh install; k upgrades a version-k install. With one
# migration file this is trivially equal; each new file adds a case that is not.
@pytest.mark.parametrize("installed", range(len(sql.migrations())))
def test_an_upgraded_install_has_the_schema_of_a_fresh_one(
    empty_dsn: str, dsn: str, installed: int
) -> None:
    _install_up_to(empty_dsn, installed)
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert schema.migrate(c, Settings()) == all_names()[installed:]
    upgraded, fresh = catalog(empty_dsn), catalog(dsn)
    for part in CATALOG:
        assert upgraded[part] == fresh[part], f"{part} differ after upgrading from {installed}"


def test_the_catalog_comparison_sees_a_difference(empty_dsn: str, dsn: str) -> None:
    """The comparison above is not vacuous: one extra index is enough to fail it."""
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        schema.migrate(c, Settings())
        assert catalog(empty_dsn) == catalog(dsn)
        c.execute("CREATE INDEX extra ON genworker.jobs (kind)")
    assert catalog(empty_dsn)["indexes"] != catalog(dsn)["indexes"]
    assert {"jobs_queued", "tasks_idempotency"} <= {r[1] for r in catalog(dsn)["indexes"]}
