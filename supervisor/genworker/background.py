"""Background tasks with an owner: every task is named, its failure is logged (and,
for critical ones, reported), and the owner awaits or cancels them all on exit.
No fire-and-forget."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("genworker.tasks")


class TaskOwner:
    def __init__(self, on_crash: Callable[[str, BaseException], None]) -> None:
        self.on_crash = on_crash
        self.tasks: dict[asyncio.Task[Any], tuple[str, bool]] = {}

    def spawn(
        self, coro: Coroutine[Any, Any, Any], name: str, *, critical: bool = True
    ) -> asyncio.Task[Any]:
        """Run `coro`; a critical task that ends with an error is reported to on_crash."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks[task] = (name, critical)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        name, critical = self.tasks.pop(task, ("?", False))
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        log.error("task %s failed: %s: %s", name, type(exc).__name__, exc, exc_info=exc)
        if critical:
            self.on_crash(name, exc)

    def named(self, name: str) -> list[asyncio.Task[Any]]:
        return [t for t, (n, _) in self.tasks.items() if n == name]

    async def close(self, *, wait_for: tuple[str, ...] = (), timeout_s: float = 10.0) -> None:
        """Let the tasks named in `wait_for` finish (up to timeout_s), cancel the rest."""
        waiting = [t for t, (n, _) in self.tasks.items() if n in wait_for]
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=timeout_s)
            for t in pending:
                log.warning(
                    "task %s did not finish in %.0fs; cancelling it",
                    self.tasks.get(t, ("?",))[0],
                    timeout_s,
                )
        rest = list(self.tasks)
        for t in rest:
            t.cancel()
        if rest:
            await asyncio.gather(*rest, return_exceptions=True)
