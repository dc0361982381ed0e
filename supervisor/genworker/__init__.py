"""genworker: a durable PostgreSQL job queue, a pre-fork supervisor and an async image-API client.

The public Python API is `Client`, `AsyncClient` and the errors in `genworker.errors`.
Imports are lazy so a worker process, which never talks to the database, does not
load the database driver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "TaskInfo", "__version__"]

if TYPE_CHECKING:
    from genworker.queue.client import AsyncClient, Client, TaskInfo


def __getattr__(name: str) -> Any:
    if name in ("Client", "AsyncClient", "TaskInfo"):
        from genworker.queue import client

        return getattr(client, name)
    raise AttributeError(f"module 'genworker' has no attribute {name!r}")
