"""The provider side of a worker: HTTP client, limits, result files, and the simulated API.

Nothing here imports the database: workers never hold a DB connection.
"""

from __future__ import annotations

from genworker.api.errors import ApiTimeout
from genworker.api.limiter import BUCKET_BYTES, Aimd, SharedTokenBucket
from genworker.api.openai import ImageHandler, make_session

__all__ = [
    "BUCKET_BYTES",
    "Aimd",
    "ApiTimeout",
    "ImageHandler",
    "SharedTokenBucket",
    "make_session",
]
