"""The provider side of a worker: HTTP client, limits, result files, and the simulated API.

Nothing here imports the database: workers never hold a DB connection.
"""

from __future__ import annotations

from .errors import ApiTimeout
from .limiter import BUCKET_BYTES, Aimd, SharedTokenBucket
from .openai import ImageHandler, make_session

__all__ = [
    "BUCKET_BYTES",
    "Aimd",
    "ApiTimeout",
    "ImageHandler",
    "SharedTokenBucket",
    "make_session",
]
