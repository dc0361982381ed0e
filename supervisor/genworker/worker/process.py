"""The worker process: one uvloop loop, one aiohttp session, up to `limit` jobs at once.

A worker never talks to the database. It receives jobs from the supervisor on
its own channel, runs each through the handler of its kind, and sends the
outcomes back in batches. Its counters and heartbeat live in its own slot of
the shared block; the heartbeat is written by the event loop itself, so a
blocked loop looks dead to the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from setproctitle import setproctitle

from genworker import channels as ch
from genworker.api.errors import scrub
from genworker.buffer import UrgencyBuffer
from genworker.config import Settings
from genworker.exits import EXIT_BOOT, EXIT_OK, EXIT_ORPHAN, EXIT_RECYCLE
from genworker.exits import EXIT_FAILED as EXIT_CRASH
from genworker.logs import Redactor, node_secrets
from genworker.model import Job, JobError, Outcome, OutcomeKind

NO_HANDLER_WAIT_S = 5.0  # a job of a kind this worker lacks waits this long

log = logging.getLogger("genworker.worker")

HEARTBEAT_S = 0.25
TITLE_EVERY_S = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class BootError(Exception):
    """The worker cannot start; the supervisor must not keep restarting it."""


def worker_main(
    slot: int,
    generation: int,
    sock: socket.socket,
    settings: Settings,
    position: int | None = None,
    *,
    block: ch.SharedBlock,
    bucket_lock: str | None = None,
) -> NoReturn:
    """Entry point in the freshly forked child. Never returns.

    `slot` is its shared-memory slot; `position` the worker number people see (titles,
    logs), which stays the same when a worker is replaced.
    """
    code = EXIT_CRASH
    number = slot if position is None else position
    try:
        random.seed()  # the fork copied the parent's random state
        setproctitle(f"genworker: worker {number} booting")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the supervisor to handle
        import uvloop

        worker = Worker(slot, generation, sock, settings, block, bucket_lock, number)
        code = uvloop.run(worker.run())
    except BootError as e:
        log.error("worker %s cannot start: %s", number, e)  # through the node's redacting log
        code = EXIT_BOOT
    except BaseException as e:  # the process is about to end; say why, once
        log.error("worker %s crashed: %s: %s", number, type(e).__name__, e)
        code = EXIT_CRASH
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class Worker:
    def __init__(
        self,
        slot: int,
        generation: int,
        sock: socket.socket,
        settings: Settings,
        block: ch.SharedBlock,
        bucket_lock: str | None,
        number: int | None = None,
    ) -> None:
        self.number = slot if number is None else number
        self.sock = sock
        self.settings = settings
        self.slot = block.slot(slot)
        ch.clear_slot(self.slot)
        self.slot[ch.PID] = os.getpid()
        self.slot[ch.GENERATION] = generation
        self.slot[ch.STARTED] = self.slot[ch.HEARTBEAT] = time.monotonic()
        self.block = block
        self.bucket_lock = bucket_lock
        # Jobs handed over while every slot is busy (quick calls get one queued behind each
        # slot), most urgent first: a Free job sent after Pro jobs starts before them.
        self.waiting = UrgencyBuffer()
        self.running = 0
        self.tasks: set[asyncio.Task[None]] = set()
        # free places in the slot's list of running job ids (none: concurrency too high)
        tracked = settings.concurrency <= ch.RUNNING_PLACES
        self.places = list(range(ch.RUNNING_PLACES)) if tracked else []
        self.place_of: dict[int, int] = {}
        self.outbox: list[Outcome] = []
        # kinds whose handler paces its own calls (set with the handlers, in run)
        self.paces: dict[str, Callable[[], Awaitable[None]]] = {}
        self.stop_reason: str | None = None
        self.done = asyncio.Event()
        self.orphaned = False
        secrets = node_secrets(settings)
        self.key = secrets[0]
        self.redactor = Redactor(secrets)

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        from genworker.api.limiter import Aimd, SharedTokenBucket
        from genworker.api.openai import make_session
        from genworker.worker.handlers import close_handlers, load_handlers, paces

        loop = asyncio.get_running_loop()
        bucket = (
            SharedTokenBucket(self.block.bucket_buffer(), self.bucket_lock)
            if self.bucket_lock
            else None
        )
        try:
            self.handlers = load_handlers(self.settings, bucket)
        except Exception as e:  # a bad --handler is a boot error, not a crash loop
            raise BootError(str(e)) from None
        self.paces = paces(self.handlers)
        self.aimd = Aimd(self.settings.concurrency)
        self.session = make_session(self.settings)
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "shutdown")
        self.chan = await ch.open_channel(self.sock, self.on_message, self.on_close)
        self.chan.send((ch.READY, os.getpid()))
        beat = loop.create_task(self.heartbeat())
        try:
            await self.done.wait()
            if not self.orphaned:
                self.flush()
                await self._drain_channel()
        finally:
            beat.cancel()
            for t in list(self.tasks):
                t.cancel()
            await asyncio.gather(beat, *self.tasks, return_exceptions=True)
            await close_handlers(self.handlers)
            await self.session.close()
        if self.orphaned:
            return EXIT_ORPHAN
        return EXIT_RECYCLE if self.stop_reason == "recycle" else EXIT_OK

    async def _drain_channel(self) -> None:
        """Let the last outcomes leave the socket buffer before the process ends."""
        transport = self.chan.transport
        deadline = time.monotonic() + 5
        while (  # noqa: ASYNC110
            transport is not None
            and transport.get_write_buffer_size()
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.005)  # transports have no 'drained' event

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.stop_reason is not None and self.running == 0 and not self.waiting:
            self.done.set()

    def on_close(self, exc: Exception | None) -> None:
        # The supervisor is gone (or closed us): nobody can take our outcomes. Stop now.
        self.orphaned = True
        self.done.set()

    def on_message(self, msg: tuple[str, Any]) -> None:
        kind, body = msg
        if kind == ch.JOBS:
            self.slot[ch.JOBS_SEEN] += len(body)
            self.waiting.extend(body)
            self._start_waiting()
        elif kind == ch.STOP:
            self.request_stop(body or "shutdown")

    # ----------------------------------------------------------------- jobs
    def _start_waiting(self) -> None:
        limit = self.aimd.limit
        while self.waiting and self.running < limit:
            job = self.waiting.popleft()
            self.running += 1
            self._mark_running(job.job_id)
            task = asyncio.get_running_loop().create_task(self.run_job(job))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.slot[ch.INFLIGHT] = self.running + len(self.waiting)

    def _mark_running(self, job_id: int) -> None:
        if self.places:
            place = self.places.pop()
            self.place_of[job_id] = place
            self.slot[ch.RUNNING0 + place] = job_id

    def _unmark_running(self, job_id: int) -> None:
        place = self.place_of.pop(job_id, None)
        if place is not None:
            self.slot[ch.RUNNING0 + place] = 0.0
            self.places.append(place)

    async def run_job(self, job: Job) -> None:
        try:
            outcome = await self._call(job)
        finally:
            self.running -= 1
            self._unmark_running(job.job_id)
        self._count(outcome)
        self.outbox.append(outcome)
        if len(self.outbox) == 1:
            asyncio.get_running_loop().call_soon(self.flush)
        self._start_waiting()
        self._maybe_done()

    async def _call(self, job: Job) -> Outcome:
        handler = self.handlers.get(job.kind)
        if handler is None:
            # not this worker's kind: during a reload that adds (or removes) a --handler,
            # old and new workers run side by side. The job waits, without an attempt
            # spent, for a worker that has it; the node claims only kinds it runs.
            return Outcome(
                job.job_id,
                job.token,
                OutcomeKind.SNOOZE,
                error=f"no handler for job kind {job.kind!r} on this worker",
                retry_after_s=NO_HANDLER_WAIT_S,
                api_calls=0,
            )
        pace = self.paces.get(job.kind)
        if pace is not None:
            await pace()  # the handler's own rate limit: waiting for it is not the call's time
        t0 = time.monotonic()
        try:
            result = await handler(job, self.session)
        except JobError as e:
            self._observe(time.monotonic() - t0, e)
            return Outcome(
                job.job_id,
                job.token,
                e.outcome,
                error=self.redact(e.reason, 1000),
                retry_after_s=e.retry_after_s,
                alarm=e.alarm,
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a handler bug or an unexpected error: this job's, not the worker's
            self._observe(time.monotonic() - t0, None)
            error = self.redact(f"{type(e).__name__}: {e}", 300)
            return Outcome(job.job_id, job.token, OutcomeKind.RETRY, error=error)
        self._observe(time.monotonic() - t0, None, ok=True)
        return Outcome(job.job_id, job.token, OutcomeKind.OK, result=result)

    def redact(self, text: str, max_chars: int) -> str:
        """A handler's error text as it may be stored: tenants and dashboards read it, so
        no API key, DB password or other secret-shaped text, on one line."""
        return scrub(self.redactor(text), self.key, max_chars=max_chars)

    def _observe(self, seconds: float, error: JobError | None, ok: bool = False) -> None:
        s = self.slot
        ch.observe_latency(s, seconds)
        if ok:
            s[ch.API_2XX] += 1
            self.aimd.on_success()
            return
        status = error.status if error is not None else None
        cause = error.cause if error is not None else None
        if status == 429 or (error is not None and error.outcome is OutcomeKind.SNOOZE):
            s[ch.API_429] += 1
            self.aimd.on_rate_limited()
        elif cause == "timeout":
            s[ch.API_TIMEOUT] += 1
            self.aimd.on_timeout()
        elif cause == "connection":
            s[ch.API_CONN] += 1
        elif status is not None and 400 <= status < 500:
            s[ch.API_4XX] += 1
        elif status is not None and status >= 500:
            s[ch.API_5XX] += 1

    def _count(self, o: Outcome) -> None:
        field = {
            OutcomeKind.OK: ch.DONE_OK,
            OutcomeKind.DEAD: ch.FAILED,
            OutcomeKind.RETRY: ch.RETRIED,
            OutcomeKind.SNOOZE: ch.SNOOZED,
        }[o.kind]
        self.slot[field] += 1

    def flush(self) -> None:
        if not self.outbox or self.chan.closed:
            return
        batch, self.outbox = self.outbox, []
        try:
            self.chan.send((ch.DONE, batch))
        except ConnectionError:
            self.on_close(None)

    # ------------------------------------------------------------ heartbeat
    async def heartbeat(self) -> None:
        last_title = 0.0
        title: Callable[[], str] = lambda: (  # noqa: E731
            f"genworker: worker {self.number} inflight={self.running}/{self.aimd.limit} "
            f"done={int(self.slot[ch.DONE_OK])}"
            + (f" stopping={self.stop_reason}" if self.stop_reason else "")
        )
        while True:
            now = time.monotonic()
            s = self.slot
            s[ch.HEARTBEAT] = now
            s[ch.LIMIT] = self.aimd.limit
            s[ch.INFLIGHT] = self.running + len(self.waiting)
            if now - last_title >= TITLE_EVERY_S:
                last_title = now
                s[ch.RSS] = _rss_bytes()
                setproctitle(title())
            self._start_waiting()  # the limit may have grown
            await asyncio.sleep(HEARTBEAT_S)


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return float(int(fh.read().split()[1]) * _PAGE)
    except (OSError, ValueError, IndexError):
        return 0.0
