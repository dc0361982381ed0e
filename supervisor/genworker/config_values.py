"""The values settings take, parsed and checked: plans, DSNs, numbers, paths.

Knows nothing of `Settings`: config.py declares the settings and builds them on
these parsers, and re-exports the names here that callers use.
"""

from __future__ import annotations

import logging
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class ConfigError(ValueError):
    """A setting has a bad value; the message is one line that says which and how to fix it."""


@dataclass(frozen=True)
class Plan:
    name: str
    images: int
    priority: int  # lower is served first
    tenant_cap: int | None = None  # a tenant's jobs of this plan in flight; None: --tenant-cap
    models: tuple[str, ...] | None = None  # the image models its tasks may ask for; None: any


DEFAULT_PLANS: tuple[Plan, ...] = (
    Plan("free", 2, 0),
    Plan("start", 30, 1),
    Plan("pro", 70, 2),
)


# ---------------------------------------------------------------------- plans


def format_plans(plans: tuple[Plan, ...]) -> str:
    return ",".join(_format_plan(p) for p in plans)


def _format_plan(p: Plan) -> str:
    text = f"{p.name}={p.images}:{p.priority}"
    cap = "" if p.tenant_cap is None else str(p.tenant_cap)
    if p.models is not None:
        return f"{text}:{cap}:{'|'.join(p.models)}"
    return f"{text}:{cap}" if cap else text


_PLAN_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,79}$")


def parse_plans(text: str) -> tuple[Plan, ...]:
    plans = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"([^=]+)=(\d+)(?::(-?\d+)(?::(\d*)(?::([^:]*))?)?)?", item)
        if not m:
            raise ConfigError(
                f"bad plan {item!r}: write name=images:priority[:tenant_cap[:model|model...]], "
                "e.g. pro=70:2:20 or pro=70:2::gpt-image-1|dall-e-3"
            )
        cap = int(m[4]) if m[4] else None
        models = None if m[5] is None else tuple(s.strip() for s in m[5].split("|") if s.strip())
        plans.append(Plan(m[1].strip(), int(m[2]), int(m[3] or 0), cap, models))
    return check_plans(plans)


def plans_from(raw: Any) -> tuple[Plan, ...]:
    """Plans from a flag or env string, or a TOML table: [plans.pro] images = 70, priority = 2.
    A malformed table raises TypeError/KeyError/ValueError, for the caller to word."""
    if not isinstance(raw, Mapping):
        return parse_plans(str(raw))
    return check_plans(
        [
            Plan(
                k,
                int(v["images"]),
                int(v.get("priority", 0)),
                None if v.get("tenant_cap") is None else int(v["tenant_cap"]),
                _models(v.get("models")),
            )
            for k, v in raw.items()
        ]
    )


def _models(raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
        raise TypeError("models must be a list of model names")
    return tuple(raw)


def check_plans(plans: list[Plan]) -> tuple[Plan, ...]:
    if not plans:
        raise ConfigError("plans: at least one plan is needed")
    names = set()
    for p in plans:
        if not _PLAN_NAME.match(p.name):
            raise ConfigError(f"bad plan name {p.name!r}: use lowercase letters, digits, - and _")
        if not 1 <= p.images <= 10000:
            raise ConfigError(f"plan {p.name}: images must be 1..10000, got {p.images}")
        if p.tenant_cap is not None and not 0 <= p.tenant_cap <= 1_000_000:
            raise ConfigError(f"plan {p.name}: tenant_cap must be 0..1000000, got {p.tenant_cap}")
        if p.models is not None and not p.models:
            raise ConfigError(f"plan {p.name}: no models listed (leave the list out for any)")
        for model in p.models or ():
            if not _MODEL_NAME.match(model):
                raise ConfigError(f"plan {p.name}: bad model name {model[:40]!r}")
        if p.name in names:
            raise ConfigError(f"plan {p.name} is defined twice")
        names.add(p.name)
    return tuple(plans)


# -------------------------------------------------------------------- scalars


def parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    s = str(raw).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


def parse_scalar(typ: str, raw: Any) -> Any:
    """An int, float, Path or str by the field's annotation `typ`; ValueError when it is not."""
    if typ.startswith("int"):
        if isinstance(raw, bool):
            raise ValueError(raw)
        return int(raw)
    if typ.startswith("float"):
        if isinstance(raw, bool):
            raise ValueError(raw)
        value = float(raw)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(raw)
        return value
    if typ.startswith("Path"):
        return Path(str(raw)).expanduser()
    return str(raw)


def check_bounds(where: str, value: Any, meta: Mapping[str, Any]) -> None:
    """The bounds and choices a setting declares (`lo`, `hi`, `choices`), and no NUL bytes."""
    lo, hi, choices = meta["lo"], meta["hi"], meta["choices"]
    if lo is not None and value < lo:
        raise ConfigError(f"{where}: must be at least {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: must be at most {hi:g}, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    if isinstance(value, str) and "\x00" in value:
        raise ConfigError(f"{where}: contains a NUL byte")


# ---------------------------------------------------------------- files, DSNs


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML settings file's table; every way it can fail is one ConfigError."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not valid UTF-8") from None
    except RecursionError:  # tomllib recurses once per nesting level
        raise ConfigError(f"config file {path} is not valid TOML: nested too deeply") from None


def mask_dsn(dsn: str) -> str:
    """A DSN fit to print: the password replaced by ***."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    if parts.password is None:
        # key=value form; a quoted value may hold spaces
        return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def check_dsn(dsn: str) -> None:
    """Reject a DSN libpq would refuse (or misread) at connect time, before anything starts:
    a typo in DATABASE_URL is a usage error (exit 2), not a node that restarts forever.
    The message never echoes the password."""
    from psycopg.conninfo import conninfo_to_dict

    def bad(why: str) -> ConfigError:
        shown = mask_dsn(dsn)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return ConfigError(
            f"DATABASE_URL {why} ({shown}): "
            "expected e.g. postgresql://user:password@host:5432/dbname"
        )

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # psycopg raises ProgrammingError with the DSN inside; do not echo it
        raise bad("is not a valid PostgreSQL DSN") from None
    for port in str(parts.get("port") or "5432").split(","):
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise bad(f"has a bad port {port[:20]!r}")
    if parts.get("sslmode") is not None and parts["sslmode"] not in _SSLMODES:
        raise bad(f"has an unknown sslmode (one of {', '.join(_SSLMODES)})")
    for host in str(parts.get("host") or "").split(","):
        if host.startswith("/"):
            continue  # a socket directory
        if len(host) > 253 or any(len(label) > 63 for label in host.split(".")):
            raise bad("has a host name longer than DNS allows")


HANDLER_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # what genworker.submit_task accepts
HANDLER_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def parse_handler_entry(entry: str) -> tuple[str, str]:
    """ "kind=pkg.module:func" as (kind, target); ConfigError saying what is wrong."""
    kind, sep, target = (s.strip() for s in entry.partition("="))
    if not sep or not kind or not target:
        raise ConfigError(f"bad handler {entry[:80]!r}: write kind=pkg.module:func")
    if not HANDLER_KIND.match(kind):
        raise ConfigError(
            f"bad handler kind {kind[:40]!r}: a lowercase letter, then up to 31 of a-z, 0-9, _"
        )
    if not HANDLER_TARGET.match(target):
        raise ConfigError(f"handler {kind}: {target[:80]!r} is not pkg.module:func")
    return kind, target


_warned_open: set[Path] = set()


def warn_if_readable_by_others(path: Path, what: str) -> None:
    """One warning per file and process when other users may read a file that holds or
    may hold secrets (a key file, a config file)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # reading it will say what is wrong
    if mode & 0o044 and path not in _warned_open:
        _warned_open.add(path)
        logging.getLogger("genworker.config").warning(
            "%s %s can be read by other users (%s): chmod 600 it",
            what,
            path,
            stat.filemode(mode),
        )
