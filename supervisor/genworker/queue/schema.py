"""Schema management: apply the numbered migrations and keep the SQL-side settings in step.

Safe when several hosts migrate at once: everything runs in one transaction that
first takes an advisory lock, so the second host waits and then finds nothing to do.
"""

from __future__ import annotations

import json

import psycopg

from genworker.config import Settings
from genworker.errors import SchemaMissing
from genworker.queue import sql
from genworker.queue.db import translated


def migrate(conn: psycopg.Connection, settings: Settings | None = None) -> list[str]:
    """Apply missing migrations (and sync plans/settings); returns the names applied."""
    applied: list[str] = []
    with translated(), conn.transaction():
        conn.execute(sql.query("migrate_lock"))
        conn.execute(sql.query("migrate_bootstrap"))
        done = {row[0] for row in conn.execute(sql.query("applied_migrations"))}
        for mig in sql.migrations():
            if mig.version in done:
                continue
            conn.execute(mig.sql.encode())
            conn.execute(sql.query("record_migration"), {"version": mig.version, "name": mig.name})
            applied.append(f"{mig.version:04d}_{mig.name}")
        if settings is not None:
            sync_settings(conn, settings)
    return applied


def sync_settings(conn: psycopg.Connection, settings: Settings) -> None:
    """Write the plans and limits that `genworker.submit_task` validates against, and the
    knobs of the order of service and of the tenant caps that the claim reads."""
    for plan in settings.plans:
        conn.execute(
            sql.query("upsert_plan"),
            {
                "name": plan.name,
                "images": plan.images,
                "priority": plan.priority,
                "tenant_cap": plan.tenant_cap,
            },
        )
    conn.execute(sql.query("delete_other_plans"), {"names": [p.name for p in settings.plans]})
    for key, value in {
        "max_prompt_chars": settings.max_prompt_chars,
        "max_attempts": settings.max_attempts,
        "priority_step_s": settings.priority_step_s,
        "size_step_s": settings.size_step_s,
        "tenant_cap": settings.tenant_cap,
    }.items():
        conn.execute(sql.query("upsert_setting"), {"key": key, "value": json.dumps(value)})


def schema_version(conn: psycopg.Connection) -> int | None:
    with translated():
        row = conn.execute(sql.query("schema_version")).fetchone()
    return row[0] if row else None


def require_schema(conn: psycopg.Connection) -> None:
    """Fail with one clear line when the database has not been migrated to this version."""
    have = schema_version(conn)
    want = len(sql.migrations())
    if have is None:
        raise SchemaMissing("this database has no genworker schema: run `genworker migrate`")
    if have < want:
        raise SchemaMissing(f"schema version {have} is older than {want}: run `genworker migrate`")
    if have > want:
        raise SchemaMissing(
            f"schema version {have} is newer than this genworker ({want}): upgrade genworker"
        )
