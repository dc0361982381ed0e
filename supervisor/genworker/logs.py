"""Logging: one line per event, human or JSON, and no secret in any of it.

Levels mean something: ERROR needs a human, WARNING is an alarm or a degraded
state, INFO is a lifecycle event (start, ready, reload, worker restart, stop),
DEBUG is per job and per batch.

Redaction happens on the handler, so it covers every logger that propagates to the
root (genworker, aiohttp, psycopg, asyncio): the known secrets passed in, plus
anything shaped like one (sk-... keys, bearer tokens, password=..., the password
in scheme://user:password@host), in the message, its arguments, extra fields and
the exception text.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Literal, Protocol, TextIO
from urllib.parse import quote, quote_plus, unquote, urlsplit

MASK = "***"

_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), MASK),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]{8,}"), r"\1" + MASK),
    # password=..., PGPASSWORD=..., 'password': '...', api_key=...
    (
        re.compile(
            r"(?i)((?:password|passwd|api[_-]?key)['\"]?\s*[=:]\s*)"
            r"(?!\*\*\*)('[^']*'|\"[^\"]*\"|[^\s&;,'\"}]+)"
        ),
        r"\1" + MASK,
    ),
    # scheme://user:password@host (a DSN or a URL with credentials)
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]*:)[^@\s]+(@)"), r"\1" + MASK + r"\2"),
)

# Substring-matching a very short secret would shred ordinary words; match those
# only where they stand alone (e.g. between ':' and '@').
_SHORT_SECRET = 6


class Redactor:
    """Replaces known secrets and secret-shaped text with ***."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._secrets: set[str] = set()
        self._known: re.Pattern[str] | None = None
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        """Also hide `secret` (and its URL-encoded forms); empty or None is ignored."""
        if not secret:
            return
        self._secrets |= {secret, quote(secret, safe=""), quote_plus(secret)}
        alternatives = []
        for s in sorted(self._secrets, key=len, reverse=True):
            if len(s) >= _SHORT_SECRET:
                alternatives.append(re.escape(s))
            else:
                alternatives.append(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])")
        self._known = re.compile("|".join(alternatives))

    def __call__(self, text: str) -> str:
        if self._known is not None:
            text = self._known.sub(MASK, text)
        for pattern, replacement in _SHAPES:
            text = pattern.sub(replacement, text)
        return text


def dsn_password(dsn: str | None) -> str | None:
    """The password inside a DSN (URL or key=value form), to pass to setup_logging."""
    if not dsn:
        return None
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        password = conninfo_to_dict(dsn).get("password")
    except (psycopg.Error, ValueError):  # not a DSN (or not UTF-8): look for a URL's password
        try:
            password = urlsplit(dsn).password
        except ValueError:
            return None
        password = None if password is None else unquote(password)
    return str(password) if password else None


def _light_password(dsn: str | None) -> str | None:
    """dsn_password without importing psycopg (for the zygote, which keeps it out of the
    workers): a URL's password, or password=... of the key=value form."""
    if not dsn:
        return None
    try:
        password = urlsplit(dsn).password if "://" in dsn else None
    except ValueError:
        password = None
    if password is not None:
        password = unquote(password)  # as libpq reads a URI
    if password is None:
        m = re.search(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn)
        password = m[1].strip("'") if m else None
    return password or None


class NodeSettings(Protocol):
    @property
    def log_level(self) -> str: ...
    @property
    def log_format(self) -> str: ...
    @property
    def database_url(self) -> str | None: ...
    def resolved_api_key(self) -> str | None: ...


def node_secrets(settings: NodeSettings) -> list[str | None]:
    """The settings' API key and DB password, read without psycopg (fine in a worker)."""
    try:
        key = settings.resolved_api_key()
    except ValueError:  # an unreadable key file: the supervisor has said so already
        key = None
    return [key, _light_password(settings.database_url)]


def setup_node_logging(settings: NodeSettings, *, stream: TextIO | None = None) -> Redactor:
    """setup_logging as the settings say, hiding their API key and DB password: for the
    processes of a node that get their settings over a socket (the zygote, its workers)."""
    fmt: Literal["human", "json"] = "json" if settings.log_format == "json" else "human"
    return setup_logging(settings.log_level, fmt, node_secrets(settings), stream=stream)


_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What the caller passed in `extra=`."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS}


class RedactingFilter(logging.Filter):
    """Rewrites a record so no later formatter or handler can see a secret."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError) as e:  # a bad format string must not lose the event
            message = f"{record.msg} {record.args!r} (bad log arguments: {e})"
        record.msg, record.args = self.redactor(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.exc_text:
            record.exc_text = self.redactor(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor(record.stack_info)
        for key, value in extra_fields(record).items():
            if not isinstance(value, (int, float, bool)) and value is not None:
                setattr(record, key, self.redactor(str(value)))
        return True


def _timestamp(record: logging.LogRecord) -> str:
    """UTC with milliseconds: 2026-11-27T18:00:00.123Z."""
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{base}.{int(record.msecs):03d}Z"


def _kv(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


_LINE_BREAK = re.compile(r"\s*\n\s*")


class HumanFormatter(logging.Formatter):
    """`2026-11-27T18:00:00.123Z INFO genworker.arbiter: message key=value`; a traceback
    follows on indented lines."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        # one line per event: a message's own line breaks (libpq's hints) become spaces
        message = _LINE_BREAK.sub(" ", record.getMessage())
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {message}"
        extras = " ".join(f"{k}={_kv(v)}" for k, v in extra_fields(record).items())
        if extras:
            line += " " + extras
        tail = self._tail(record)
        if tail:
            line += "\n" + "\n".join("  " + t if t else "" for t in tail.splitlines())
        return self.redactor(line)

    def _tail(self, record: logging.LogRecord) -> str:
        parts = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(record.stack_info)
        return "\n".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, pid, extra fields, exc."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in extra_fields(record).items():
            payload.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = record.stack_info
        # Redact each value before encoding: a secret with a quote in it would be
        # escaped by json.dumps and slip past a search of the encoded line.
        for key, value in payload.items():
            if isinstance(value, str):
                payload[key] = self.redactor(value)
            elif not isinstance(value, (int, float, bool)) and value is not None:
                payload[key] = self.redactor(str(value))
        return json.dumps(payload, ensure_ascii=False)


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("genworker").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    logging.getLogger("genworker").critical(
        "uncaught exception in thread %s",
        args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def setup_logging(
    level: str | int = "info",
    fmt: Literal["human", "json"] = "human",
    secrets: Iterable[str | None] = (),
    *,
    stream: TextIO | None = None,
) -> Redactor:
    """Send every log line to `stream` (stderr) through one redacting handler.

    Calling it again (a reload) replaces the handler. Uncaught exceptions are logged
    too, so a crash traceback is redacted like everything else. Returns the Redactor,
    to add a secret learned later and to clean text bound elsewhere (stored errors).
    """
    redactor = Redactor(secrets)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RedactingFilter(redactor))
    handler.setFormatter(JsonFormatter(redactor) if fmt == "json" else HumanFormatter(redactor))
    handler.set_name("genworker")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "genworker"]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # The pool warns at every reconnection attempt while the database is away (several a
    # second); the supervisor says "database unreachable" once instead.
    debug = root.level <= logging.DEBUG
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING if debug else logging.ERROR)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    return redactor
