"""PNG charts of the scheduling benchmark (matplotlib, Agg backend), from its JSON figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): the backend is chosen first

COLOURS = {"free": "tab:green", "start": "tab:blue", "pro": "tab:red"}


def scaling_chart(points: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Throughput and CPU per 1,000 jobs against the number of workers."""
    rows = sorted(points.values(), key=lambda p: p["workers"])
    workers = [p["workers"] for p in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(workers, [p["ideal_jobs_per_s"] for p in rows], "k--", label="ideal (slots / L)")
    left.plot(workers, [p["jobs_per_s"] for p in rows], "o-", label="measured")
    left.set(xscale="log", yscale="log", xlabel="workers (5 slots each)", ylabel="jobs/s")
    left.set_xticks(workers, [str(w) for w in workers])
    left.set_title("Throughput, API latency 50 ms")
    left.legend()
    right.plot(workers, [p["cpu_s_per_1000_jobs"] for p in rows], "o-", color="tab:purple")
    right.set(xscale="log", xlabel="workers (5 slots each)", ylabel="CPU s per 1,000 jobs")
    right.set_xticks(workers, [str(w) for w in workers])
    right.set_ylim(bottom=0)
    right.set_title("CPU of every process, PostgreSQL included")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def completion_cdf_chart(
    ours: Mapping[str, Sequence[float]],
    old: Mapping[str, Sequence[float]],
    latency_s: float,
    path: Path,
) -> None:
    """Task completion CDFs by plan, in units of L (log scale): genworker measured, solid;
    the old design's model on the same arrivals, dashed."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, series, style in (("genworker", ours, "-"), ("old design (model)", old, "--")):
        for plan, values in series.items():
            xs = sorted(v / latency_s for v in values)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, style, where="post", color=COLOURS[plan], label=f"{plan}, {label}")
    ax.set(xscale="log", xlabel="task completion (submit to last image), units of L", ylabel="CDF")
    ax.set_title("The morning: 10 Pro tasks at once, Free and Start arriving (L = 100 ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
