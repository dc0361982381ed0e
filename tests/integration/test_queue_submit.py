"""Submit: idempotency keys (one task per tenant and key, even under concurrent
submits), and every validation error, from plain SQL and from the Python client,
with nothing written."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from genworker import errors
from genworker.queue.client import Client
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb
from queue_support import counts
from testdb import database_name

# ------------------------------------------------------------------ idempotency


def test_the_same_key_twice_returns_the_first_task(
    conn: psycopg.Connection, client: Client
) -> None:
    first = client.submit("pro", "a lighthouse", tenant="acme", idempotency_key="order-1")
    again = client.submit("pro", "a lighthouse", tenant="acme", idempotency_key="order-1")
    assert again == first
    assert counts(conn) == (1, 70)
    other_tenant = client.submit(
        "pro", "a lighthouse", tenant="umbrella", idempotency_key="order-1"
    )
    assert other_tenant != first
    in_one_bulk = client.submit_many([{"plan": "free", "prompt": "x", "idempotency_key": "k2"}] * 3)
    assert len(set(in_one_bulk)) == 1
    assert counts(conn) == (3, 142)


def test_concurrent_submits_of_one_key_make_one_task(dsn: str, conn: psycopg.Connection) -> None:
    threads = 8
    start = threading.Barrier(threads)

    def submit(_: int) -> int:
        with Client(dsn) as c:
            c.tasks(limit=1)  # the connection opens lazily: open it before the race
            start.wait(30)
            return c.submit("start", "a double click", tenant="t1", idempotency_key="click")

    with ThreadPoolExecutor(threads) as pool:
        ids = list(pool.map(submit, range(threads), timeout=60))
    assert len(set(ids)) == 1
    assert counts(conn) == (1, 30)


# ------------------------------------------------------------------ validation
# A rejected submit writes nothing, so the many cases below can share one database:
# each one checks that the row counts did not move.


@pytest.fixture(scope="module")
def shared_dsn(admin_dsn: str, template_db: str) -> Iterator[str]:
    name = database_name(os.getpid(), 999999)  # the shape conftest cleans up after a crash
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        yield make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def shared_conn(shared_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(shared_dsn, autocommit=True) as c:
        yield c


@pytest.fixture
def shared_client(shared_dsn: str) -> Iterator[Client]:
    with Client(shared_dsn) as c:
        yield c


PROMPT_LIMIT = 4000

# (what is wrong, SQL arguments of genworker.submit_task, SQLSTATE)
SQL_CASES: list[tuple[str, tuple[Any, ...], str]] = [
    ("unknown plan", ("gold", {"prompt": "x"}, "t"), "GW001"),
    ("NULL plan", (None, {"prompt": "x"}, "t"), "GW001"),
    ("empty prompt", ("free", {"prompt": ""}, "t"), "GW002"),
    ("whitespace prompt", ("free", {"prompt": " \t\n\r "}, "t"), "GW002"),
    ("over-long prompt", ("free", {"prompt": "x" * (PROMPT_LIMIT + 1)}, "t"), "GW002"),
    ("no prompt", ("free", {"size": "auto"}, "t"), "GW002"),
    ("prompt not a string", ("free", {"prompt": 42}, "t"), "GW002"),
    ("bad size", ("free", {"prompt": "x", "size": "huge"}, "t"), "GW003"),
    ("zero size", ("free", {"prompt": "x", "size": "0x0"}, "t"), "GW003"),
    ("size not a string", ("free", {"prompt": "x", "size": 1024}, "t"), "GW003"),
    ("tenant with a space", ("free", {"prompt": "x"}, "bad tenant"), "GW004"),
    ("empty tenant", ("free", {"prompt": "x"}, ""), "GW004"),
    ("over-long tenant", ("free", {"prompt": "x"}, "t" * 65), "GW004"),
    ("NULL tenant", ("free", {"prompt": "x"}, None), "GW004"),
    ("n zero", ("free", {"prompt": "x"}, "t", "image", None, 0), "GW005"),
    ("n negative", ("free", {"prompt": "x"}, "t", "image", None, -1), "GW005"),
    ("n over the plan", ("free", {"prompt": "x"}, "t", "image", None, 3), "GW005"),
    ("params an array", ("free", ["x"], "t"), "GW006"),
    ("params a string", ("free", "x", "t"), "GW006"),
    ("params NULL", ("free", None, "t"), "GW006"),
    ("empty idempotency key", ("free", {"prompt": "x"}, "t", "image", ""), "GW006"),
    ("bad kind", ("free", {"prompt": "x"}, "t", "Image!"), "GW007"),
]


def _submit_sql(conn: psycopg.Connection, args: tuple[Any, ...]) -> None:
    plan, params, *rest = args
    wrapped = None if params is None else Jsonb(params)
    placeholders = ", ".join(["%s::text", "%s::jsonb"] + ["%s"] * len(rest))
    conn.execute(f"SELECT genworker.submit_task({placeholders})", (plan, wrapped, *rest))


@pytest.mark.parametrize(("wrong", "args", "sqlstate"), SQL_CASES, ids=[c[0] for c in SQL_CASES])
def test_sql_submit_rejects_bad_input_and_writes_nothing(
    shared_conn: psycopg.Connection, wrong: str, args: tuple[Any, ...], sqlstate: str
) -> None:
    conn = shared_conn
    before = counts(conn)
    with pytest.raises(psycopg.Error) as caught:
        _submit_sql(conn, args)
    assert caught.value.sqlstate == sqlstate, wrong
    message = caught.value.diag.message_primary or ""
    assert message.startswith("invalid") or message.startswith("unknown"), message
    assert "\n" not in message
    assert counts(conn) == before


def test_sql_rejects_nul_bytes(shared_conn: psycopg.Connection) -> None:
    # JSON text cannot carry a NUL into PostgreSQL: the jsonb input itself refuses it.
    before = counts(shared_conn)
    with pytest.raises(psycopg.errors.UntranslatableCharacter):
        shared_conn.execute("""SELECT genworker.submit_task('free', '{"prompt": "a\\u0000b"}')""")
    assert counts(shared_conn) == before


def test_the_prompt_limit_comes_from_settings(conn: psycopg.Connection) -> None:
    _submit_sql(conn, ("free", {"prompt": "x" * PROMPT_LIMIT}, "t"))  # exactly the limit is fine
    conn.execute("UPDATE genworker.settings SET value = '10' WHERE key = 'max_prompt_chars'")
    with pytest.raises(psycopg.Error) as caught:
        _submit_sql(conn, ("free", {"prompt": "x" * 11}, "t"))
    assert caught.value.sqlstate == "GW002"
    assert "the limit is 10" in (caught.value.diag.message_primary or "")
    assert counts(conn) == (1, 2)


BULK_BAD_THIRD: list[tuple[str, Any, str]] = [
    ("unknown plan", {"plan": "gold", "params": {"prompt": "x"}}, "GW001"),
    ("empty prompt", {"plan": "free", "params": {"prompt": ""}}, "GW002"),
    ("fractional n", {"plan": "free", "params": {"prompt": "x"}, "n": 1.5}, "GW005"),
    ("huge n", {"plan": "free", "params": {"prompt": "x"}, "n": 1e12}, "GW005"),
    ("numeric tenant", {"plan": "free", "params": {"prompt": "x"}, "tenant": 5}, "GW006"),
    ("not an object", ["free"], "GW006"),
]


@pytest.mark.parametrize(
    ("wrong", "third", "sqlstate"), BULK_BAD_THIRD, ids=[c[0] for c in BULK_BAD_THIRD]
)
def test_a_bulk_submit_with_a_bad_third_item_writes_none(
    shared_conn: psycopg.Connection, wrong: str, third: Any, sqlstate: str
) -> None:
    conn = shared_conn
    before = counts(conn)
    good = {"plan": "free", "params": {"prompt": "fine"}}
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT genworker.submit_tasks(%s)", (Jsonb([good, good, third, good]),))
    assert caught.value.sqlstate == sqlstate, wrong
    assert counts(conn) == before


# (what is wrong, the call, the exception class)
Call = Callable[[Client], object]
CLIENT_CASES: list[tuple[str, Call, type[errors.ValidationError]]] = [
    ("unknown plan", lambda c: c.submit("gold", "x"), errors.InvalidPlan),
    ("plan not a string", lambda c: c.submit(3, "x"), errors.InvalidPlan),  # type: ignore[arg-type]
    ("empty prompt", lambda c: c.submit("free", ""), errors.InvalidPrompt),
    ("whitespace prompt", lambda c: c.submit("free", "\t \n"), errors.InvalidPrompt),
    (
        "over-long prompt",
        lambda c: c.submit("free", "x" * (PROMPT_LIMIT + 1)),
        errors.InvalidPrompt,
    ),
    ("prompt not a string", lambda c: c.submit("free", 5), errors.InvalidPrompt),  # type: ignore[arg-type]
    ("NUL in the prompt", lambda c: c.submit("free", "a\x00b"), errors.InvalidParams),
    ("NUL in the tenant", lambda c: c.submit("free", "x", tenant="a\x00"), errors.InvalidParams),
    ("bad size", lambda c: c.submit("free", "x", params={"size": "big"}), errors.InvalidSize),
    ("bad tenant", lambda c: c.submit("free", "x", tenant="no spaces"), errors.InvalidTenant),
    ("tenant not a string", lambda c: c.submit("free", "x", tenant=7), errors.InvalidTenant),
    ("n zero", lambda c: c.submit("free", "x", n=0), errors.InvalidCount),
    ("n over the plan", lambda c: c.submit("pro", "x", n=71), errors.InvalidCount),
    ("n beyond an integer", lambda c: c.submit("pro", "x", n=2**40), errors.InvalidCount),
    ("n a string", lambda c: c.submit("free", "x", n="2"), errors.InvalidCount),
    ("n a bool", lambda c: c.submit("free", "x", n=True), errors.InvalidCount),
    ("params a list", lambda c: c.submit("free", "x", params=["a"]), errors.InvalidParams),
    (
        "params not JSON",
        lambda c: c.submit("free", "x", params={"f": object()}),
        errors.InvalidParams,
    ),
    ("kind not a string", lambda c: c.submit("free", "x", kind=1), errors.InvalidKind),
    ("bad kind", lambda c: c.submit("free", "x", kind="Bad Kind"), errors.InvalidKind),
    ("key not a string", lambda c: c.submit("free", "x", idempotency_key=5), errors.InvalidParams),
    (
        "bulk, bad third",
        lambda c: c.submit_many(
            [{"plan": "free", "prompt": "a"}] * 2 + [{"plan": "gold", "prompt": "c"}]
        ),
        errors.InvalidPlan,
    ),
    (
        "bulk, bad third type",
        lambda c: c.submit_many(
            [{"plan": "free", "prompt": "a"}] * 2 + [{"plan": "free", "prompt": "c", "n": "1"}]
        ),
        errors.InvalidCount,
    ),
]


@pytest.mark.parametrize(("wrong", "call", "exc"), CLIENT_CASES, ids=[c[0] for c in CLIENT_CASES])
def test_client_raises_a_typed_error_and_writes_nothing(
    shared_conn: psycopg.Connection,
    shared_client: Client,
    wrong: str,
    call: Call,
    exc: type[errors.ValidationError],
) -> None:
    before = counts(shared_conn)
    with pytest.raises(exc) as caught:
        call(shared_client)
    assert type(caught.value) is exc, wrong
    assert isinstance(caught.value, errors.UsageError)
    assert caught.value.exit_code == 2
    assert caught.value.code == exc.code
    assert "\n" not in str(caught.value)
    assert str(caught.value)
    assert counts(shared_conn) == before
