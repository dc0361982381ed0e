"""The real image handler, with the wall-clock start and end of each call in its result.

The scheduling benchmark runs its nodes with `--handler image=bench.sched_handler:timed_image`
so it can tell, after the run, when every slot was busy (utilisation) without sampling. The
handler reads its settings (API URL, output directory) from the node's GENWORKER_*
environment, as the node itself does.
"""

from __future__ import annotations

import os
import time
from typing import Any

from genworker.api.openai import ImageHandler
from genworker.config import build

_image: ImageHandler | None = None


async def timed_image(job: Any, session: Any) -> dict[str, Any]:
    global _image
    if _image is None:  # once per worker, on its first job
        _image = ImageHandler(build({}, os.environ)[0])
    t0 = time.time()
    result = await _image(job, session)
    return {**result, "t0": t0, "t1": time.time()}
