"""The old design's model: one worker holds a whole task, 8 workers x 5 calls, FIFO."""

from __future__ import annotations

import pytest
from genworker.demo.baseline import Latency, replay_old_design
from genworker.demo.scenario import Morning

EXACT = Latency(mean_s=1.0)  # no jitter, no failures: the arithmetic is exact


def test_a_task_alone_takes_one_latency_per_round_of_five_calls() -> None:
    replay = replay_old_design([(0.0, 2), (0.0, 30), (0.0, 70)], EXACT)
    free, start, pro = replay.tasks
    assert (free.wait_s, free.completion_s) == (0.0, 1.0)
    assert start.completion_s == 6.0  # 30 images, 5 at a time
    assert pro.completion_s == 14.0  # 70 images, 5 at a time


def test_the_old_reports_pro_time_comes_back_at_its_latency() -> None:
    # the old report: a Pro task took 121 s, i.e. 14 rounds of about 8.6 s
    replay = replay_old_design([(0.0, 70)], Latency(mean_s=121 / 14))
    assert replay.tasks[0].completion_s == pytest.approx(121.0)


def test_ten_pro_tasks_at_once_leave_two_waiting_a_whole_task() -> None:
    replay = replay_old_design([(0.0, 70)] * 10, EXACT)
    waits = sorted(t.wait_s for t in replay.tasks)
    assert waits == [0.0] * 8 + [14.0, 14.0]
    assert replay.makespan_s == 28.0


def test_a_free_task_queues_behind_the_pro_tasks_fifo() -> None:
    replay = replay_old_design([(0.0, 70)] * 10 + [(1.0, 2)], EXACT)
    free = replay.tasks[-1]
    assert free.started_s == 14.0  # the first worker to free up, after the 2 queued Pro tasks
    assert free.wait_s == 13.0
    assert free.completion_s == 14.0


def test_a_free_task_uses_two_of_its_workers_five_slots() -> None:
    replay = replay_old_design([(0.0, 2)], EXACT)
    assert replay.busy_slot_s == 2.0
    assert replay.slots == 40
    assert replay.busy_slot_s / (replay.slots * replay.makespan_s) == 0.05


def test_results_keep_the_order_given_even_when_arrivals_are_not_sorted() -> None:
    replay = replay_old_design([(5.0, 2), (0.0, 70)], EXACT)
    assert [t.images for t in replay.tasks] == [2, 70]
    assert replay.tasks[0].arrival_s == 5.0


def test_failures_are_retried_in_place_and_counted() -> None:
    flaky = Latency(mean_s=1.0, fail_rate=0.2, seed=7)
    first = replay_old_design([(0.0, 70)] * 3, flaky)
    again = replay_old_design([(0.0, 70)] * 3, flaky)
    assert first == again  # seeded: the same replay every time
    retries = sum(t.retries for t in first.tasks)
    assert retries > 0
    assert first.busy_slot_s == pytest.approx(3 * 70 + retries)
    assert all(t.completion_s >= 14.0 for t in first.tasks)


def test_jitter_stays_within_its_bounds() -> None:
    replay = replay_old_design([(0.0, 1)] * 50, Latency(mean_s=1.0, jitter_s=0.25, seed=3))
    assert all(0.75 <= t.finished_s - t.started_s <= 1.25 for t in replay.tasks)


def test_the_morning_is_seeded_and_sorted() -> None:
    morning = Morning(pro=10, free=20, start=6, window_s=30, seed=1)
    arrivals = morning.arrivals()
    assert arrivals == morning.arrivals()
    assert [a.plan for a in arrivals[:10]] == ["pro"] * 10
    assert all(a.at_s == 0.0 for a in arrivals[:10])
    assert [a.at_s for a in arrivals] == sorted(a.at_s for a in arrivals)
    assert all(0 <= a.at_s <= 30 for a in arrivals)
    assert len({a.tenant for a in arrivals}) == 36
    assert Morning(seed=2).arrivals() != arrivals


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        replay_old_design([(0.0, 2)], EXACT, workers=0)
