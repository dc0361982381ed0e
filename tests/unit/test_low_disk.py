"""The low_disk alarm: --output-dir with less free space than --min-free-disk is a raised
alarm with the figure, shown where every alarm shows (/readyz reasons, status)."""

from __future__ import annotations

import shutil
from pathlib import Path

from genworker.config import Settings
from genworker.ops.service import Ops


def test_an_output_dir_short_of_free_space_raises_low_disk_and_clears_when_room_is_back(
    tmp_path: Path,
) -> None:
    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    ops = Ops(Settings(output_dir=tmp_path, min_free_disk_mb=int(free_mb) + 10_000))
    ops.check_disk(0.0)
    reason = ops.active_alarms()["low_disk"]
    assert f"MB free in {tmp_path}, under --min-free-disk" in reason, reason

    ops.settings = ops.settings.with_(min_free_disk_mb=max(1, int(free_mb / 2)))
    ops.check_disk(1.0)
    assert "low_disk" not in ops.active_alarms()


def test_zero_turns_the_check_off(tmp_path: Path) -> None:
    ops = Ops(Settings(output_dir=tmp_path, min_free_disk_mb=0))
    ops.check_disk(0.0)
    assert ops.active_alarms() == {}
