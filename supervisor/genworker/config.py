"""Settings: one frozen dataclass, built from flags > environment > TOML file > defaults.

Every setting is declared once, in `Settings`, with its environment variable,
help text and bounds in the field's metadata. The CLI builds its flags from the
same declarations, so `--help`, the env vars and `genworker config` never drift.
The values themselves are parsed and checked in config_values.py.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genworker.config_values import (
    DEFAULT_PLANS,
    ConfigError,
    Plan,
    check_bounds,
    check_dsn,
    format_plans,
    mask_dsn,
    parse_bool,
    parse_handler_entry,
    parse_plans,
    parse_scalar,
    plans_from,
    read_toml,
    warn_if_readable_by_others,
)

__all__ = [  # the names callers import from here, wherever they are defined
    "BUILTIN_KINDS",
    "CENTURY_S",
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_PLANS",
    "FIELDS",
    "ConfigError",
    "Plan",
    "Settings",
    "build",
    "check_dsn",
    "display_value",
    "env_name",
    "flag_name",
    "format_plans",
    "load_file",
    "mask_dsn",
    "parse_plans",
]

DEFAULT_CONFIG_FILE = Path("/etc/genworker/genworker.toml")

BUILTIN_KINDS = ("image", "noop")  # the job kinds every worker runs (worker/handlers.py)

CENTURY_S = 100 * 365 * 86400.0  # a bound for ages and TTLs PostgreSQL can add to now()


def _opt(
    default: Any,
    help: str,
    *,
    env: str | None = None,
    secret: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
    cmds: str = "*",
) -> Any:
    """Declare a setting. `cmds` names the sub-commands that take it as a flag ("*": all)."""
    meta = {"help": help, "env": env, "secret": secret, "lo": lo, "hi": hi, "choices": choices}
    meta["cmds"] = cmds
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


_DB = "start,submit,status,tasks,show,cancel,retry,migrate,prune,config,demo"
_RUN = "start,demo,config"
_API = "start,demo,config"


@dataclass(frozen=True)
class Settings:
    # --- where things are
    database_url: str | None = _opt(
        None,
        "PostgreSQL DSN; unset means the embedded server in --data-dir",
        env="DATABASE_URL",
        secret=True,
        cmds=_DB,
    )
    data_dir: Path | None = _opt(
        None,
        "private state: embedded PostgreSQL, default results (default "
        "$XDG_DATA_HOME/genworker, or /var/lib/genworker for root)",
        cmds=_DB,
    )
    config_file: Path | None = _opt(
        None, "TOML settings file (default /etc/genworker/genworker.toml when present)", env=None
    )
    # --- the node and its workers
    node_id: str | None = _opt(
        None,
        "this supervisor's id in the nodes table, one per supervisor (default: the host name)",
        cmds=_RUN,
    )
    workers: int = _opt(8, "worker processes", lo=1, hi=256, cmds=_RUN)
    concurrency: int = _opt(
        5, "API calls in flight per worker (upper bound)", lo=1, hi=256, cmds=_RUN
    )
    lease_s: float = _opt(
        30.0, "lease on a claimed job; renewed every lease/3", lo=1, hi=3600, cmds=_RUN
    )
    poll_interval_s: float = _opt(
        1.0, "poll for work this often when no NOTIFY arrives", lo=0.01, hi=60, cmds=_RUN
    )
    claim_batch: int = _opt(100, "most jobs claimed in one statement", lo=1, hi=10000, cmds=_RUN)
    prefetch: float = _opt(
        1.0, "local buffer, as a multiple of the free slots", lo=0, hi=10, cmds=_RUN
    )
    graceful_timeout_s: float = _opt(
        30.0, "on TERM, how long in-flight jobs may finish", lo=0, hi=86400, cmds=_RUN
    )
    worker_timeout_s: float = _opt(
        30.0, "kill a worker whose heartbeat is older than this", lo=1, hi=3600, cmds=_RUN
    )
    max_jobs_per_worker: int = _opt(
        0, "recycle a worker after about this many jobs (0: never)", lo=0, cmds=_RUN
    )
    max_worker_memory_mb: int = _opt(
        0, "recycle a worker whose RSS passes this (0: never)", lo=0, cmds=_RUN
    )
    max_worker_deaths: int = _opt(
        3, "a job in flight in this many worker deaths goes dead", lo=1, hi=100, cmds=_RUN
    )
    # --- the queue
    plans: tuple[Plan, ...] = _opt(
        DEFAULT_PLANS,
        "plans as name=images:priority[:tenant_cap[:model|model...]],... (lower priority is "
        "served first; tenant_cap overrides --tenant-cap for the plan, 0: none, empty: "
        "--tenant-cap; the models its tasks may ask for, all when left out)",
        cmds="start,migrate,config,demo",  # written to the database by start and migrate
    )
    max_attempts: int = _opt(
        5, "attempts before a job goes dead", lo=1, hi=100, cmds="start,submit,config"
    )
    max_prompt_chars: int = _opt(
        4000, "longest prompt accepted", lo=1, hi=1_000_000, cmds="submit,config"
    )
    max_params_bytes: int = _opt(
        16384,
        "largest task params accepted, in bytes of JSON (a 4000-character prompt takes up to "
        "16000)",
        lo=1024,
        hi=1_048_576,
        cmds="start,migrate,config,demo",
    )
    max_queued_tasks_per_tenant: int = _opt(
        1000,
        "unfinished (queued or running) tasks one tenant may have; a submit past it is "
        "refused (0: no cap)",
        lo=0,
        hi=10_000_000,
        cmds="start,migrate,config,demo",
    )
    retry_base_s: float = _opt(
        1.0, "first retry backoff (doubles, full jitter)", lo=0, hi=3600, cmds=_RUN
    )
    retry_max_s: float = _opt(300.0, "longest retry backoff", lo=0, hi=86400, cmds=_RUN)
    snooze_max_s: float = _opt(
        3600.0,
        "rate-limit snoozes stop after this long in total; the job then goes dead",
        lo=1,
        hi=7 * 86400,
        cmds=_RUN,
    )
    priority_step_s: float = _opt(
        600.0,
        "aging: seconds of waiting one plan-priority level is worth (a task waits at most "
        "about priority x this, plus its size term, behind later arrivals)",
        lo=0,
        hi=30 * 86400,
        cmds="start,migrate,config,demo",
    )
    size_step_s: float = _opt(
        10.0,
        "smallest task first: seconds of waiting one image of a task's size is worth "
        "(near shortest-remaining-first at 20-200 x API latency / cluster slots)",
        lo=0,
        hi=86400,
        cmds="start,migrate,config,demo",
    )
    tenant_cap: int = _opt(
        0,
        "jobs of one plan a tenant may have in flight across the cluster (0: no cap)",
        lo=0,
        hi=1_000_000,
        cmds="start,migrate,config,demo",
    )
    retention_s: float = _opt(
        7 * 86400.0,
        "finished tasks older than this are deleted with their jobs and result files: by "
        "start, a batch every 5 minutes; by prune, all at once",
        lo=0,
        hi=CENTURY_S,
        cmds="start,prune,config",
    )
    db_pool_size: int = _opt(
        4, "supervisor DB connections (besides the listener)", lo=1, hi=100, cmds=_RUN
    )
    db_pool_timeout_s: float = _opt(
        10.0, "fail fast when no DB connection frees up within this", lo=0.1, hi=600, cmds=_RUN
    )
    # --- the image API
    api_url: str | None = _opt(
        None, "OpenAI-compatible API base URL (start needs this or --simulate)", cmds=_API
    )
    simulate: bool = _opt(
        False,
        "run the simulated image API instead of a provider: every job succeeds with a "
        "placeholder image (demos and tests; start refuses to run without this or --api-url)",
        cmds="start,config",
    )
    api_key: str | None = _opt(
        None, "API key (prefer GENWORKER_API_KEY or --api-key-file)", secret=True, cmds=_API
    )
    api_key_file: Path | None = _opt(None, "file holding the API key", cmds=_API)
    model: str = _opt("gpt-image-1", "image model", cmds="start,submit,config,demo")
    size: str = _opt("1024x1024", "image size WxH", cmds="start,submit,config,demo")
    response_format: str = _opt(
        "b64_json", "b64_json or url", choices=("b64_json", "url"), cmds=_API
    )
    connect_timeout_s: float = _opt(10.0, "API connect timeout", lo=0.1, hi=600, cmds=_API)
    request_timeout_s: float = _opt(180.0, "API request timeout", lo=0.1, hi=3600, cmds=_API)
    api_rps: float | None = _opt(
        None, "API requests per second for the whole cluster", lo=0.01, cmds=_API
    )
    api_max_inflight: int | None = _opt(
        None, "API calls in flight for the whole cluster", lo=1, cmds=_API
    )
    output_dir: Path | None = _opt(
        None,
        "where image files go (default DATA_DIR/results); prune deletes pruned tasks' files",
        cmds=_API + ",prune",
    )
    min_free_disk_mb: int = _opt(
        1024,
        "free space --output-dir needs: start refuses with less, and the low_disk alarm "
        "raises below it (0: no check)",
        lo=0,
        cmds=_RUN,
    )
    fetch_urls: bool = _opt(False, "download url results and keep them like b64 ones", cmds=_API)
    fetch_allow: str = _opt(
        "",
        "private addresses --fetch-urls may download from, as host[:port], address[:port] "
        "or CIDR,... (loopback, private, link-local and metadata addresses are refused)",
        cmds=_API,
    )
    cache: str | None = _opt(
        None, "result cache: postgres or redis://host:port/db (off when unset)", cmds=_API
    )
    cache_ttl_s: float = _opt(
        86400.0, "how long cached results stay valid", lo=1, hi=CENTURY_S, cmds=_API
    )
    cache_shared: bool = _opt(
        False,
        "share cached images across tenants (each then gets images others asked for, and a "
        "hit's speed shows what they asked)",
        cmds=_API,
    )
    handlers: tuple[str, ...] = _opt(
        (),
        "extra job kinds as kind=pkg.module:func,... (found on PYTHONPATH or installed, "
        "never in the start directory)",
        cmds=_API,
    )
    # --- operations
    http: str = _opt("127.0.0.1:9464", "metrics/health address host:port ('' disables)", cmds=_RUN)
    alarms: str = _opt(
        "",
        "alarm limits as name=value,... (any subset): queue_depth=50 (tasks waiting to start), "
        "queue_depth_hold_s=30, api_error_rate=0.05, db_wait_s=5, worker_restarts=5, "
        "window_s=60 (error rate, restarts), db_window_s=15, bad_api_key_clear_s=300, "
        "bad_api_key_pause_s=60 (claims paused, then one job probes the key)",
        cmds=_RUN,
    )
    log_format: str = _opt(
        "human", "log lines: human or json", choices=("human", "json"), cmds=_RUN
    )
    log_level: str = _opt(
        "info", "log level", choices=("debug", "info", "warning", "error"), cmds=_RUN
    )

    # ---------------------------------------------------------------- derived
    @property
    def plan_map(self) -> dict[str, Plan]:
        return {p.name: p for p in self.plans}

    @property
    def kinds(self) -> tuple[str, ...]:
        """The job kinds this node's workers run: the built-ins, then each --handler's."""
        extra = (parse_handler_entry(entry)[0] for entry in self.handlers)
        return tuple(dict.fromkeys((*BUILTIN_KINDS, *extra)))

    @property
    def resolved_data_dir(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir
        base = os.environ.get("XDG_DATA_HOME")
        if not base and os.geteuid() == 0:
            # root's home is closed to the system user the embedded server runs as
            return Path("/var/lib/genworker")
        return Path(base or os.path.join(Path.home(), ".local", "share")) / "genworker"

    @property
    def resolved_output_dir(self) -> Path:
        return self.output_dir or self.resolved_data_dir / "results"

    @property
    def resolved_node_id(self) -> str:
        """--node-id, else the host name: stable across restarts, so a restarted supervisor
        takes back its previous life's jobs at once instead of waiting out their leases."""
        return self.node_id or socket.gethostname()

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_file is not None:
            warn_if_readable_by_others(self.api_key_file, "API key file")
            try:
                return self.api_key_file.read_text().strip() or None
            except OSError as e:
                raise ConfigError(
                    f"cannot read --api-key-file {self.api_key_file}: {e.strerror}"
                ) from None
        return None

    def with_(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# -------------------------------------------------------------------- sources

FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


_UNIT_SUFFIXES = ("_s", "_mb")
_FLAG_RENAMES = {"handlers": "handler", "config_file": "config"}


def flag_name(name: str) -> str:
    """The CLI flag behind a setting (units in the help: --lease)."""
    base = _FLAG_RENAMES.get(name, name)
    for suffix in _UNIT_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return "--" + base.replace("_", "-")


def env_name(name: str) -> str:
    """The environment variable behind a setting: GENWORKER_ + the flag's name."""
    return (
        FIELDS[name].metadata.get("env")
        or "GENWORKER_" + flag_name(name)[2:].replace("-", "_").upper()
    )


def display_value(name: str, value: Any) -> str:
    """A value fit to print: secrets masked."""
    if value is None:
        return ""
    if name in ("database_url", "cache"):  # a Redis URL may carry a password too
        return mask_dsn(str(value))
    if FIELDS[name].metadata.get("secret"):
        return "***"
    if name == "plans":
        return format_plans(value)
    if name == "handlers":
        return ",".join(value)
    return str(value)


def _convert(name: str, raw: Any, source: str) -> Any:
    """Turn a raw value (string from env/flag, or TOML value) into the field's type."""
    f = FIELDS[name]
    typ = str(f.type)
    where = flag_name(name) if source == "flag" else f"{source} {name}"
    try:
        if name == "plans":
            return plans_from(raw)
        if name == "handlers":
            items = raw if isinstance(raw, list) else str(raw).split(",")
            if not all(isinstance(s, str) for s in items):
                raise ConfigError(f"{where}: expected kind=pkg.module:func strings, got {raw!r}")
            # a flag given twice arrives as a list of comma-separated lists: keep them all
            entries = tuple(e.strip() for s in items for e in s.split(",") if e.strip())
            for entry in entries:
                try:
                    parse_handler_entry(entry)
                except ConfigError as e:
                    raise ConfigError(f"{where}: {e}") from None
            return entries
        if raw is None or (isinstance(raw, str) and raw == "" and "None" in typ):
            return None
        if typ.startswith("bool"):
            return parse_bool(raw)
        value = parse_scalar(typ, raw)
    except ConfigError:
        raise  # already says what is wrong (a bad plan, say)
    except (TypeError, ValueError, KeyError, AttributeError):
        kind = typ.split(" ")[0].split("|")[0]
        raise ConfigError(f"{where}: expected {kind}, got {raw!r}") from None
    check_bounds(where, value, f.metadata)
    return value


def load_file(path: Path) -> dict[str, Any]:
    data = read_toml(path)
    unknown = sorted(set(data) - set(FIELDS) - {"config_file"})
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting {unknown[0]!r}")
    if any(_is_secret(k, v) for k, v in data.items()):
        warn_if_readable_by_others(path, "config file with secrets")
    return data


def _is_secret(name: str, value: Any) -> bool:
    if name == "database_url":  # a DSN is a secret when it carries a password
        return isinstance(value, str) and mask_dsn(value) != value
    return bool(FIELDS[name].metadata.get("secret")) if name in FIELDS else False


def build(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Settings from flags > env > file > defaults, and where each value came from."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    cfg_path = flags.get("config_file") or environ.get(env_name("config_file"))
    file_values: dict[str, Any] = {}
    if cfg_path:
        file_values = load_file(Path(cfg_path))
    elif DEFAULT_CONFIG_FILE.is_file():
        cfg_path = DEFAULT_CONFIG_FILE
        file_values = load_file(DEFAULT_CONFIG_FILE)

    for name in FIELDS:
        ev = env_name(name)
        if name in flags:
            values[name] = _convert(name, flags[name], "flag")
            sources[name] = "flag"
        elif ev in environ or (name == "database_url" and "GENWORKER_DATABASE_URL" in environ):
            raw = environ.get(ev, environ.get("GENWORKER_DATABASE_URL"))
            values[name] = _convert(name, raw, f"${ev}")
            sources[name] = f"env {ev}"
        elif name in file_values:
            values[name] = _convert(name, file_values[name], f"{cfg_path}:")
            sources[name] = f"file {cfg_path}"
        else:
            sources[name] = "default"
    if cfg_path:
        values["config_file"] = Path(cfg_path)
    settings = Settings(**values)
    if settings.database_url is not None:
        check_dsn(settings.database_url)
    return settings, sources
