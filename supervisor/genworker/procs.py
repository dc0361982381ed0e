"""Small facts about other processes, shared by the modules that need them."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from genworker.config import FIELDS, env_name


def pid_alive(pid: int) -> bool:
    """Is there a process with this pid (ours or not: EPERM means it exists)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# What a child of the supervisor (the zygote, hence every worker, and the simulator) must
# not inherit: workers get the API key in their settings, over the control socket, and no
# child of ours talks to the database.
CHILD_SECRETS = frozenset(
    {"DATABASE_URL", "GENWORKER_DATABASE_URL", "GENWORKER_CACHE", "OPENAI_API_KEY", "PGPASSWORD"}
)


def child_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without the secrets: the fixed names above and every secret
    setting's variable (GENWORKER_API_KEY, ...)."""
    drop = CHILD_SECRETS | {env_name(n) for n, f in FIELDS.items() if f.metadata.get("secret")}
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if k not in drop}


def python_module(module: str, *args: str) -> list[str]:
    """The command line of `python -m module`, safe from the directory it starts in: -P
    keeps the cwd off sys.path (a `genworker/` folder there would be imported instead of
    ours); PYTHONPATH and site-packages still count, unlike with -I."""
    return [sys.executable, "-P", "-m", module, *args]
