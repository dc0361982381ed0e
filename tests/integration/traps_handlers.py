"""A job handler that reports what its worker process sees (`--handler
environ=traps_handlers:environ`; the harness puts this directory on PYTHONPATH)."""

from __future__ import annotations

import os
import sys
from typing import Any


async def environ(job: Any, session: Any) -> dict[str, Any]:
    """The names in the worker's environment (never the values: the result is stored), and
    the head of its sys.path."""
    return {"names": sorted(os.environ), "path0": sys.path[0], "pid": os.getpid()}
