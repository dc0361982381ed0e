"""Result files: content-addressed, atomic, and no temp file outlives a cancellation or a kill."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
from genworker.api import results
from genworker.api.results import store_image, sweep_temp_files, write_atomic
from genworker.sim.server import tiny_png


def temps(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.name.startswith(".gw-tmp")] if d.exists() else []


def test_a_stored_image_is_named_by_its_sha256(tmp_path: Path) -> None:
    png = tiny_png(b"one")
    result = asyncio.run(store_image(tmp_path / "out", png, "image/png"))
    digest = hashlib.sha256(png).hexdigest()
    assert result == {
        "path": str(tmp_path / "out" / f"{digest}.png"),
        "bytes": len(png),
        "sha256": digest,
        "mime": "image/png",
    }
    assert Path(result["path"]).read_bytes() == png
    assert temps(tmp_path / "out") == []
    again = asyncio.run(store_image(tmp_path / "out", png, "image/png"))
    assert again == result


def _wait_for_temp(d: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not temps(d):
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.001)


def test_a_cancellation_mid_write_leaves_no_temp_file(tmp_path: Path) -> None:
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(16 * 1024 * 1024)

    async def main() -> None:
        writer = asyncio.create_task(store_image(tmp_path, data, "image/png", chunk_bytes=1024))
        deadline = time.monotonic() + 10
        while not temps(tmp_path):
            assert time.monotonic() < deadline, "the writer never started"
            await asyncio.sleep(0.001)
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer

    asyncio.run(main())
    assert temps(tmp_path) == []
    final = tmp_path / f"{hashlib.sha256(data).hexdigest()}.png"
    assert not final.exists() or final.read_bytes() == data  # never half a file


def test_a_write_error_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = 0

    def failing_write(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(results.os, "write", failing_write)
    with pytest.raises(OSError, match="No space"):
        write_atomic(tmp_path, b"x" * 10_000, "image/png", chunk_bytes=1000)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def _slow_writer(d: str) -> None:
    write_atomic(
        Path(d), b"\x89PNG\r\n\x1a\n" + b"\0" * (64 * 1024 * 1024), "image/png", chunk_bytes=64
    )


def test_temp_files_of_a_killed_writer_are_swept(tmp_path: Path) -> None:
    child = mp.get_context("fork").Process(target=_slow_writer, args=(str(tmp_path),))
    child.start()
    try:
        _wait_for_temp(tmp_path)
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
    assert len(temps(tmp_path)) == 1  # a SIGKILL is the one way to leave one ...
    live = tmp_path / f".gw-tmp-{os.getpid()}-abc123"
    live.write_bytes(b"in progress")
    assert sweep_temp_files(tmp_path) == 1  # ... and the sweep removes it, sparing live writers
    assert temps(tmp_path) == [live]
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".png"]
    assert sweep_temp_files(tmp_path / "missing") == 0


def test_images_are_private_to_the_owner_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask: 0644 files, readable by every local user
    try:
        out = tmp_path / "results" / "deep"
        result = write_atomic(out, tiny_png(b"private"), "image/png")
    finally:
        os.umask(old)
    assert os.stat(result["path"]).st_mode & 0o777 == 0o600
    assert out.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "results").stat().st_mode & 0o777 == 0o700


def test_an_existing_output_dir_keeps_the_operators_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o750)
    results.make_private_dir(tmp_path)
    assert tmp_path.stat().st_mode & 0o777 == 0o750


def test_a_file_where_the_output_dir_should_be_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(NotADirectoryError):
        results.make_private_dir(tmp_path / "out")


def test_the_node_creates_the_output_dir_private(tmp_path: Path) -> None:
    from genworker.config import Settings
    from genworker.node.boot import check_settings

    old = os.umask(0o022)
    try:
        check_settings(
            Settings(output_dir=tmp_path / "images", http="", api_url="http://127.0.0.1:9")
        )
    finally:
        os.umask(old)
    assert (tmp_path / "images").stat().st_mode & 0o777 == 0o700
