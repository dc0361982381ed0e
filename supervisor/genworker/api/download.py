"""Downloading a provider's image URL (--fetch-urls) without letting the URL aim us inward.

The URL comes from the provider's answer, so whoever can shape that answer (a proxy, a
compromised or malicious endpoint, a prompt that leaks into a URL) chooses it. The
download has its own session, whose connector checks every address (`api/ssrf.py`),
sends no Authorization header, and follows a redirect only to the same scheme, host
and port, checking each hop. A refused address is a permanent failure whose reason
names neither the address nor anything the internal host answered.
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import aiohttp

from genworker.api.errors import ApiTimeout
from genworker.api.results import MAX_FILE_BYTES
from genworker.api.ssrf import REFUSED, AddressPolicy, AddressRefused, check_url, guarded_connector
from genworker.config import Settings
from genworker.model import PermanentError, TransientError

MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The body, or TransientError when it is larger than `cap` (never buffered beyond it)."""
    if resp.content_length is not None and resp.content_length > cap:
        too_large = f"provider answer too large: {resp.content_length} bytes > {cap}"
        raise TransientError(too_large, status=resp.status, cause="answer")
    parts: list[bytes] = []
    size = 0
    while chunk := await resp.content.read(64 * 1024):
        size += len(chunk)
        if size > cap:
            too_large = f"provider answer too large: over {cap} bytes"
            raise TransientError(too_large, status=resp.status, cause="answer")
        parts.append(chunk)
    return b"".join(parts)


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port past 65535 or not a number: no address we would reach
        raise refused("bad redirect") from None
    return parts.scheme, parts.hostname, port


def refused(what: str = REFUSED) -> PermanentError:
    return PermanentError(f"image download refused: {what}", cause="connection")


class Downloader:
    """One worker's image downloads: a guarded session, made on first use, closed by `close`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = AddressPolicy(settings.fetch_allow)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # inside the running loop: a session belongs to its loop
            s = self.settings
            timeout = aiohttp.ClientTimeout(total=s.request_timeout_s, connect=s.connect_timeout_s)
            connector = guarded_connector(self.policy, limit=s.concurrency)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str) -> bytes:
        """The image at `url`, or the JobError that says why not."""
        try:
            for _ in range(MAX_REDIRECTS + 1):
                check_url(url, self.policy)
                async with self.session().get(url, allow_redirects=False) as resp:
                    if resp.status not in _REDIRECTS:
                        if resp.status != 200:
                            failed = f"image download failed: HTTP {resp.status}"
                            raise TransientError(failed, status=resp.status, cause="http")
                        return await read_capped(resp, MAX_FILE_BYTES)
                    location = resp.headers.get("Location", "")
                target = urljoin(url, location)
                if not location or _origin(target) != _origin(url):
                    raise refused("redirect to another host")
                url = target
        except AddressRefused:
            raise refused() from None
        except TimeoutError:
            raise ApiTimeout("image download timed out") from None
        except aiohttp.ClientError as e:
            if isinstance(getattr(e, "os_error", None), AddressRefused):  # from the resolver
                raise refused() from None
            failed = f"image download failed: {type(e).__name__}"
            raise TransientError(failed, cause="connection") from None
        raise TransientError("image download failed: too many redirects", cause="http")
