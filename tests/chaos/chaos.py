"""The chaos run's driver: one node with 8 workers drains a mix of plans while, at moments
drawn from a seed, its workers are SIGKILLed (about every 0.5 s), its supervisor is
SIGKILLed once and started again as systemd would (same configuration: a new node id,
since GENWORKER_NODE_ID is unset by default), its private PostgreSQL crashes once
(`pg_ctl stop -m immediate`) and comes back, and the simulated API fails on purpose.

Everything it starts is stopped by pid at the end (the harness's Launcher), and every
wait is bounded by the run's deadline. It records what it did in `audit.Faults`
for the audit to explain, and when the work resumed after each blow.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass

import psycopg
from audit import Faults
from genworker.queue.client import Client
from supervisor_harness import Launcher, Node, PrivatePostgres, Sim

PLANS = (("free", 2, 5), ("start", 30, 3), ("pro", 70, 2))  # name, images, weight among tasks
WORKERS = 8
LEASE_S = 8.0  # longer than the database outage: buffered outcomes must still be ours after it
SIM_FAULTS = (  # the mix: 5 % 429 with Retry-After, 5 % 500, 2 % timeouts, 1 % garbage
    *("--fail-429", "0.05", "--fault-retry-after-ms", "100"),
    *("--fail-500", "0.05", "--fail-timeout", "0.02", "--fail-malformed", "0.01"),
    *("--hang-s", "30"),
)
NODE_ARGS = (
    *("--retry-base", "0.2", "--retry-max", "2"),  # retries come back in seconds, not minutes
    *("--request-timeout", "2"),  # an injected timeout costs its slot 2 s
    *("--graceful-timeout", "10"),
)
POLL_S = 0.1


def deadline_for(jobs: int) -> float:
    """How long a run may take: the injected 429s (5 % of calls, whatever the rate) hold
    the host's learned API rate down to some 10-20 calls/s on two cores, so budget 5 jobs
    a second, plus the boots and the blows."""
    return 150.0 + jobs / 5.0


@dataclass(frozen=True)
class Moments:
    """When the blows land, drawn from the seed: shares of the jobs finished, and seconds."""

    supervisor_kill_at: float
    db_restart_at: float
    db_down_s: float
    kill_gap_s: tuple[float, float] = (0.3, 0.7)  # between two worker kills

    @classmethod
    def draw(cls, rng: random.Random) -> Moments:
        return cls(
            supervisor_kill_at=rng.uniform(0.2, 0.4),
            db_restart_at=rng.uniform(0.55, 0.75),
            db_down_s=rng.uniform(1.5, 3.0),
        )


class Progress:
    """The run as the database sees it; None while the database is away."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.Connection | None = None

    def read(self) -> tuple[int, int, int, int] | None:
        """(finished, succeeded, waiting to run, claims made) or None when unreachable."""
        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
            row = self.conn.execute(
                "SELECT count(*) FILTER (WHERE status IN ('succeeded', 'dead', 'cancelled')),"
                " count(*) FILTER (WHERE status = 'succeeded'),"
                " count(*) FILTER (WHERE status IN ('queued', 'scheduled')),"
                " coalesce(sum(token), 0) FROM genworker.jobs"
            ).fetchone()
        except psycopg.OperationalError:
            self.close()
            return None
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def held_by(self, node: str) -> set[int]:
        assert self.conn is not None
        rows = self.conn.execute(
            "SELECT id FROM genworker.jobs WHERE status = 'running' AND lease_owner = %s", (node,)
        ).fetchall()
        return {r[0] for r in rows}

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
        self.conn = None


class ChaosRun:
    def __init__(
        self, pg: PrivatePostgres, launcher: Launcher, dsn: str, jobs: int, seed: int
    ) -> None:
        self.pg = pg
        self.launch = launcher
        self.dsn = dsn
        self.total = jobs
        self.rng = random.Random(seed)
        self.seed = seed
        self.moments = Moments.draw(self.rng)
        self.waves = self._tasks()
        self.submitted = 0
        self.faults = Faults()
        self.progress = Progress(dsn)
        self.node: Node | None = None
        self.generation = 0
        self.sim: Sim | None = None
        self.log: list[str] = []

    # -------------------------------------------------------------- the work
    def _tasks(self) -> list[list[dict[str, object]]]:
        """Tasks of a mix of plans adding up to `total` jobs, in waves: half at once, then
        tenths whenever the backlog runs low (submits land on a busy node, NOTIFY and all)."""
        names = [p[0] for p in PLANS]
        weights = [p[2] for p in PLANS]
        images = {p[0]: p[1] for p in PLANS}
        tasks: list[dict[str, object]] = []
        left = self.total
        while left > 0:
            plan = self.rng.choices(names, weights)[0]
            n = min(images[plan], left)
            tasks.append({"plan": plan, "prompt": f"chaos {len(tasks)}", "n": n})
            left -= n
        waves: list[list[dict[str, object]]] = [[]]
        target = self.total // 2
        for t in tasks:
            waves[-1].append(t)
            if sum(int(str(x["n"])) for x in waves[-1]) >= target:
                waves.append([])
                target = max(1, self.total // 10)
        return [w for w in waves if w]

    def _submit_wave(self) -> None:
        wave = self.waves.pop(0)
        with Client(self.dsn) as client:
            client.submit_many(wave)
        self.submitted += sum(int(str(t["n"])) for t in wave)

    # ------------------------------------------------------------ processes
    def _start_node(self) -> Node:
        assert self.sim is not None
        self.generation += 1
        node = self.launch.node(
            self.sim,
            f"chaos-{self.seed}-{self.generation}",
            *NODE_ARGS,
            workers=WORKERS,
            lease_s=LEASE_S,
            dsn=self.dsn,
        )
        node.wait_workers(WORKERS, timeout_s=60)
        return node

    def _kill_a_worker(self) -> None:
        assert self.node is not None
        workers = self.node.workers()
        if not workers:
            return
        pid = workers[self.rng.choice(sorted(workers))]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            self.faults.worker_kills += 1

    def _kill_the_supervisor(self, finished: int) -> None:
        """SIGKILL the supervisor alone (its workers follow it by PDEATHSIG), then start it
        again as systemd would; time until its jobs are back and work resumes."""
        assert self.node is not None
        old = self.node
        old.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        old.wait(10)
        self.faults.supervisor_kills += 1
        held = self.progress.held_by(old.node_id)
        self.faults.held_at_node_kills |= held
        self.log.append(f"supervisor killed at {finished} finished, holding {len(held)} jobs")
        self.node = self._start_node()
        self.faults.supervisor_restarts += 1
        resumed = False
        while True:
            now = self.progress.read()
            if now is not None and not resumed and now[1] > finished:
                resumed = True
                self.faults.recovery_s["supervisor kill: work resumed"] = (
                    time.monotonic() - killed_at
                )
            if now is not None and not self.progress.held_by(old.node_id):
                self.faults.recovery_s["supervisor kill: its jobs released"] = (
                    time.monotonic() - killed_at
                )
                break
            self._check_deadline()
            self._tick_kills()
            time.sleep(POLL_S)

    def _restart_the_database(self, finished: int) -> None:
        """Crash PostgreSQL (immediate stop: no checkpoint, recovery on start), keep it down
        for a moment, start it again; time until outcomes are written and claims resume."""
        self.progress.close()
        self.pg.stop("immediate")
        down_until = time.monotonic() + self.moments.db_down_s
        while time.monotonic() < down_until:
            self._tick_kills()
            time.sleep(POLL_S)
        self.pg.start()
        self.faults.db_restarts += 1
        back_at = time.monotonic()
        self.log.append(f"database down {self.moments.db_down_s:.1f}s at {finished} finished")
        first = None
        while first is None:
            first = self.progress.read()
            self._check_deadline()
        written = claimed = False
        while not (written and claimed):
            now = self.progress.read()
            if now is not None:
                if not written and now[1] > first[1]:
                    written = True
                    self.faults.recovery_s["database restart: outcomes written"] = (
                        time.monotonic() - back_at
                    )
                if not claimed and now[3] > first[3]:
                    claimed = True
                    self.faults.recovery_s["database restart: claims resumed"] = (
                        time.monotonic() - back_at
                    )
            self._check_deadline()
            self._tick_kills()
            time.sleep(POLL_S)

    # ------------------------------------------------------------------ run
    def _tick_kills(self) -> None:
        if time.monotonic() >= self.next_kill:
            self._kill_a_worker()
            self.next_kill = time.monotonic() + self.rng.uniform(*self.moments.kill_gap_s)

    def _check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"chaos run past its deadline; {'; '.join(self.log)}")

    def run(self, deadline_s: float) -> Faults:
        """Drain every job under fire; returns what was done to the system."""
        self.deadline = time.monotonic() + deadline_s
        self.sim = self.launch.sim(
            *SIM_FAULTS, "--seed", str(self.seed), latency_ms=50, jitter_ms=20
        )
        self._submit_wave()
        self.node = self._start_node()
        self.next_kill = time.monotonic() + self.rng.uniform(*self.moments.kill_gap_s)
        supervisor_killed = db_restarted = False
        while True:
            self._check_deadline()
            self.node.check_running()
            now = self.progress.read()
            if now is None:
                time.sleep(POLL_S)
                continue
            finished, _, waiting, _ = now
            if self.waves and waiting < max(1, self.total // 10):
                self._submit_wave()
            if finished >= self.total and not self.waves:
                break
            share = finished / self.total
            if not supervisor_killed and share >= self.moments.supervisor_kill_at:
                supervisor_killed = True
                self._kill_the_supervisor(finished)
            elif not db_restarted and share >= self.moments.db_restart_at:
                db_restarted = True
                self._restart_the_database(finished)
            self._tick_kills()
            time.sleep(POLL_S)
        self.progress.close()
        assert supervisor_killed, self.log
        assert db_restarted, self.log
        return self.faults

    def finish(self) -> int:
        """Stop the node the way systemd does (TERM, drain); returns its exit code."""
        assert self.node is not None
        self.node.signal(signal.SIGTERM)
        return self.node.wait(60)
