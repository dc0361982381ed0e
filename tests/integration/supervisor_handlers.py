"""Job handlers that misbehave on purpose, imported by the workers of the supervisor
tests (`--handler crash=supervisor_handlers:crash`; the harness puts this directory on
the workers' PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from setproctitle import getproctitle

# A worker whose title names this slot dies while it boots (set before the import):
# one position crash-loops while the others work.
_CRASH_SLOT = os.environ.get("GW_TEST_CRASH_AT_BOOT_SLOT")
if _CRASH_SLOT is not None and getproctitle().startswith(f"genworker: worker {_CRASH_SLOT} "):
    os._exit(1)


# While this file exists, a worker takes that many seconds to boot (a slow import).
_SLOW_BOOT = os.environ.get("GW_TEST_SLOW_BOOT_FILE")
if _SLOW_BOOT is not None and os.path.exists(_SLOW_BOOT):
    with open(_SLOW_BOOT) as fh:
        time.sleep(float(fh.read()))


async def crash(job: Any, session: Any) -> dict[str, Any]:
    """Ends the worker process at once, with exit code 1."""
    os._exit(1)


async def poison(job: Any, session: Any) -> dict[str, Any]:
    """Kills its own worker with SIGKILL, as the OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


async def ok(job: Any, session: Any) -> dict[str, Any]:
    return {"ok": job.job_id}
