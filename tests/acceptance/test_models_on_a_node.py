"""A node with default settings against the simulated provider, which refuses what the real
one refuses (strict by default): tasks for each documented model, with that model's own
options, all end with images, and the simulator refused no request."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from cli_support import env_for, node, run_json, until

TASKS = [
    {"model": "gpt-image-1", "quality": "high", "background": "transparent", "size": "1536x1024"},
    {"model": "dall-e-3", "quality": "hd", "style": "natural", "size": "1792x1024"},
    {"model": "dall-e-2", "size": "512x512"},
]


def finished(task: dict[str, object]) -> bool:
    return task["status"] in ("succeeded", "failed", "cancelled")


def sim_url(log: str) -> str:
    line = next(w for w in log.split() if w.startswith("http://127.0.0.1:"))
    return line.rstrip(":")


def test_each_models_tasks_end_with_images_and_nothing_is_refused(dsn: str, tmp_path: Path) -> None:
    env = env_for(dsn)
    with node(env, tmp_path, workers=1) as n:
        ids = []
        for params in TASKS:
            doc = {"prompt": f"a lighthouse by {params['model']}", **params}
            sub = run_json(["submit", "--plan", "free", "--params", json.dumps(doc)], env)
            ids.append(sub["id"])
        for task in ids:
            until(lambda t=task: finished(run_json(["show", str(t)], env)), 90, f"task {task}")
        shown = [run_json(["show", str(t)], env) for t in ids]
        stats_url = sim_url(until(lambda: "simulated image API at" in n.output() and n.output()))
        with urllib.request.urlopen(f"{stats_url}/stats", timeout=10) as r:
            stats = json.load(r)
    for task in shown:
        assert task["status"] == "succeeded", task
        for job in task["jobs"]:
            assert job["attempts"] == 1, job
            assert Path(job["result"]["path"]).is_file()
    assert stats.get("refused", {}) == {}
    gpt = shown[0]
    assert gpt["input_tokens"] > 0
    assert gpt["output_tokens"] > 0  # gpt-image-1 reports usage; the dall-e models do not
    assert shown[1]["output_tokens"] == shown[2]["output_tokens"] == 0
