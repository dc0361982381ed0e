"""Storing image bytes: content-addressed files, written atomically.

A file appears under its final name only complete: it is written to a temp
name in the same directory, fsynced, then renamed (`os.replace`), and the
directory is fsynced so the rename survives a power cut. Any exception,
including a cancellation, removes the temp file. Only a SIGKILL mid-write can
leave one behind; `sweep_temp_files` removes those of dead processes (the
supervisor calls it at start).

Images are tenants' data: files are created 0600 and the directories we create
0700, whatever the umask (a 0644 file under a 0755 directory is readable by
every local user). A directory the operator made already keeps its mode.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import secrets
import threading
from pathlib import Path
from typing import Any

from genworker.procs import pid_alive

log = logging.getLogger("genworker.results")

MAX_FILE_BYTES = 32 * 1024 * 1024  # one image; also the cap on an API answer's body
CHUNK_BYTES = 1024 * 1024

_TEMP = re.compile(r"^\.gw-tmp-(\d+)-[0-9a-f]+$")
_EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif"}


class _Stopped(Exception):
    """The writer was asked to stop (its caller was cancelled)."""


def sniff_mime(data: bytes) -> str | None:
    """The image type from its magic bytes; None when it is not a known image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


FILE_MODE = 0o600
DIR_MODE = 0o700


def make_private_dir(path: Path) -> None:
    """Create `path` and any missing parents 0700; existing directories keep their mode."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # made meanwhile by another worker
        os.chmod(d, DIR_MODE)  # mkdir's mode passes through the umask; ours must not
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    out_dir: Path,
    data: bytes,
    mime: str,
    *,
    stop: threading.Event | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, Any]:
    """Write `data` as <sha256><ext> in `out_dir` (blocking); returns the result dict."""
    digest = hashlib.sha256(data).hexdigest()
    final = out_dir / f"{digest}{_EXT.get(mime, '.bin')}"
    result = {"path": str(final), "bytes": len(data), "sha256": digest, "mime": mime}
    make_private_dir(out_dir)
    if final.is_file() and final.stat().st_size == len(data):
        return result  # same name, same content: already stored by an earlier attempt
    write_file(final, data, stop=stop, chunk_bytes=chunk_bytes)
    return result


def write_file(
    final: Path,
    data: bytes,
    *,
    stop: threading.Event | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> None:
    """Write `data` to `final` (0600) through a temp name in its directory, fsync, rename,
    fsync the directory: the file appears whole or not at all (blocking)."""
    tmp = final.parent / f".gw-tmp-{os.getpid()}-{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        try:
            view = memoryview(data)
            for start in range(0, len(data), chunk_bytes):
                if stop is not None and stop.is_set():
                    raise _Stopped
                chunk = view[start : start + chunk_bytes]
                while chunk:
                    chunk = chunk[os.write(fd, chunk) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


async def store_image(
    out_dir: Path, data: bytes, mime: str, *, chunk_bytes: int = CHUNK_BYTES
) -> dict[str, Any]:
    """Write the image off the loop; a cancellation stops the writer and removes its temp file.

    The write runs in a thread (fsync can take tens of ms). On cancellation we
    tell the thread to stop and wait for it, so no temp file outlives this
    call; if the thread had already renamed, a complete file stays (harmless:
    its name is its content, and the retry will find it).
    """
    stop = threading.Event()
    writer = asyncio.ensure_future(
        asyncio.to_thread(write_atomic, out_dir, data, mime, stop=stop, chunk_bytes=chunk_bytes)
    )
    try:
        return await asyncio.shield(writer)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([writer])
        if not writer.cancelled():
            writer.exception()  # retrieved (so never logged): the _Stopped we asked for
        raise


def sweep_temp_files(out_dir: Path) -> int:
    """Remove temp files left by processes that died mid-write; returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(out_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m and not pid_alive(int(m[1])):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def remove_results(out_dir: Path, paths: list[str]) -> int:
    """Delete the files of pruned tasks that lie in `out_dir` (this host's); returns how
    many. A path elsewhere (another host's directory, or one a row was made to name) is
    left alone: only a file directly in our output directory is ours to delete."""
    try:
        home = out_dir.resolve()
    except OSError:
        return 0
    removed = 0
    for path in paths:
        p = Path(path)
        if p.parent.resolve() != home or p.is_symlink():
            continue
        try:
            p.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as e:  # one file we cannot delete must not stop the others (nor the node)
            log.warning("cannot delete pruned result %s: %s", p, e.strerror)
    return removed
