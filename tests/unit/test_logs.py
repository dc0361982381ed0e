"""Log lines: the two formats, and no secret in either, even by accident."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from genworker.logs import Redactor, dsn_password, setup_logging

API_KEY = "sk-proj-T3stK3yDoNotLeak0123456789abcdef"
DB_PASSWORD = 'Pa"ss:w@rd/Secr3t'
DSN = f"postgresql://genworker:{quote(DB_PASSWORD, safe='')}@db.internal:5432/genworker"


@pytest.fixture
def capture() -> Iterator[io.StringIO]:
    """A stream for the log; afterwards the root logger and the excepthooks as they were."""
    root = logging.getLogger()
    saved = (root.level, sys.excepthook, threading.excepthook)
    try:
        yield io.StringIO()
    finally:
        for h in root.handlers[:]:
            if h.get_name() == "genworker":
                root.removeHandler(h)
        root.setLevel(saved[0])
        sys.excepthook, threading.excepthook = saved[1], saved[2]


def setup(stream: io.StringIO, level: str, fmt: str, secrets: list[str]) -> None:
    """setup_logging, then ours alone on the root logger as in production (pytest's
    capture handlers, added for the test call, would see each record first)."""
    setup_logging(level, fmt, secrets, stream=stream)  # type: ignore[arg-type]
    root = logging.getLogger()
    for h in root.handlers[:]:
        if h.get_name() != "genworker":
            root.removeHandler(h)


def leaks(text: str) -> list[str]:
    forms = {
        API_KEY,
        DB_PASSWORD,
        quote(DB_PASSWORD, safe=""),
        json.dumps(DB_PASSWORD)[1:-1],  # as json.dumps would escape it
        "Secr3t",
        "T3stK3y",
    }
    return [f for f in forms if f in text]


def log_everything_that_could_leak() -> None:
    log = logging.getLogger("genworker.arbiter")
    log.info("connecting to %s", DSN)
    log.warning("API said 401 for key %s", API_KEY, extra={"auth": f"Bearer {API_KEY}"})
    log.error("libpq: host=db.internal password=%s user=genworker", DB_PASSWORD)
    try:
        try:
            raise ConnectionError(f"cannot reach {DSN}")
        except ConnectionError as inner:
            raise RuntimeError(f"API key {API_KEY} refused") from inner
    except RuntimeError:
        log.exception("worker 3 failed with %r", {"api_key": API_KEY, "dsn": DSN})
    log.debug("job 17 done", extra={"dsn": DSN, "attempt": 2})


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_no_secret_reaches_the_output(capture: io.StringIO, fmt: str) -> None:
    setup(capture, "debug", fmt, [API_KEY, DB_PASSWORD])
    log_everything_that_could_leak()
    out = capture.getvalue()
    assert "RuntimeError" in out
    assert "ConnectionError" in out  # the chained cause is there, cleaned
    assert "db.internal" in out  # only the secret goes, the useful part stays
    assert out.count("***") >= 8
    assert leaks(out) == []


def test_secret_shapes_are_hidden_even_when_nobody_said_they_were_secret(
    capture: io.StringIO,
) -> None:
    setup(capture, "info", "human", [])
    log = logging.getLogger("genworker.api")
    log.info("key %s", "sk-abcdefghijklmnop1234")
    log.info("Authorization: Bearer abc.def.ghijklmnop")
    log.info("dsn host=x password='two words' port=5432")
    log.info("PGPASSWORD=hunter22 psql")
    log.info("config {'password': 'hunter23', 'api_key': \"k-99999999\"}")
    log.info("url postgresql://gw:hunter24@db/gw and redis://:hunter25@cache:6379/0")
    out = capture.getvalue()
    for secret in ("abcdefghijklmnop", "ghijklmnop", "two words", "hunter2", "k-9999"):
        assert secret not in out
    assert "postgresql://gw:***@db/gw" in out
    assert "redis://:***@cache:6379/0" in out
    assert "port=5432" in out


def test_human_format(capture: io.StringIO) -> None:
    setup(capture, "info", "human", [])
    logging.getLogger("genworker.arbiter").info(
        "worker %d restarted", 3, extra={"reason": "oom killed", "pid": 4242}
    )
    logging.getLogger("genworker.arbiter").debug("job-level detail, hidden at info")
    (line,) = capture.getvalue().splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO genworker\.arbiter: "
        r'worker 3 restarted reason="oom killed" pid=4242',
        line,
    ), line


def test_json_format_is_one_object_per_line(capture: io.StringIO) -> None:
    setup(capture, "debug", "json", [])
    log = logging.getLogger("genworker.worker")
    log.debug("job done\nsecond line", extra={"job_id": 17, "plan": "pro"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = capture.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "DEBUG"
    assert first["logger"] == "genworker.worker"
    assert first["msg"] == "job done\nsecond line"
    assert first["job_id"] == 17
    assert first["plan"] == "pro"
    assert isinstance(first["pid"], int)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert "ValueError: boom" in second["exc"]


def test_a_bad_format_string_does_not_lose_the_event_or_raise(capture: io.StringIO) -> None:
    setup(capture, "info", "human", [DB_PASSWORD])
    logging.getLogger("genworker").info("two args %s %s", DB_PASSWORD)
    out = capture.getvalue()
    assert "bad log arguments" in out
    assert leaks(out) == []


def test_setting_up_again_replaces_the_handler(capture: io.StringIO) -> None:
    setup(capture, "info", "human", [])
    setup(capture, "info", "json", [])
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "genworker"]
    assert len(ours) == 1
    logging.getLogger("genworker").info("once")
    assert capture.getvalue().count("once") == 1


def test_uncaught_exceptions_are_logged_redacted(capture: io.StringIO) -> None:
    setup(capture, "info", "human", [API_KEY])
    try:
        raise SystemError(f"crash with {API_KEY}")
    except SystemError as e:
        sys.excepthook(type(e), e, e.__traceback__)
    t = threading.Thread(target=lambda: (_ for _ in ()).throw(OSError(DSN)), name="poller")
    t.start()
    t.join()
    out = capture.getvalue()
    assert "CRITICAL genworker: uncaught exception" in out
    assert "uncaught exception in thread poller" in out
    assert leaks(out) == []


def test_short_secrets_are_hidden_without_shredding_words() -> None:
    redact = Redactor(["ab1"])
    assert (
        redact("postgresql://u:ab1@h/d user ab1 cab1e") == "postgresql://u:***@h/d user *** cab1e"
    )
    assert Redactor([None, ""])("nothing to hide") == "nothing to hide"


def test_the_password_is_found_in_either_dsn_form() -> None:
    assert dsn_password(DSN) == DB_PASSWORD
    assert dsn_password("host=db user=gw password='a b' dbname=gw") == "a b"
    assert dsn_password("postgresql://gw@db/gw") is None
    assert dsn_password(None) is None
    # not a DSN psycopg can parse (not UTF-8, an open bracket): the URL's password, or none
    assert dsn_password("postgresql://u:pw-x@127.0.0.1/caf\udce9") == "pw-x"
    assert dsn_password("postgresql://u:pw-x@[::1") is None
    assert dsn_password("not a dsn = = '") is None


def test_a_message_with_line_breaks_is_still_one_human_line(capture: io.StringIO) -> None:
    setup(capture, "info", "human", [])
    logging.getLogger("genworker.feeder").warning(
        "error connecting: connection failed: no such file\n\tIs the server running?"
    )
    lines = capture.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("connection failed: no such file Is the server running?")


def test_the_pools_retry_warnings_show_at_debug_only(capture: io.StringIO) -> None:
    pool = logging.getLogger("psycopg.pool")
    saved = pool.level
    try:
        setup(capture, "info", "human", [])
        pool.warning("error connecting in 'pool-1': attempt 7")
        pool.error("the pool is closed")
        setup(capture, "debug", "human", [])
        pool.warning("error connecting in 'pool-1': attempt 8")
    finally:
        pool.setLevel(saved)
    out = capture.getvalue()
    assert "attempt 7" not in out  # the feeder says "database unreachable" once instead
    assert "the pool is closed" in out
    assert "attempt 8" in out


def test_a_node_process_set_up_from_its_settings_hides_its_secrets(capture: io.StringIO) -> None:
    from genworker.config import Settings
    from genworker.logs import setup_node_logging

    settings = Settings(api_key=API_KEY, database_url=DSN, log_format="json", log_level="debug")
    setup_node_logging(settings, stream=capture)
    for h in logging.getLogger().handlers[:]:
        if h.get_name() != "genworker":
            logging.getLogger().removeHandler(h)
    logging.getLogger("genworker.worker").debug("key %s, password %s", API_KEY, DB_PASSWORD)
    (line,) = capture.getvalue().splitlines()
    assert json.loads(line)["msg"] == "key ***, password ***"


def test_the_light_password_parse_needs_no_psycopg() -> None:
    from genworker.logs import _light_password

    assert _light_password(DSN) == DB_PASSWORD
    assert _light_password("host=db password='a b' user=gw") == "a b"
    assert _light_password("host=db password=xyz") == "xyz"
    assert _light_password("postgresql://gw@db/gw") is None
    assert _light_password(None) is None
