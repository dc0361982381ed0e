"""Keeping an image that was paid for but could not be stored.

A successful generation costs money; a full disk or a wrong permission on --output-dir
must not make us pay for it twice. `store_patiently` retries only the write of the
bytes in hand (0.5 s doubling to 30 s, for up to `STORE_BUDGET_S`: the job's lease is
renewed meanwhile, as for any running job). When the store still fails, `Spool.put`
keeps the bytes, 0600, as `<job id>-<sha256>.bin` in the first spool directory that
takes them (OUTPUT_DIR/.spool, else DATA_DIR/spool, which may sit on another disk), and
the job is retried: its next attempt on this host finds them with `Spool.take` and
stores them without calling the provider. Another host's attempt cannot see them and
calls again; that is the price of the host's storage failing for that long.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genworker.api.results import make_private_dir, store_image, write_file
from genworker.config import Settings

log = logging.getLogger("genworker.worker")

STORE_BUDGET_S = 300.0
FIRST_WAIT_S = 0.5
MAX_WAIT_S = 30.0

_SPOOLED = re.compile(r"^(\d+)-([0-9a-f]{64})\.bin$")


async def store_patiently(
    out_dir: Path,
    data: bytes,
    mime: str,
    *,
    budget_s: float | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """store_image, retrying the write alone while it fails with OSError, within budget_s."""
    budget = STORE_BUDGET_S if budget_s is None else budget_s
    now = clock or asyncio.get_running_loop().time
    deadline = now() + budget
    wait = FIRST_WAIT_S
    while True:
        try:
            return await store_image(out_dir, data, mime)
        except OSError as e:
            left = deadline - now()
            if left <= 0:
                raise
            log.warning("cannot store an image (%s); trying again in %.1fs", e.strerror, wait)
            await asyncio.sleep(min(wait, left))
            wait = min(wait * 2, MAX_WAIT_S)


class Spool:
    """Paid-for images waiting for storage, by job id (one per job at most)."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs

    @classmethod
    def of(cls, settings: Settings) -> Spool:
        return cls([settings.resolved_output_dir / ".spool", settings.resolved_data_dir / "spool"])

    def used(self) -> bool:
        """Has any spool directory been made (by any worker of this host)? One stat each:
        cheap enough to ask before every job."""
        return any(d.is_dir() for d in self.dirs)

    def sweep(self, older_than_s: float) -> int:
        """Delete what was kept longer than `older_than_s` (the retention: a job whose bytes
        waited that long died or was pruned; its retry will never come); returns how many."""
        horizon = time.time() - older_than_s
        removed = 0
        for d in self.dirs:
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < horizon:
                        os.unlink(entry.path)
                        removed += 1
                except OSError:
                    continue
        return removed

    def put(self, job_id: int, data: bytes) -> Path | None:
        """Keep `data` for the job's next attempt; the path, or None when no directory took it."""
        digest = hashlib.sha256(data).hexdigest()
        for d in self.dirs:
            final = d / f"{job_id}-{digest}.bin"
            try:
                make_private_dir(d)
                write_file(final, data)
                return final
            except OSError as e:
                log.warning("cannot spool an image in %s: %s", d, e.strerror)
        return None

    def take(self, job_id: int) -> tuple[bytes, Path] | None:
        """The bytes kept for this job (checked against their sha256) and where they are."""
        for d in self.dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                m = _SPOOLED.match(name)
                if not m or int(m[1]) != job_id:
                    continue
                path = d / name
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                if hashlib.sha256(data).hexdigest() == m[2]:
                    return data, path
                path.unlink(missing_ok=True)  # damaged: the API call will be made again
        return None
