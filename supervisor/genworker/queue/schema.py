"""Schema management: apply the numbered migrations and keep the SQL-side settings in step.

Safe when several hosts migrate at once: everything runs in one transaction that
first takes an advisory lock, so the second host waits and then finds nothing to do.

A database may be one version ahead of this code during a rolling upgrade: that is fine
when the newer migration says it is `compatible_with` this version (its header line, kept
in the migrations table), and refused with one line otherwise.
"""

from __future__ import annotations

import json
import logging

import psycopg
from psycopg.types.json import Jsonb

from genworker import contract
from genworker.config import Settings
from genworker.errors import SchemaMissing
from genworker.queue import sql
from genworker.queue.db import translated

log = logging.getLogger("genworker.queue")


def migrate(conn: psycopg.Connection, settings: Settings | None = None) -> list[str]:
    """Apply missing migrations and sync the model contract (and, given settings, the
    plans and SQL-side settings); returns the names applied. Refuses a schema newer than
    this code unless that schema says it is compatible with it."""
    applied: list[str] = []
    with translated(), conn.transaction():
        conn.execute(sql.query("migrate_lock"))
        conn.execute(sql.query("migrate_bootstrap"))
        newer = check_newer(conn)
        done = {row[0] for row in conn.execute(sql.query("applied_migrations"))}
        for mig in sql.migrations():
            if mig.version in done:
                continue
            conn.execute(mig.sql.encode())
            conn.execute(
                sql.query("record_migration"),
                {"version": mig.version, "name": mig.name, "compatible_with": mig.compatible_with},
            )
            applied.append(f"{mig.version:04d}_{mig.name}")
        if newer:
            # an older node in a rolling upgrade: the newer code owns the model table and
            # the SQL-side settings; writing ours would roll them back under the new nodes
            return applied
        sync_contract(conn)
        if settings is not None:
            sync_settings(conn, settings)
    return applied


def sync_contract(conn: psycopg.Connection) -> None:
    """Write `genworker.image_models` and the task options from `contract`: what
    `genworker.submit_task` checks an image task against."""
    for model in contract.MODELS.values():
        row = model.as_row()
        conn.execute(sql.query("upsert_image_model"), {**row, "options": Jsonb(row["options"])})
    conn.execute(sql.query("delete_other_image_models"), {"names": list(contract.MODELS)})
    conn.execute(
        sql.query("upsert_setting"),
        {"key": "task_options", "value": json.dumps(list(contract.TASK_OPTIONS))},
    )


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
                "models": None if plan.models is None else list(plan.models),
            },
        )
    conn.execute(sql.query("delete_other_plans"), {"names": [p.name for p in settings.plans]})
    for key, value in {
        "max_prompt_chars": settings.max_prompt_chars,
        "max_attempts": settings.max_attempts,
        "priority_step_s": settings.priority_step_s,
        "size_step_s": settings.size_step_s,
        "tenant_cap": settings.tenant_cap,
        "default_model": settings.model,
        "max_params_bytes": settings.max_params_bytes,
        "max_queued_tasks_per_tenant": settings.max_queued_tasks_per_tenant,
    }.items():
        conn.execute(sql.query("upsert_setting"), {"key": key, "value": json.dumps(value)})


def schema_version(conn: psycopg.Connection) -> int | None:
    with translated():
        row = conn.execute(sql.query("schema_version")).fetchone()
    return row[0] if row else None


def check_newer(conn: psycopg.Connection) -> bool:
    """Refuse a schema newer than this code unless it is one version newer and that
    version is marked compatible with this one; True when it is such a newer schema.
    (Needs the migrations table.)"""
    want = len(sql.migrations())
    newer = conn.execute(sql.query("newer_migrations"), {"version": want}).fetchall()
    if not newer:
        return False
    have, name, compatible_with = newer[-1]
    if len(newer) == 1 and compatible_with is not None and compatible_with <= want:
        log.warning(
            "schema version %d (%s) is newer than this genworker (%d) and compatible with it; "
            "upgrade genworker on this host when you can",
            have,
            name,
            want,
        )
        return True
    why = (
        "more than one version ahead"
        if len(newer) > 1
        else "not marked compatible with it"
        if compatible_with is None
        else f"needs genworker with schema {compatible_with} or later"
    )
    raise SchemaMissing(
        f"schema version {have} is newer than this genworker ({want}) and {why}: "
        "upgrade genworker on this host"
    )


def require_schema(conn: psycopg.Connection) -> None:
    """Fail with one clear line when the database has not been migrated to this version,
    or is newer than this version can run against."""
    have = schema_version(conn)
    want = len(sql.migrations())
    if have is None:
        raise SchemaMissing("this database has no genworker schema: run `genworker migrate`")
    if have < want:
        raise SchemaMissing(f"schema version {have} is older than {want}: run `genworker migrate`")
    if have > want:
        with translated():
            check_newer(conn)
