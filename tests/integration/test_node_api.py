"""A real node against the simulated API: the host-wide rate limit, a bad key pausing the
claims, the cache and merging that skip the API (with /metrics scraped meanwhile), and
start-up sweeping half-written files."""

from __future__ import annotations

import os
import signal
import socket
import time

import psycopg
import pytest
from genworker.queue.client import Client
from ops_support import http_address, scrape
from supervisor_harness import (
    Launcher,
    jobs,
    launch_fixture,  # noqa: F401  (the launch fixture)
    node_info,
    status_counts,
    wait_all_finished,
    wait_for,
)

KEY = "sk-test-SECRETKEY123456"


def test_api_rps_caps_the_requests_of_every_worker_together(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    # 8 workers x 5 slots at 20 ms could send ~2,000 requests a second
    sim = launch.sim(latency_ms=20)
    # url answers (no files to write); gpt-image-1 only answers b64_json, dall-e-3 a url
    by_url = ("--model", "dall-e-3", "--response-format", "url")
    node = launch.node(sim, "test-rps", "--api-rps", "50", *by_url, workers=8)
    node.wait_workers(8)
    client.submit_many([{"plan": "pro", "params": {"prompt": "rate"}, "n": 50} for _ in range(4)])
    wait_all_finished(conn, 200, timeout_s=60)
    stats = sim.stats()
    assert stats["total"] == 200
    burst = 5  # the bucket's default burst: a tenth of the rate
    # +1: a window that opens on one grant and closes on another holds rate + 1 of them
    assert stats["max_in_any_second"] <= 50 + burst + 1, stats["max_in_any_second"]
    assert stats["max_in_any_second"] >= 40  # the limit was reached, so it was what held


def test_a_bad_key_pauses_claiming_instead_of_burning_the_queue(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    sim = launch.sim("--api-key", "the-right-key", latency_ms=50)
    node = launch.node(sim, "test-badkey", env={"GENWORKER_API_KEY": KEY}, workers=2)
    node.wait_workers(2)
    client.submit_many([{"plan": "pro", "params": {"prompt": "keyed"}} for _ in range(3)])  # 210
    wait_for(
        lambda: "bad_api_key" in node_info(conn, "test-badkey").get("alarms", {}),
        "the bad-key alarm in the node info",
        30,
    )
    dead_then = status_counts(conn).get("dead", 0)
    time.sleep(3)  # claims are paused for a minute: nothing more may be spent meanwhile
    counts = status_counts(conn)
    assert counts.get("dead", 0) == dead_then
    # at most the slots' worth went dead before the pause: the queue is not burnt
    assert 1 <= counts.get("dead", 0) <= 2 * 5 + 1
    assert counts.get("queued", 0) >= 190
    for j in jobs(conn, "status = 'dead'"):
        assert "401" in j["error"] or "key" in j["error"].lower()
        assert KEY not in j["error"]
        assert "SECRETKEY" not in j["error"]
    assert KEY not in node.log()


@pytest.mark.parametrize("backend", ["postgres", "redis"])
def test_the_cache_and_merging_make_identical_requests_cost_one_call(
    backend: str, launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    if backend == "redis":
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", 6379)) != 0:
                pytest.skip("no Redis on 127.0.0.1:6379 (the machine's Redis serves this test)")
        cache = f"redis://127.0.0.1:6379/{os.getpid() % 15 + 1}"
    else:
        cache = "postgres"
    prompt = f"a lighthouse {backend} {os.getpid()} {time.time()}"  # fresh keys for Redis
    sim = launch.sim(latency_ms=100)
    node = launch.node(
        sim, f"test-cache-{backend}", "--cache", cache, "--http", "127.0.0.1:0", workers=2
    )
    node.wait_workers(2)
    first = client.submit_many([{"plan": "start", "params": {"prompt": prompt}}] * 2)
    wait_all_finished(conn, 60)
    assert sim.stats()["total"] == 30  # two identical tasks: one call per image
    again = client.submit("start", prompt)
    wait_all_finished(conn, 90)
    assert sim.stats()["total"] == 30  # the resubmit cost nothing
    for task in [*first, again]:
        info = client.get(task, jobs=True)
        assert info.status == "succeeded"
        assert {j.result["sha256"] for j in info.jobs} == {
            j.result["sha256"] for j in client.get(first[0], jobs=True).jobs
        }
    assert all(j.result.get("cached") for j in client.get(again, jobs=True).jobs)

    # twins claimed in one batch wait for their leader; scraping /metrics meanwhile (it
    # counts them) must not take them away from the node
    address = http_address(node)
    twins = client.submit_many([{"plan": "free", "params": {"prompt": prompt + "!"}}] * 20)
    deadline = time.monotonic() + 60
    while sum(status_counts(conn).get(s, 0) for s in ("succeeded", "dead")) < 130:
        assert time.monotonic() < deadline, status_counts(conn)
        scrape(address)
        time.sleep(0.01)
    assert sim.stats()["total"] == 32
    merged = [j for t in twins for j in client.get(t, jobs=True).jobs if j.result.get("merged")]
    assert merged, "no twin waited for its leader: the scrapes were not tested"


def test_start_sweeps_files_half_written_by_killed_workers(launch: Launcher) -> None:
    sim = launch.sim(latency_ms=10)
    out = launch.workdir / "out"
    out.mkdir(parents=True)
    dead_pid = os.fork()
    if dead_pid == 0:
        os._exit(0)
    os.waitpid(dead_pid, 0)
    stale = out / f".gw-tmp-{dead_pid}-0123456789ab"
    stale.write_bytes(b"half a png")
    live = out / f".gw-tmp-{os.getpid()}-0123456789ab"  # a live writer's file stays
    live.write_bytes(b"being written")
    node = launch.node(sim, "test-sweep", workers=1)
    node.wait_workers(1)
    assert not stale.exists()
    assert live.exists()
    live.unlink()
    node.signal(signal.SIGTERM)
    assert node.wait(30) == 0


def test_retry_after_is_honoured_no_request_comes_during_the_wait(
    launch: Launcher, client: Client, conn: psycopg.Connection
) -> None:
    # a fifth of the calls are refused with 429 and Retry-After: 1.5 s (a seeded fault),
    # while far more jobs wait than the 10 slots could run: the whole host must hold off
    sim = launch.sim("--fail-429", "0.2", "--fault-retry-after-ms", "1500", "--seed", "3",
                     latency_ms=20)  # fmt: skip
    node = launch.node(sim, "test-retry-after", workers=2)
    node.wait_workers(2)
    client.submit_many([{"plan": "start", "params": {"prompt": "a petrel"}}] * 2)  # 60 jobs
    wait_all_finished(conn, 60, timeout_s=120)
    assert status_counts(conn) == {"succeeded": 60}  # a snooze spends no attempt
    timeline = sim.stats()["timeline"]
    refused_at = [answered for _, answered, status in timeline if status == 429]
    assert refused_at
    race_s = 0.05  # a call granted just before the 429 reached its worker may still land
    for t in refused_at:
        early = [a for a, _, _ in timeline if t + race_s < a < t + 1.5 - race_s]
        assert not early, f"requests at {early} during the Retry-After of a 429 answered at {t}"
    assert all(j["attempts"] == 1 for j in jobs(conn))
