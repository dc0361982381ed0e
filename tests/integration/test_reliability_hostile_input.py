"""Hostile input at every entry point that the queue tests do not already cover: the CLI's
flags, DSNs and config files (the real `genworker` as a subprocess), `genworker.submit_task`
called from SQL with wrong types and raw bytes, and a corpus of nasty strings
(tests/data/hostile/strings.json, plus 1 MB ones) through the Python client.

Each input gets a clear error, one line with the documented exit code (2: usage or input,
1: runtime), or is stored exactly as given; and nothing else changes: row counts,
statuses and the schema's tables are compared before and after."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from genworker import errors
from genworker.queue.client import Client
from psycopg.types.json import Jsonb
from supervisor_harness import GENWORKER

DATA = Path(__file__).resolve().parents[1] / "data" / "hostile"
CORPUS: list[dict[str, str]] = json.loads((DATA / "strings.json").read_text())["strings"]
SECRET = "s3cret-pw"

# ------------------------------------------------------------------ helpers


def snapshot(conn: psycopg.Connection) -> dict[str, Any]:
    """What must not move: row counts, every job's and task's status, the schema's tables."""
    counts = {
        t: conn.execute(f"SELECT count(*) FROM genworker.{t}").fetchone()[0]  # type: ignore[index]
        for t in ("tasks", "jobs", "nodes", "plans", "settings", "migrations")
    }
    statuses = conn.execute(
        "SELECT 'job', id, status FROM genworker.jobs UNION ALL"
        " SELECT 'task', id, status FROM genworker.tasks ORDER BY 1, 2"
    ).fetchall()
    tables = conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'genworker' ORDER BY 1"
    ).fetchall()
    return {"counts": counts, "statuses": statuses, "tables": tables}


@pytest.fixture
def busy_db(client: Client, conn: psycopg.Connection) -> psycopg.Connection:
    """A database with work in it, so that 'nothing changed' has something to keep."""
    client.submit("start", "already queued", tenant="acme", n=3)
    client.submit("free", "another one")
    return conn


def genworker(
    args: list[str | bytes], env: dict[str, str | bytes], cwd: Path
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GENWORKER_", "DATABASE"))}
    return subprocess.run(
        [GENWORKER, *args],
        env={**clean, **env},  # type: ignore[dict-item]
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        cwd=cwd,
    )


def assert_one_line(done: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("genworker: error: "), lines[0]
    assert words in lines[0], lines[0]
    assert len(lines[0]) < 400  # an echo of a 100 kB input is not a clear error
    assert "Traceback" not in done.stderr
    assert SECRET not in done.stderr + done.stdout


# --------------------------------------------------------------- CLI flags

FLAGS: list[tuple[str, list[str | bytes], int, str]] = [
    # (what, arguments, exit code, words the one line must hold)
    (
        "plan: sql injection",
        ["submit", "--plan", "free'; DROP TABLE genworker.jobs; --", "--prompt", "x"],
        2,
        "unknown plan",
    ),
    (
        "tenant: sql injection",
        [
            "submit",
            "--plan",
            "free",
            "--prompt",
            "x",
            "--tenant",
            "t'); DELETE FROM genworker.tasks; --",
        ],
        2,
        "invalid tenant",
    ),
    (
        "kind: sql injection",
        ["submit", "--plan", "free", "--prompt", "x", "--kind", "noop; DROP TABLE x"],
        2,
        "invalid job kind",
    ),
    (
        "key: 201 characters",
        ["submit", "--plan", "free", "--prompt", "x", "--key", "k" * 201],
        2,
        "invalid idempotency key",
    ),
    (
        "prompt: 100 kB",
        ["submit", "--plan", "free", "--prompt", "x" * 100_000],
        2,
        "invalid prompt: 100000 characters, the limit is 4000",
    ),
    (
        "prompt: invalid UTF-8",
        ["submit", "--plan", "free", "--prompt", b"caf\xe9 \xff"],
        2,
        "not valid UTF-8",
    ),
    (
        "n: past any integer",
        ["submit", "--plan", "free", "--prompt", "x", "--n", "99999999999999"],
        2,
        "out of range",
    ),
    ("n: negative", ["submit", "--plan", "pro", "--prompt", "x", "--n", "-5"], 2, "invalid n -5"),
    (
        "params: infinity",
        ["submit", "--plan", "free", "--params", '{"prompt": "x", "w": 1e999}'],
        2,
        "params must be JSON",
    ),
    ("params: NUL", ["submit", "--plan", "free", "--params", '{"prompt": "a\\u0000b"}'], 2, "NUL"),
    (
        "params: lone surrogate",
        ["submit", "--plan", "free", "--params", '{"prompt": "\\ud800"}'],
        2,
        "not valid UTF-8",
    ),
    (
        "params: size",
        ["submit", "--plan", "free", "--params", '{"prompt": "x", "size": "99999x99999"}'],
        2,
        "invalid size",
    ),
    ("task id: past a bigint", ["cancel", "99999999999999999999"], 2, "is not a task id"),
    ("task id: zero", ["retry", "0"], 2, "is not a task id"),
    ("task id: a word", ["show", "x'; --"], 2, "is not a task id"),
    ("retention: past a century", ["prune", "--retention", "1e12"], 2, "--retention: must be"),
    ("cache ttl: past a century", ["start", "--cache-ttl", "1e12"], 2, "--cache-ttl: must be"),
    ("workers: a float", ["start", "--workers", "1e3"], 2, "--workers: expected int"),
    ("lease: nan", ["start", "--lease", "nan"], 2, "--lease: expected float"),
    ("lease: infinity", ["start", "--lease", "inf"], 2, "--lease: expected float"),
    (
        "concurrency: negative",
        ["start", "--concurrency", "-1"],
        2,
        "--concurrency: must be at least 1",
    ),
    (
        "api url: a script",
        ["start", "--api-url", "javascript:alert(1)"],
        2,
        "--api-url must start with http",
    ),
    ("api rps: zero", ["start", "--api-rps", "0"], 2, "--api-rps: must be at least"),
    ("fetch allow: not an address", ["start", "--fetch-allow", "10.0.0.0/99"], 2, "--fetch-allow"),
    (
        "http: port past 65535",
        ["start", "--http", "127.0.0.1:99999"],
        2,
        "the port must be 0..65535",
    ),
    (
        "api key file: missing",
        ["start", "--api-key-file", "/nonexistent/key"],
        2,
        "cannot read --api-key-file",
    ),
    (
        "output dir: not creatable",
        ["start", "--output-dir", "/proc/genworker-out"],
        2,
        "cannot create --output-dir",
    ),
]


@pytest.mark.parametrize(("what", "args", "code", "words"), FLAGS, ids=[c[0] for c in FLAGS])
def test_hostile_flags_get_one_line_and_change_nothing(
    busy_db: psycopg.Connection,
    dsn: str,
    tmp_path: Path,
    what: str,
    args: list[str | bytes],
    code: int,
    words: str,
) -> None:
    before = snapshot(busy_db)
    done = genworker([*args], {"DATABASE_URL": dsn}, tmp_path)
    assert_one_line(done, code, words)
    assert snapshot(busy_db) == before, what


def test_a_handler_that_is_not_a_coroutine_stops_the_node_before_any_work(
    busy_db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    before = snapshot(busy_db)
    done = genworker(
        ["start", "--simulate", "--workers", "1", "--http", "", "--handler", "evil=os:system"],
        {"DATABASE_URL": dsn},
        tmp_path,
    )
    # 3: a worker could not boot (systemd's RestartPreventExitStatus: fix the configuration)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "cannot start: handler evil: os:system is not an async function" in done.stderr
    assert "Traceback" not in done.stderr
    after = snapshot(busy_db)
    assert after["statuses"] == before["statuses"]  # no job was touched
    assert after["counts"]["jobs"] == before["counts"]["jobs"]


# --------------------------------------------------------------------- DSNs


@pytest.fixture
def not_postgres() -> Iterator[dict[str, int]]:
    """Two loopback ports that are not PostgreSQL: one answers garbage, one never answers."""
    garbage, silent = socket.socket(), socket.socket()
    for s in (garbage, silent):
        s.bind(("127.0.0.1", 0))
        s.listen()
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def serve() -> None:
        garbage.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = garbage.accept()
            except TimeoutError:
                continue
            c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield {"garbage": garbage.getsockname()[1], "silent": silent.getsockname()[1]}
    finally:
        stop.set()
        t.join(5)
        for s in (garbage, silent, *accepted):
            s.close()


def test_hostile_dsns_get_one_line_and_never_show_the_password(
    busy_db: psycopg.Connection, tmp_path: Path, not_postgres: dict[str, int]
) -> None:
    before = snapshot(busy_db)
    cases: list[tuple[str, dict[str, str], int, str]] = [
        # (DATABASE_URL, more environment, exit code, words)
        (f"postgresql://u:{SECRET}@127.0.0.1:{not_postgres['garbage']}/x", {}, 1, "cannot connect"),
        (
            f"postgresql://u:{SECRET}@127.0.0.1:{not_postgres['silent']}/x",
            {"GENWORKER_DB_POOL_TIMEOUT": "2"},  # a server that never answers: no hang
            1,
            "cannot connect",
        ),
        (f"postgresql://u:{SECRET}@127.0.0.1:5432/no_such_db_here", {}, 1, "cannot connect"),
        (f"postgresql://u:{SECRET}@[::1", {}, 2, "not a valid PostgreSQL DSN"),
    ]
    for url, env, code, words in cases:
        done = genworker(["status"], {"DATABASE_URL": url, **env}, tmp_path)
        assert_one_line(done, code, words)
    assert snapshot(busy_db) == before


def test_a_dsn_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    # (the CLI's error path once parsed this DSN again to hide its password: a traceback)
    done = genworker(
        ["status"], {"DATABASE_URL": f"postgresql://u:{SECRET}@127.0.0.1/caf\udce9"}, tmp_path
    )
    assert_one_line(done, 2, "not a valid PostgreSQL DSN")


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{SECRET}@127.0.0.1:notaport/db",
        f"host=127.0.0.1 sslmode=bogus password={SECRET}",
        f"postgresql://u:{SECRET}@{'h' * 300}/db",
    ],
    ids=["port not a number", "unknown sslmode", "host label of 300 characters"],
)
def test_a_dsn_with_a_bad_option_value_is_a_usage_error(tmp_path: Path, url: str) -> None:
    done = genworker(["status"], {"DATABASE_URL": url}, tmp_path)
    assert_one_line(done, 2, "DATABASE_URL")


# ------------------------------------------------------------- config files

CONFIGS: list[tuple[str, bytes, str]] = [
    # (what, the file, words); every one must exit 2 without submitting anything
    ("not TOML", b"workers = \n", "is not valid TOML"),
    ("random bytes", bytes(range(256)) * 10, "is not valid UTF-8"),
    ("a key twice", b"workers = 8\nworkers = 9\n", "is not valid TOML"),
    ("an unknown key", b"frobnicate = 1\n", "unknown setting 'frobnicate'"),
    ("an int as a string", b'workers = "eight"\n', "workers: expected int"),
    ("an int as a bool", b"workers = true\n", "workers: expected int"),
    ("an int as a table", b"[workers]\na = 1\n", "workers: expected int"),
    ("infinity", b"lease_s = inf\n", "lease_s: expected float"),
    ("nan", b"lease_s = nan\n", "lease_s: expected float"),
    ("a DSN as a number", b"database_url = 5\n", "not a valid PostgreSQL DSN"),
    ("NUL in a string", b'node_id = "a\\u0000b"\n', "contains a NUL byte"),
    ("a choice not offered", b'log_level = "trace"\n', "must be one of"),
    ("past its bound", b"workers = 99999999999999999999\n", "must be at most 256"),
]


@pytest.mark.parametrize(("what", "content", "words"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_hostile_config_files_get_one_line_and_submit_nothing(
    busy_db: psycopg.Connection, dsn: str, tmp_path: Path, what: str, content: bytes, words: str
) -> None:
    before = snapshot(busy_db)
    path = tmp_path / "genworker.toml"
    # the database comes from the file too (the environment would win over it), so that
    # the submit below is a valid one: had the file been accepted, a task would be written
    if b"database_url" not in content:
        content = f"database_url = {json.dumps(dsn)}\n".encode() + content
    path.write_bytes(content)
    args: list[str | bytes] = ["submit", "--plan", "free", "--prompt", "x", "--config", str(path)]
    done = genworker(args, {}, tmp_path)
    assert_one_line(done, 2, words)
    assert snapshot(busy_db) == before, what


def test_a_directory_as_config_file_is_one_line(tmp_path: Path) -> None:
    done = genworker(["config", "--config", str(tmp_path)], {}, tmp_path)
    assert_one_line(done, 2, "cannot read config file")


CONFIG_BUGS: list[tuple[str, bytes, str]] = [
    ("handlers not strings", b"handlers = [1, 2]\n", "handlers"),
    (
        "nesting deeper than the recursion limit",
        b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n",
        "TOML",
    ),
    ("a plan with no images", b"[plans.pro]\nimages = 0\n", "images must be 1..10000"),
]


@pytest.mark.parametrize(("what", "content", "words"), CONFIG_BUGS, ids=[c[0] for c in CONFIG_BUGS])
def test_config_files_that_once_escaped_the_clear_error(
    tmp_path: Path, what: str, content: bytes, words: str
) -> None:
    path = tmp_path / "genworker.toml"
    path.write_bytes(content)
    done = genworker(["config", "--config", str(path)], {}, tmp_path)
    assert_one_line(done, 2, words)


# --------------------------------------------------------------------- SQL

SQL_CASES: list[tuple[str, str, tuple[Any, ...], str]] = [
    # (what, statement, parameters, SQLSTATE)
    (
        "n past an integer",
        "SELECT genworker.submit_task('free', %s::jsonb, 't', 'image', NULL, 2147483648::integer)",
        (Jsonb({"prompt": "x"}),),
        "22003",
    ),
    (
        "n as a bigint",
        "SELECT genworker.submit_task('free', %s::jsonb, 't', 'image', NULL, 2147483648)",
        (Jsonb({"prompt": "x"}),),
        "42883",
    ),
    (
        "n as a word",
        "SELECT genworker.submit_task('free', %s::jsonb, 't', 'image', NULL, 'two')",
        (Jsonb({"prompt": "x"}),),
        "22P02",
    ),
    (
        "plan as a number",
        "SELECT genworker.submit_task(1, %s::jsonb)",
        (Jsonb({"prompt": "x"}),),
        "42883",
    ),
    ("params as JSON null", "SELECT genworker.submit_task('free', 'null'::jsonb)", (), "GW006"),
    ("params as broken JSON", "SELECT genworker.submit_task('free', '{\"prompt\": ')", (), "22P02"),
    (
        "too many arguments",
        "SELECT genworker.submit_task('free', %s::jsonb, 't', 'image', NULL, 1, 2)",
        (Jsonb({"prompt": "x"}),),
        "42883",
    ),
    (
        "params over 1 MiB",
        "SELECT genworker.submit_task('free', %s::jsonb)",
        (Jsonb({"prompt": "x", "pad": "p" * (1 << 20)}),),
        "GW006",
    ),
    (
        "prompt of 1 MB",
        "SELECT genworker.submit_task('free', %s::jsonb)",
        (Jsonb({"prompt": "x" * 1_000_000}),),
        "GW002",
    ),
    ("bulk: an object", 'SELECT genworker.submit_tasks(\'{"plan": "free"}\'::jsonb)', (), "GW006"),
    (
        "bulk: params not an object",
        "SELECT genworker.submit_tasks(%s::jsonb)",
        (Jsonb([{"plan": "free", "params": "x"}]),),
        "GW006",
    ),
]


@pytest.mark.parametrize(("what", "sql", "args", "state"), SQL_CASES, ids=[c[0] for c in SQL_CASES])
def test_submit_task_from_sql_with_wrong_types_writes_nothing(
    busy_db: psycopg.Connection, what: str, sql: str, args: tuple[Any, ...], state: str
) -> None:
    before = snapshot(busy_db)
    with pytest.raises(psycopg.Error) as caught:
        busy_db.execute(sql, args)
    assert caught.value.sqlstate == state, (what, caught.value)
    message = caught.value.diag.message_primary or ""
    assert "\n" not in message
    assert len(message) < 300, message[:300]  # a 1 MB input is not echoed back
    assert snapshot(busy_db) == before


def test_invalid_utf8_bytes_straight_from_libpq_are_refused_by_the_server(
    busy_db: psycopg.Connection,
) -> None:
    before = snapshot(busy_db)
    result = busy_db.pgconn.exec_params(
        b"SELECT genworker.submit_task($1, $2::jsonb, $3)",
        [b"free", b'{"prompt": "caf\xe9 \xff\xfe"}', b"t\xc3"],
    )
    assert result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"22021"
    assert snapshot(busy_db) == before


# ------------------------------------------------- the corpus, through the client

TENANT_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")  # genworker.submit_task's rules
KIND_OK = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # what may break a line or a terminal


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def corpus() -> list[tuple[str, str]]:
    strings = [(c["why"], c["text"]) for c in CORPUS]
    strings += [("1 MB of text", "x" * 1_000_000), ("1 MB of emoji", "\U0001f3a8" * 250_000)]
    return strings


def expected_codes(text: str) -> dict[str, str | None]:
    """Where the text goes -> the SQLSTATE-style code it must be refused with (None: stored).
    Text that cannot travel at all (a NUL, invalid UTF-8) is refused as params (GW006)."""
    unsendable = "\x00" in text or not _encodable(text)
    prompt = "GW006" if unsendable else "GW002" if not text.strip() or len(text) > 4000 else None
    return {
        "prompt": prompt,
        "idempotency key": "GW006" if unsendable or not 1 <= len(text) <= 200 else None,
        "plan": "GW006" if unsendable else None if text == "free" else "GW001",
        "tenant": "GW006" if unsendable else None if TENANT_OK.match(text) else "GW004",
        "kind": "GW006" if unsendable else None if KIND_OK.match(text) else "GW007",
    }


ARGS = {  # where -> the submit's keyword arguments with the text there
    "prompt": lambda t: {"plan": "free", "prompt": t},
    "idempotency key": lambda t: {"plan": "free", "prompt": "x", "idempotency_key": t},
    "plan": lambda t: {"plan": t, "prompt": "x"},
    "tenant": lambda t: {"plan": "free", "prompt": "x", "tenant": t},
    "kind": lambda t: {"plan": "free", "prompt": "x", "kind": t},
}


def corpus_params() -> list[Any]:
    return [pytest.param(why, text, id=why) for why, text in corpus()]


@pytest.mark.parametrize(("why", "text"), corpus_params())
def test_every_hostile_string_is_stored_exactly_or_refused_and_nothing_else_changes(
    busy_db: psycopg.Connection, client: Client, why: str, text: str
) -> None:
    conn = busy_db
    for where, code in expected_codes(text).items():
        kw = ARGS[where](text)
        before = snapshot(conn)
        if code is not None:
            with pytest.raises(errors.ValidationError) as caught:
                client.submit(kw.pop("plan"), **kw)
            assert caught.value.code == code, (why, where, caught.value)
            assert caught.value.exit_code == 2
            line = str(caught.value)
            assert line
            assert not CONTROL.search(line), (why, where, line)
            assert len(line) < 300, (why, where)  # the input is not echoed whole
            assert snapshot(conn) == before, (why, where)
            continue
        task = client.submit(kw.pop("plan"), **kw)
        row = conn.execute(
            "SELECT plan, tenant, kind, params ->> 'prompt', idempotency_key, n_jobs"
            " FROM genworker.tasks WHERE id = %s",
            (task,),
        ).fetchone()
        assert row is not None
        stored = dict(
            zip(("plan", "tenant", "kind", "prompt", "idempotency key"), row[:5], strict=True)
        )
        assert stored[where] == text, (why, where)
        after = snapshot(conn)
        assert after["counts"]["tasks"] == before["counts"]["tasks"] + 1
        assert after["counts"]["jobs"] == before["counts"]["jobs"] + row[5]
        assert after["tables"] == before["tables"]
        assert set(before["statuses"]) <= set(after["statuses"])  # the old rows as they were


def test_invalid_utf8_in_a_tenant_is_a_usage_error(
    busy_db: psycopg.Connection, client: Client, dsn: str, tmp_path: Path
) -> None:
    before = snapshot(busy_db)
    done = genworker(
        ["submit", "--plan", "free", "--prompt", "x", "--tenant", b"acme\xe9"],
        {"DATABASE_URL": dsn},
        tmp_path,
    )
    assert_one_line(done, 2, "tenant")
    with pytest.raises(errors.ValidationError):
        client.submit("free", "x", tenant="acme\udce9")
    assert snapshot(busy_db) == before
