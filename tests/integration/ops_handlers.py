"""A job handler for the operations tests: it logs, from the worker, a line holding the
secret named by GW_TEST_SECRET (the harness puts this directory on the workers' path)."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("genworker.test_handler")


async def chatty(job: Any, session: Any) -> dict[str, Any]:
    log.warning("job %d\nsays the key is %s", job.job_id, os.environ.get("GW_TEST_SECRET"))
    return {"chatty": job.job_id}
