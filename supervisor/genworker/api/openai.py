"""The image provider client: one POST to an OpenAI-compatible /v1/images/generations.

A worker builds one `ClientSession` with `make_session` after the fork, inside
its running loop, and one `ImageHandler`; the handler turns each job into a
request and the answer into a small result dict, or raises the `JobError` that
says how the job ended (see `errors.classify`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from pathlib import Path
from typing import Any

import aiohttp

from genworker import contract
from genworker.api.download import Downloader, read_capped
from genworker.api.errors import ApiTimeout, Overloaded, classify, scrub
from genworker.api.limiter import SharedTokenBucket
from genworker.api.results import MAX_FILE_BYTES, sniff_mime
from genworker.api.spool import Spool, store_patiently
from genworker.config import ConfigError, Settings
from genworker.model import (
    PROVIDER_UNREACHABLE,
    Job,
    JobError,
    OutcomeKind,
    PermanentError,
    TransientError,
)

MAX_BODY_BYTES = MAX_FILE_BYTES  # a b64 answer larger than this is refused, not buffered
MAX_ERROR_BODY_BYTES = 64 * 1024  # an error body only needs its message


def make_session(settings: Settings) -> aiohttp.ClientSession:
    """The worker's one HTTP session: `concurrency` connections, explicit timeouts.

    Call it inside the worker's running loop, after the fork: a session belongs
    to the loop (and the process) that made it.
    """
    connector = aiohttp.TCPConnector(limit=settings.concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(
        total=settings.request_timeout_s,
        connect=settings.connect_timeout_s,
        sock_connect=settings.connect_timeout_s,
    )
    return aiohttp.ClientSession(connector=connector, timeout=timeout, raise_for_status=False)


def generations_url(api_url: str) -> str:
    """{base}/v1/images/generations, accepting a base given with or without /v1."""
    base = api_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return f"{base}/v1/images/generations"


class ImageHandler:
    """`await handler(job, session) -> dict`: one image generation per job.

    With a `bucket` (the host's --api-rps budget) it paces its own calls: the worker
    awaits `pace` before each call, and every rate limit the provider answers slows the
    bucket down.
    """

    def __init__(self, settings: Settings, bucket: SharedTokenBucket | None = None) -> None:
        if not settings.api_url:
            raise ConfigError("the image handler needs --api-url (or the simulated API)")
        self.settings = settings
        self.url = generations_url(settings.api_url)
        self.key = settings.resolved_api_key()
        self.output_dir: Path = settings.resolved_output_dir
        self.bucket = bucket
        self.downloader = Downloader(settings) if settings.fetch_urls else None
        self.spool = Spool.of(settings)

    async def close(self) -> None:
        """Close what the handler opened itself (the download session)."""
        if self.downloader is not None:
            await self.downloader.close()

    async def pace(self) -> None:
        """Wait for the host's next request token, if it has a budget."""
        if self.bucket is not None:
            await self.bucket.acquire()

    def _request(self, job: Job) -> tuple[dict[str, Any], dict[str, str]]:
        prompt = job.params.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PermanentError("job has no prompt")
        model = job.params.get("model") or self.settings.model
        body = contract.request_body(
            model,
            prompt,
            job.params,
            default_size=self.settings.size,
            response_format=self.settings.response_format,
        )
        headers = {"X-Client-Request-Id": f"gw-{job.job_id}-{job.token}"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return body, headers

    async def __call__(self, job: Job, session: aiohttp.ClientSession) -> dict[str, Any]:
        # bytes an earlier attempt paid for and could not store (whatever the attempt count
        # says: a release or a bulk requeue lowers it); one stat while no spool exists
        kept = await asyncio.to_thread(self.spool.take, job.job_id) if self.spool.used() else None
        if kept is not None:  # paid for by an earlier attempt whose store failed
            data, path = kept
            result = await self._store(data, job)
            await asyncio.to_thread(path.unlink, missing_ok=True)
            return result
        try:
            return await self._generate(job, session)
        except JobError as e:
            if self.bucket is not None and _slows_the_host(e):
                self.bucket.on_rate_limited(e.retry_after_s)
            raise

    async def _generate(self, job: Job, session: aiohttp.ClientSession) -> dict[str, Any]:
        body, headers = self._request(job)
        try:
            async with session.post(self.url, json=body, headers=headers) as resp:
                if resp.status >= 300:
                    raw = await read_capped(resp, MAX_ERROR_BODY_BYTES)
                    raise classify(resp.status, resp.headers, raw, self.key)
                if resp.content_type != "application/json":
                    ctype = scrub(resp.content_type)
                    raise TransientError(
                        f"provider answered {ctype} instead of JSON",
                        status=resp.status,
                        cause="answer",
                    )
                raw = await read_capped(resp, MAX_BODY_BYTES)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            # refused, DNS, TLS, no connection in time: the request never reached the provider
            detail = scrub(f"{type(e).__name__} {e}", self.key)
            raise TransientError(
                f"connection error: {detail}", cause="connection", alarm=PROVIDER_UNREACHABLE
            ) from None
        except TimeoutError:
            raise ApiTimeout(f"no answer within {self.settings.request_timeout_s:g}s") from None
        except aiohttp.InvalidURL:
            raise PermanentError("invalid API URL", alarm="bad_api_url") from None
        except aiohttp.ClientError as e:
            detail = scrub(f"{type(e).__name__} {e}", self.key)
            raise TransientError(f"connection error: {detail}", cause="connection") from None
        return await self._result(raw, session, resp.status, job)

    async def _result(
        self, raw: bytes, session: aiohttp.ClientSession, status: int, job: Job
    ) -> dict[str, Any]:
        try:
            return await self._result_of(raw, session, job)
        except ApiTimeout:
            raise
        except TransientError as e:
            # a 2xx that we could not use: the answer's fault (the worker counts it apart)
            if e.cause is None:
                e.status, e.cause = status, "answer"
            raise

    async def _result_of(
        self, raw: bytes, session: aiohttp.ClientSession, job: Job
    ) -> dict[str, Any]:
        doc, item = first_image(raw)
        return {**await self._image_of(item, session, job), **usage_of(doc)}

    async def _image_of(
        self, item: dict[str, Any], session: aiohttp.ClientSession, job: Job
    ) -> dict[str, Any]:
        b64 = item.get("b64_json")
        if isinstance(b64, str) and b64:
            try:
                data = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise TransientError("provider answer has invalid base64") from None
            return await self._store(data, job)
        url = item.get("url")
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            if self.downloader is None:
                return {"url": url}
            return await self._store(await self.downloader.fetch(url), job)
        raise TransientError("provider answer has neither b64_json nor an http(s) url")

    async def _store(self, data: bytes, job: Job) -> dict[str, Any]:
        """Store paid-for bytes; retry the write, not the call, and keep them if it fails."""
        mime = sniff_mime(data)
        if mime is None:
            raise TransientError(f"provider image is not PNG/JPEG/WebP/GIF ({len(data)} bytes)")
        try:
            return await store_patiently(self.output_dir, data, mime)
        except asyncio.CancelledError:  # the worker is stopping: keep them for the next attempt
            self.spool.put(job.job_id, data)
            raise
        except OSError as e:
            # a full disk is this host's problem, not the job's: retry, without a new call
            kept = await asyncio.to_thread(self.spool.put, job.job_id, data)
            failed = f"cannot store image: {e.strerror}" + ("; kept for the retry" if kept else "")
            raise TransientError(failed, cause="storage") from None


def _slows_the_host(e: JobError) -> bool:
    """A rate limit on us cuts the host's learned rate; an overloaded provider does not."""
    if isinstance(e, Overloaded):
        return False
    return e.status == 429 or e.outcome is OutcomeKind.SNOOZE


def usage_of(doc: dict[str, Any]) -> dict[str, Any]:
    """{"usage": {"input_tokens": N, "output_tokens": M}} from an answer that reports token
    usage (gpt-image-1 does), or {} (only counts are kept; anything else is dropped)."""
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return {}
    kept = {
        k: v
        for k in ("input_tokens", "output_tokens")
        if isinstance(v := usage.get(k), int) and not isinstance(v, bool) and 0 <= v < 2**31
    }
    return {"usage": kept} if kept else {}


def first_image(raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the answer, its data[0]) of a generations answer; TransientError for anything
    malformed or empty."""
    if not raw:
        raise TransientError("provider answer is empty")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise TransientError("provider answer is not valid JSON") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise TransientError("provider answer has no image")
    return doc, data[0]
