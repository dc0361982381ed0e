"""Outcomes: RETRY waits (backoff with full jitter, or the provider's Retry-After, capped)
and spends an attempt; SNOOZE waits without spending one; DEAD stops at once; the task's
status and counters follow its jobs."""

from __future__ import annotations

import random
from datetime import timedelta

import psycopg
import pytest
from genworker.model import Outcome, OutcomeKind
from genworker.queue.client import Client
from genworker.queue.store import backoff_s, retry_delay_s
from queue_support import job_row, make_due, sync_queue, task_row

BASE_S, MAX_S = 2.0, 60.0


def _now(conn: psycopg.Connection):  # type: ignore[no-untyped-def]
    return conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]


# ------------------------------------------------------------ the delay itself


def test_retry_backoff_is_full_jitter_under_a_doubling_cap() -> None:
    rng = random.Random(7)
    for attempt, cap in ((1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, MAX_S), (60, MAX_S)):
        samples = [backoff_s(attempt, BASE_S, MAX_S, rng) for _ in range(400)]
        assert all(0 <= s <= cap for s in samples)
        assert max(samples) > 0.8 * cap  # the whole range is used...
        assert min(samples) < 0.2 * cap  # ...down to almost nothing (full jitter)


def test_retry_after_is_honoured_and_capped() -> None:
    def delay(kind: OutcomeKind, after: float | None) -> float | None:
        return retry_delay_s(Outcome(1, 1, kind, retry_after_s=after), 1, BASE_S, MAX_S)

    assert delay(OutcomeKind.RETRY, 17.5) == 17.5
    assert delay(OutcomeKind.SNOOZE, 17.5) == 17.5
    assert delay(OutcomeKind.RETRY, 10_000) == MAX_S
    assert delay(OutcomeKind.RETRY, -3) == 0.0
    snooze = delay(OutcomeKind.SNOOZE, None)
    assert snooze is not None
    assert 0.5 * BASE_S <= snooze <= 1.5 * BASE_S
    assert delay(OutcomeKind.OK, None) is None
    assert delay(OutcomeKind.DEAD, 5) is None
    # a handler's wait that is not a finite number of seconds is ignored: backoff instead
    for bad in (float("nan"), float("inf"), "5", True):
        wait = delay(OutcomeKind.RETRY, bad)  # type: ignore[arg-type]
        assert wait is not None
        assert 0 <= wait <= BASE_S


# ------------------------------------------------------------ in the database


def test_retry_waits_until_run_after_then_runs_again(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = client.submit("free", "a wet otter", n=1)
    with sync_queue(dsn) as q:
        [job] = q.claim("node-a", 1, 30)
        failed = Outcome(job.job_id, job.token, OutcomeKind.RETRY, error="HTTP 503")
        delay = retry_delay_s(failed, job.attempt, base_s=30, max_s=MAX_S, rng=random.Random(3))
        assert delay is not None
        assert delay > 1
        before = _now(conn)
        assert q.complete([failed._replace(delay_s=delay)]).applied == {job.job_id: "scheduled"}
        after = _now(conn)
        row = job_row(conn, job.job_id)
        assert (
            before + timedelta(seconds=delay)
            <= row["run_after"]
            <= after + timedelta(seconds=delay)
        )
        assert (row["attempts"], row["error"], row["lease_expires"]) == (1, "HTTP 503", None)

        assert q.claim("node-a", 1, 30) == []  # not before run_after
        assert make_due(conn) == 1
        [again] = q.claim("node-a", 1, 30)
        assert (again.job_id, again.attempt) == (job.job_id, 2)
        assert q.complete([Outcome(again.job_id, again.token, OutcomeKind.OK, {"ok": 1})]).applied
    info = client.get(task)
    assert (info.status, info.succeeded, info.dead, info.error) == ("succeeded", 1, 0, None)


def test_a_provider_retry_after_sets_run_after(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    client.submit("free", "a slow loris", n=1)
    with sync_queue(dsn) as q:
        [job] = q.claim("node-a", 1, 30)
        delay = retry_delay_s(
            Outcome(job.job_id, job.token, OutcomeKind.RETRY, retry_after_s=3600),
            job.attempt,
            BASE_S,
            MAX_S,
        )
        assert delay == MAX_S  # the provider's hour is capped
        before = _now(conn)
        q.complete([Outcome(job.job_id, job.token, OutcomeKind.RETRY, delay_s=delay)])
        after = _now(conn)
    run_after = job_row(conn, job.job_id)["run_after"]
    assert before + timedelta(seconds=MAX_S) <= run_after <= after + timedelta(seconds=MAX_S)


def test_retries_past_max_attempts_go_dead(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    conn.execute("UPDATE genworker.settings SET value = '2' WHERE key = 'max_attempts'")
    task = client.submit("free", "a stubborn mule", n=1)
    with sync_queue(dsn) as q:
        [job] = q.claim("node-a", 1, 30)
        assert q.complete(
            [Outcome(job.job_id, job.token, OutcomeKind.RETRY, error="HTTP 500", delay_s=0)]
        ).applied == {job.job_id: "scheduled"}
        [job] = q.claim("node-a", 1, 30)  # delay 0: due at once
        assert job.attempt == 2
        assert q.complete(
            [Outcome(job.job_id, job.token, OutcomeKind.RETRY, error="HTTP 500", delay_s=0)]
        ).applied == {job.job_id: "dead"}
        assert q.claim("node-a", 1, 30) == []
    row = job_row(conn, job.job_id)
    assert row["status"] == "dead"
    assert row["error"] == "attempts spent (2): HTTP 500"
    t = task_row(conn, task)
    assert (t["status"], t["n_dead"], t["error"]) == ("failed", 1, "attempts spent (2): HTTP 500")
    assert t["finished_at"] is not None


def test_snooze_spends_no_attempt_and_goes_dead_past_snooze_max(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = client.submit("free", "a busy bee", n=1)
    with sync_queue(dsn, snooze_max_s=100) as q:
        for snoozed in (60.0, 90.0):  # total snoozed so far, within 100 s
            [job] = q.claim("node-a", 1, 30)
            assert job.attempt == 1  # never spent
            done = q.complete(
                [
                    Outcome(
                        job.job_id,
                        job.token,
                        OutcomeKind.SNOOZE,
                        error="429",
                        delay_s=60.0 if snoozed == 60.0 else 30.0,
                    )
                ]
            )
            assert done.applied == {job.job_id: "scheduled"}
            row = job_row(conn, job.job_id)
            assert (row["attempts"], row["snoozed_s"]) == (0, snoozed)
            assert q.claim("node-a", 1, 30) == []
            make_due(conn)
        [job] = q.claim("node-a", 1, 30)
        assert q.complete(
            [Outcome(job.job_id, job.token, OutcomeKind.SNOOZE, error="429", delay_s=30.0)]
        ).applied == {job.job_id: "dead"}
    row = job_row(conn, job.job_id)
    assert row["error"] == "rate limited for too long: 429"
    assert task_row(conn, task)["status"] == "failed"


def test_dead_stops_at_once_and_fails_the_task_when_all_jobs_are_done(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    task = client.submit("free", "a banned word")  # two jobs
    with sync_queue(dsn) as q:
        a, b = q.claim("node-a", 2, 30)
        assert q.complete(
            [Outcome(a.job_id, a.token, OutcomeKind.DEAD, error="HTTP 400: content policy")]
        ).applied == {a.job_id: "dead"}
        t = task_row(conn, task)
        assert (t["status"], t["n_dead"], t["finished_at"]) == ("running", 1, None)
        assert q.complete([Outcome(b.job_id, b.token, OutcomeKind.OK, {"url": "x"})]).applied
    t = task_row(conn, task)
    assert (t["status"], t["n_succeeded"], t["n_dead"]) == ("failed", 1, 1)
    assert t["error"] == "HTTP 400: content policy"
    assert t["finished_at"] is not None
    assert job_row(conn, a.job_id)["attempts"] == 1


@pytest.mark.parametrize("delays", [[5, 2.5], [None, 3]])
def test_one_batch_may_mix_outcomes_and_delay_types(
    dsn: str, conn: psycopg.Connection, client: Client, delays: list[float | None]
) -> None:
    client.submit("start", "a mixed flock", n=4)
    with sync_queue(dsn) as q:
        a, b, c, d = q.claim("node-a", 4, 30)
        done = q.complete(
            [
                Outcome(a.job_id, a.token, OutcomeKind.OK, {"i": 0}),
                Outcome(b.job_id, b.token, OutcomeKind.RETRY, error="e", delay_s=delays[0]),
                Outcome(c.job_id, c.token, OutcomeKind.SNOOZE, error="e", delay_s=delays[1]),
                Outcome(d.job_id, d.token, OutcomeKind.DEAD, error="bad"),
            ]
        )
    assert done.applied == {
        a.job_id: "succeeded",
        b.job_id: "scheduled",
        c.job_id: "scheduled",
        d.job_id: "dead",
    }


def test_task_status_follows_its_jobs(dsn: str, conn: psycopg.Connection, client: Client) -> None:
    task = client.submit("start", "a row of ducks", n=3)
    assert task_row(conn, task)["status"] == "queued"
    with sync_queue(dsn) as q:
        jobs = q.claim("node-a", 3, 30)
        t = task_row(conn, task)
        assert (t["status"], t["started_at"] is not None) == ("running", True)
        for i, j in enumerate(jobs):
            q.complete([Outcome(j.job_id, j.token, OutcomeKind.OK, {"i": i})])
            t = task_row(conn, task)
            assert t["n_succeeded"] == i + 1
            assert t["status"] == ("succeeded" if i == 2 else "running")
    info = client.get(task, jobs=True)
    assert info.done
    assert info.remaining == 0
    assert [j.result for j in info.jobs] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_results_and_errors_arrive_exactly_as_sent(
    dsn: str, conn: psycopg.Connection, client: Client
) -> None:
    client.submit("free", "a careful scribe")
    result = {"path": "/tmp/ü/ø.png", "sizes": [1, 2.5, None], "quote": 'say "hi"\n'}
    error = 'HTTP 500: {"error": "über\\nbroken"}'
    with sync_queue(dsn) as q:
        a, b = q.claim("node-a", 2, 30)
        q.complete(
            [
                Outcome(a.job_id, a.token, OutcomeKind.OK, result),
                Outcome(b.job_id, b.token, OutcomeKind.DEAD, None, error),
            ]
        )
    assert (job_row(conn, a.job_id)["result"], job_row(conn, a.job_id)["error"]) == (result, None)
    assert (job_row(conn, b.job_id)["result"], job_row(conn, b.job_id)["error"]) == (None, error)
