"""Connecting to PostgreSQL: which server, and errors a user can act on.

Every DB error that reaches a user goes through `explain`, which never repeats
the DSN's password (psycopg's own messages can contain the connection string).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import psycopg
from psycopg import errors as pgerr
from psycopg_pool import PoolTimeout

from genworker.config import Settings, mask_dsn
from genworker.errors import BY_SQLSTATE, DatabaseError, GenworkerError, ValidationError

APP_NAME = "genworker"

# What a long-running loop rides out (log, back off, retry) rather than die of. A statement
# cancelled by a timeout is one of them: a lock held too long is an outage of sorts.
DB_ERRORS = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    PoolTimeout,
    pgerr.QueryCanceled,
    pgerr.LockNotAvailable,
)


def resolve_dsn(settings: Settings) -> str:
    """The DSN to use: DATABASE_URL, or the embedded server (started on demand)."""
    if settings.database_url:
        return settings.database_url
    from genworker.queue.embedded import ensure_embedded

    return ensure_embedded(settings.resolved_data_dir)


def default_dsn() -> tuple[str, bool]:
    """What `Client()` with no argument connects to, and whether it is the embedded server:
    DATABASE_URL (or the config file's database_url), else the embedded server in the data
    directory (GENWORKER_DATA_DIR, default $XDG_DATA_HOME/genworker), started on demand."""
    from genworker.config import build

    settings, _ = build()
    return resolve_dsn(settings), settings.database_url is None


def _scrub(text: str, dsn: str | None) -> str:
    text = text.strip().splitlines()[0] if text.strip() else text
    if dsn:
        password = psycopg.conninfo.conninfo_to_dict(dsn).get("password")
        if password:
            text = text.replace(str(password), "***")
    return re.sub(r"password=\S+", "password=***", text)


def explain(exc: BaseException, dsn: str | None = None) -> GenworkerError:
    """Turn a psycopg exception into a typed genworker error with a one-line message."""
    if isinstance(exc, GenworkerError):
        return exc
    if isinstance(exc, psycopg.Error):
        state = getattr(exc, "sqlstate", None) or ""
        diag = getattr(exc, "diag", None)
        primary = (diag.message_primary if diag is not None else None) or str(exc)
        if state in BY_SQLSTATE:
            cls = BY_SQLSTATE[state]
            if issubclass(cls, ValidationError):
                return cls(primary, state)
            return cls(primary)
        if state == "22P05" or "\\u0000" in primary or "NUL" in primary:
            return ValidationError("invalid input: text may not contain NUL bytes", "GW006")
        if state.startswith("22"):
            return ValidationError(f"invalid input: {_scrub(primary, dsn)}", "GW006")
        if isinstance(exc, psycopg.OperationalError):
            where = mask_dsn(dsn) if dsn else "the database"
            return DatabaseError(
                f"cannot connect to {where}: {_scrub(primary, dsn)} "
                "(is PostgreSQL running, and are DATABASE_URL's host, port and credentials right?)"
            )
        if isinstance(
            exc, pgerr.UndefinedFunction | pgerr.UndefinedTable | pgerr.InvalidSchemaName
        ):
            return DatabaseError("the genworker schema is missing or old: run `genworker migrate`")
        return DatabaseError(f"database error: {_scrub(primary, dsn)}")
    return DatabaseError(f"database error: {type(exc).__name__}")


@contextlib.contextmanager
def translated(dsn: str | None = None) -> Iterator[None]:
    """Re-raise psycopg errors as typed genworker errors (one line, no secrets)."""
    try:
        yield
    except psycopg.Error as e:
        raise explain(e, dsn) from None


def connect(dsn: str, *, autocommit: bool = True, timeout_s: float = 10) -> psycopg.Connection:
    with translated(dsn):
        return psycopg.connect(
            dsn,
            autocommit=autocommit,
            connect_timeout=max(1, int(timeout_s)),
            application_name=APP_NAME,
        )


async def aconnect(
    dsn: str, *, autocommit: bool = True, timeout_s: float = 10
) -> psycopg.AsyncConnection:
    with translated(dsn):
        return await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=autocommit,
            connect_timeout=max(1, int(timeout_s)),
            application_name=APP_NAME,
        )
