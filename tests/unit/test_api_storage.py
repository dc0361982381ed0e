"""A paid-for image is never paid for twice because storing it failed: the write is retried
alone, and what still cannot be stored is kept for the job's retry, which stores it
without calling the provider. The output directory is blocked by a file sitting where it
should be (the tests run as root, whom permissions would not stop)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from genworker.api import spool
from genworker.api.openai import ImageHandler, make_session
from genworker.config import Settings
from genworker.model import Job, TransientError
from genworker.sim.answers import tiny_png
from genworker.sim.server import SimConfig, sim_of, start_sim


def job(attempt: int) -> Job:
    return Job(77, attempt, 5, 0, "image", {"prompt": "a paid-for lighthouse"}, attempt)


@pytest.fixture(autouse=True)
def quick_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "FIRST_WAIT_S", 0.05)
    monkeypatch.setattr(spool, "MAX_WAIT_S", 0.2)


def run(scenario: Any) -> Any:
    async def main() -> Any:
        runner, port = await start_sim(SimConfig(latency_ms=1))
        try:
            return await scenario(f"http://127.0.0.1:{port}", sim_of(runner))
        finally:
            await runner.cleanup()

    return asyncio.run(main())


async def call(s: Settings, j: Job) -> dict[str, Any]:
    handler = ImageHandler(s)
    async with make_session(s) as session:
        return await handler(j, session)


def blocked_output(tmp_path: Path) -> tuple[Path, Settings]:
    out = tmp_path / "out"
    out.write_text("a file where the output directory should be")
    return out, Settings(output_dir=out, data_dir=tmp_path / "data")


def test_a_store_that_recovers_within_the_budget_costs_one_call(tmp_path: Path) -> None:
    out, base = blocked_output(tmp_path)

    async def scenario(url: str, sim: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        async def unblock() -> None:
            await asyncio.sleep(0.5)
            out.unlink()

        fixer = asyncio.create_task(unblock())
        s = replace(base, api_url=url)
        result = await call(s, job(1))
        await fixer
        return result, sim.stats()

    result, stats = run(scenario)
    assert stats["total"] == 1
    data = Path(result["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == result["sha256"]
    assert Path(result["path"]).parent == out


def test_a_store_still_failing_keeps_the_image_and_the_retry_makes_no_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool, "STORE_BUDGET_S", 0.3)
    out, base = blocked_output(tmp_path)
    kept_dir = tmp_path / "data" / "spool"

    async def scenario(url: str, sim: Any) -> tuple[TransientError, Any, dict[str, Any], int]:
        s = replace(base, api_url=url)
        with pytest.raises(TransientError) as caught:
            await call(s, job(1))
        kept = list(kept_dir.iterdir())
        assert len(kept) == 1
        assert kept[0].name.startswith("77-")
        assert os.stat(kept[0]).st_mode & 0o777 == 0o600
        out.unlink()  # the disk is back
        result = await call(s, job(2))
        return caught.value, result, sim.stats(), len(list(kept_dir.iterdir()))

    err, result, stats, left = run(scenario)
    assert Path(result["path"]).is_file()
    assert err.cause == "storage"
    assert "kept for the retry" in err.reason
    assert stats["total"] == 1  # the retry stored the kept bytes: no second generation
    assert left == 0


def test_a_job_released_back_to_attempt_one_still_finds_its_spooled_image(
    tmp_path: Path,
) -> None:
    """A release (shutdown, a worker's death) or `retry --status dead` lowers the attempt
    count: the kept bytes are found whatever it says, and no second call is made."""
    s = Settings(output_dir=tmp_path / "out", data_dir=tmp_path / "data")
    png = tiny_png(b"kept", 8)
    spool.Spool([tmp_path / "data" / "spool"]).put(77, png)

    async def scenario(url: str, sim: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        result = await call(replace(s, api_url=url), job(1))
        return result, sim.stats()

    result, stats = run(scenario)
    assert stats["total"] == 0
    assert result["sha256"] == hashlib.sha256(png).hexdigest()


def test_start_sweeps_spooled_images_kept_past_the_retention(tmp_path: Path) -> None:
    kept = spool.Spool([tmp_path / "a", tmp_path / "b"])
    old = kept.put(41, b"old image")
    new = kept.put(42, b"new image")
    assert old is not None
    assert new is not None
    week_ago = time.time() - 8 * 86400
    os.utime(old, (week_ago, week_ago))
    assert kept.sweep(7 * 86400) == 1
    assert not old.exists()
    assert kept.take(42) is not None
