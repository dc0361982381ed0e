"""The `genworker` command: one sub-command per verb.

Flags come from the `Settings` declarations (config.py), so every flag has a
GENWORKER_* variable, shown in `--help`. Errors are one line on stderr: exit 2
for usage (bad flag, bad input), 1 for runtime failures; `--debug` adds the
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from genworker import __version__
from genworker.config import (
    FIELDS,
    ConfigError,
    Settings,
    build,
    display_value,
    env_name,
    flag_name,
)
from genworker.errors import GenworkerError, UsageError
from genworker.exits import EXIT_INTERRUPTED, EXIT_USAGE

Command = Callable[[argparse.Namespace, Settings], int]

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module:function, one-line help)
    "start": ("genworker.cli.start:cmd_start", "run the supervisor and its workers"),
    "submit": ("genworker.cli.submit:cmd_submit", "submit a task"),
    "status": ("genworker.cli.commands:cmd_status", "queue depth, nodes and workers at a glance"),
    "tasks": ("genworker.cli.commands:cmd_tasks", "list recent tasks"),
    "show": ("genworker.cli.commands:cmd_show", "show one task and its jobs"),
    "cancel": ("genworker.cli.commands:cmd_cancel", "cancel a task"),
    "retry": (
        "genworker.cli.commands:cmd_retry",
        "requeue a task's dead jobs, or with --since every job that died since then",
    ),
    "migrate": ("genworker.cli.commands:cmd_migrate", "create or upgrade the database schema"),
    "prune": ("genworker.cli.commands:cmd_prune", "delete finished tasks older than --retention"),
    "config": (
        "genworker.cli.commands:cmd_config",
        "print the effective settings and their sources",
    ),
    "sim-api": (
        "genworker.sim.server:cmd_sim_api",
        "run the simulated image API (for demos and tests)",
    ),
    "demo": ("genworker.demo:cmd_demo", "replay the old system's busiest morning"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, like every usage error
        sys.stderr.write(f"genworker: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def task_id(text: str) -> int:
    """A task id as argparse reads it: a positive whole number that fits a bigint."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a task id (a whole number)") from None
    if not 0 < value < 2**63:
        raise argparse.ArgumentTypeError(f"{text} is not a task id (1 to 2^63-1)")
    return value


def _setting_help(name: str) -> str:
    f = FIELDS[name]
    default = display_value(
        name, f.default if not callable(f.default_factory) else f.default_factory()
    )
    tail = f"[${env_name(name)}" + (f"; default {default}]" if default else "]")
    return f"{f.metadata['help']} {tail}"


def _add_settings(parser: argparse.ArgumentParser, command: str) -> None:
    group = parser.add_argument_group("settings (flag > environment > config file > default)")
    for name, f in FIELDS.items():
        cmds = f.metadata["cmds"]
        if cmds != "*" and command not in cmds.split(","):
            continue
        kwargs: dict[str, Any] = {
            "dest": f"set_{name}",
            "default": None,
            "help": _setting_help(name),
        }
        if str(f.type).startswith("bool"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name == "handlers":
            kwargs["action"] = "append"  # --handler a=... --handler b=...: both, not the last
        else:
            kwargs["metavar"] = (
                name.rsplit("_", 1)[0].upper() if name.endswith(("_s", "_mb")) else name.upper()
            )
        group.add_argument(flag_name(name), **kwargs)


def _add_command_args(name: str, p: argparse.ArgumentParser) -> None:
    json_help = "print one JSON document (see README: JSON output)"
    if name == "submit":
        p.add_argument("--plan", required=True, help="plan name, e.g. free, start, pro")
        p.add_argument("--prompt", help="the image prompt")
        p.add_argument("--params", help="more task parameters as a JSON object")
        p.add_argument("--tenant", default="default", help="tenant (customer) id")
        p.add_argument(
            "--kind", default="image", help="job kind (default image; noop for benchmarks)"
        )
        p.add_argument(
            "--key", dest="idempotency_key", help="idempotency key: a repeat returns the first task"
        )
        p.add_argument("--n", type=int, help="images (default: the plan's)")
        p.add_argument(
            "--wait", action="store_true", help="wait for the task; exit 1 unless it succeeded"
        )
        p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
        p.add_argument("--json", action="store_true", help=json_help)
    elif name in ("show", "cancel"):
        p.add_argument("task_id", type=task_id, metavar="TASK", help="task id")
        p.add_argument("--json", action="store_true", help=json_help)
    elif name == "retry":
        p.add_argument("task_id", type=task_id, nargs="?", metavar="TASK", help="task id")
        p.add_argument(
            "--status",
            choices=["dead"],
            default="dead",
            help="without TASK: requeue jobs in this state across tasks (dead)",
        )
        p.add_argument(
            "--since",
            metavar="AGE|TIME",
            help="without TASK: the jobs that died since then, e.g. 1h, 30m or an ISO time",
        )
        p.add_argument("--json", action="store_true", help=json_help)
    elif name == "tasks":
        p.add_argument(
            "--status", choices=["queued", "running", "succeeded", "failed", "cancelled"]
        )
        p.add_argument("--tenant")
        p.add_argument("--limit", type=int, default=20)
        p.add_argument("--json", action="store_true", help=json_help)
    elif name == "status":
        p.add_argument("--json", action="store_true", help=json_help)
        p.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    elif name == "config":
        p.add_argument("--json", action="store_true", help=json_help)
    elif name == "demo":
        _add_demo_args(p, json_help)


def _bounded(kind: type, lo: float, hi: float) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` in [lo, hi], or a one-line usage error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo:g}..{hi:g}, got {text}")
        return value

    return parse


def _add_demo_args(p: argparse.ArgumentParser, json_help: str) -> None:
    scene = p.add_argument_group("the morning (defaults end in about a minute)")
    scene.add_argument(
        "--latency-ms",
        type=_bounded(float, 1, 60_000),
        default=1000.0,
        help="simulated API latency per image (default 1000)",
    )
    scene.add_argument(
        "--jitter-ms",
        type=_bounded(float, 0, 60_000),
        help="latency varies uniformly by +- this (default a fifth of the latency)",
    )
    scene.add_argument(
        "--fail-rate",
        type=_bounded(float, 0, 0.5),
        default=0.01,
        help="share of API calls answered 500, retried (default 0.01)",
    )
    scene.add_argument(
        "--pro", type=_bounded(int, 0, 1000), default=10, help="Pro tasks at once (default 10)"
    )
    scene.add_argument(
        "--free", type=_bounded(int, 0, 1000), default=20, help="Free tasks arriving (default 20)"
    )
    scene.add_argument(
        "--start", type=_bounded(int, 0, 1000), default=6, help="Start tasks arriving (default 6)"
    )
    scene.add_argument(
        "--window",
        type=_bounded(float, 0, 3600),
        default=30.0,
        help="Free and Start tasks arrive over this many seconds (default 30)",
    )
    scene.add_argument(
        "--seed", type=_bounded(int, 0, 2**31), default=1, help="arrivals and faults (default 1)"
    )
    p.add_argument("--json", action="store_true", help=json_help)


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="genworker",
        description="Run API-bound generation jobs from a durable PostgreSQL queue.",
        epilog="With no DATABASE_URL every command uses an embedded PostgreSQL in --data-dir.",
    )
    parser.add_argument("--version", action="version", version=f"genworker {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (_, help_text) in COMMANDS.items():
        if name == "sim-api":
            # its own flags (latency, faults ...) are parsed by the simulator itself
            p = sub.add_parser(name, help=help_text, add_help=False)
            p.add_argument("sim_args", nargs=argparse.REMAINDER)
            continue
        p = sub.add_parser(name, help=help_text, description=help_text.capitalize() + ".")
        p.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks on errors",
        )
        _add_command_args(name, p)
        _add_settings(p, name)
    return parser


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, dict[str, str]]:
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}
    return build(flags)


def _load(target: str) -> Command:
    import importlib

    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["sim-api"]:
        # the simulator parses its own flags (argparse's REMAINDER would mangle them)
        from genworker.sim.server import main as sim_main

        return sim_main(args_list[1:])
    parser = make_parser()
    args = parser.parse_args(args_list)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    settings: Settings | None = None
    try:
        settings, sources = settings_from_args(args)
        args.sources = sources
        logging.basicConfig(
            level=logging.DEBUG if debug else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        return _load(COMMANDS[args.command][0])(args, settings)
    except KeyboardInterrupt:
        sys.stderr.write("genworker: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `genworker config | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except (ConfigError, UsageError, GenworkerError) as e:
        code = 2 if isinstance(e, ConfigError) else e.exit_code
        return _fail(f"genworker: error: {e}", code, debug, _secrets(args, settings))
    except Exception as e:  # the last line of defence: one line, never a traceback by default
        return _fail(
            f"genworker: unexpected error: {type(e).__name__}: {str(e)[:200]} "
            "(run with --debug for the traceback)",
            1,
            debug,
            _secrets(args, settings),
        )


def _secrets(args: argparse.Namespace, settings: Settings | None) -> list[str | None]:
    """The API key and DB passwords this run was given, wherever they came from."""
    import os

    from genworker.logs import dsn_password

    dsns = [os.environ.get("DATABASE_URL"), os.environ.get("GENWORKER_DATABASE_URL")]
    keys = [os.environ.get("GENWORKER_API_KEY"), getattr(args, "set_api_key", None)]
    dsns.append(getattr(args, "set_database_url", None))
    if settings is not None:
        dsns.append(settings.database_url)
        keys.append(settings.api_key)
    return [*keys, *(dsn_password(d) for d in dsns if d)]


def _fail(line: str, code: int, debug: bool, secrets: list[str | None]) -> int:
    """One line on stderr (the traceback too with --debug), with every secret masked."""
    import traceback

    from genworker.logs import Redactor

    redact = Redactor(secrets)
    if debug:
        sys.stderr.write(redact(traceback.format_exc()))
    sys.stderr.write(redact(" ".join(line.split())) + "\n")
    return code


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
