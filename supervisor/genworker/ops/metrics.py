"""genworker's metrics: the catalogue of what a node exports at /metrics.

The exposition format itself (families, series, the registry) is in prometheus.py;
its names are re-exported here for the callers that import them from this module.
"""

from __future__ import annotations

from genworker.channels import LATENCY_BUCKETS_S
from genworker.ops.prometheus import (
    CONTENT_TYPE,
    Counter,
    CounterValue,
    Gauge,
    GaugeValue,
    Histogram,
    HistogramValue,
    LabelValues,
    Number,
    Registry,
    bucket_index,
    escape_help,
    escape_label_value,
    format_value,
)

__all__ = [
    "API_CALL_BUCKETS_S",
    "CONTENT_TYPE",
    "DB_WAIT_BUCKETS_S",
    "TASK_BUCKETS_S",
    "Counter",
    "CounterValue",
    "Gauge",
    "GaugeValue",
    "GenworkerMetrics",
    "Histogram",
    "HistogramValue",
    "LabelValues",
    "Number",
    "Registry",
    "bucket_index",
    "escape_help",
    "escape_label_value",
    "format_value",
]

# The workers count API latencies into these buckets in shared memory (channels.py):
# image calls take seconds to minutes, the simulated API answers in milliseconds.
API_CALL_BUCKETS_S = LATENCY_BUCKETS_S
# From a Free task (one API latency) to the old system's worst case (4.6 hours).
TASK_BUCKETS_S = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800)
DB_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class GenworkerMetrics:
    """Every metric genworker exports, on one registry. The supervisor sets them from
    the shared-memory counters, its own bookkeeping and periodic database queries."""

    def __init__(self, registry: Registry | None = None) -> None:
        r = self.registry = registry if registry is not None else Registry()
        # registered in this order, which is the order /metrics shows them in
        self._add_queue(r)
        self._add_node_work(r)
        self._add_api(r)
        self._add_machinery(r)

    def _add_queue(self, r: Registry) -> None:
        """The queue, as the database sees it (cluster-wide)."""
        self.queue_jobs = r.gauge(
            "genworker_queue_jobs", "Jobs in the queue by plan and state.", ("plan", "state")
        )
        self.oldest_runnable_age = r.gauge(
            "genworker_queue_oldest_runnable_age_seconds",
            "Age of the oldest job that is runnable now.",
        )
        self.queue_tasks = r.gauge(
            "genworker_queue_tasks",
            "Unfinished tasks by state: queued (no image started yet; the queue_depth alarm) "
            "or running.",
            ("state",),
        )
        self.nodes = r.gauge("genworker_nodes", "Supervisors alive in the nodes table.")

    def _add_node_work(self, r: Registry) -> None:
        """This node's work."""
        self.jobs_claimed = r.counter("genworker_jobs_claimed_total", "Jobs claimed by this node.")
        self.jobs_succeeded = r.counter(
            "genworker_jobs_succeeded_total", "Jobs this node finished with a result."
        )
        self.jobs_retried = r.counter(
            "genworker_jobs_retried_total", "Jobs this node scheduled for another attempt."
        )
        self.jobs_dead = r.counter(
            "genworker_jobs_dead_total",
            "Jobs this node gave up on (permanent error or attempts spent).",
        )
        self.jobs_released = r.counter(
            "genworker_jobs_released_total",
            "Claimed jobs this node gave back unfinished (shutdown, a worker's death).",
        )
        self.jobs_in_flight = r.gauge(
            "genworker_jobs_in_flight",
            "Jobs this node holds under its lease, by where: buffer (claimed, not yet handed "
            "out), workers (handed to a worker), writing (finished, outcome not yet written).",
            ("where",),
        )
        self.task_completion = r.histogram(
            "genworker_task_completion_seconds",
            "Time from submit to the last job of a task finishing, by plan and how it ended "
            "(succeeded, failed, cancelled; cluster-wide: every task finished since this node "
            "started).",
            ("plan", "status"),
            buckets=TASK_BUCKETS_S,
        )

    def _add_api(self, r: Registry) -> None:
        """The image API, as the workers see it."""
        self.api_call = r.histogram(
            "genworker_api_call_seconds",
            "Latency of one image API call.",
            buckets=API_CALL_BUCKETS_S,
        )
        self.api_responses = r.counter(
            "genworker_api_responses_total",
            "API responses by status class (2xx, 4xx, 5xx; 'error' when no response came).",
            ("status_class",),
        )
        self.api_rate_limited = r.counter(
            "genworker_api_rate_limited_total", "API answers with status 429."
        )
        self.slot_limit = r.gauge(
            "genworker_worker_slots_limit",
            "Current adaptive limit of API calls per worker.",
            ("worker",),
        )
        self.slots_busy = r.gauge(
            "genworker_worker_slots_busy", "API calls in flight per worker.", ("worker",)
        )

    def _add_machinery(self, r: Registry) -> None:
        """The supervisor's own machinery: DB pool, workers, leases, readiness, alarms."""
        self.db_pool_wait = r.histogram(
            "genworker_db_pool_wait_seconds",
            "Time spent waiting for a connection from the supervisor's DB pool (sum and count "
            "exact; requests that queued are bucketed at their mean wait of each second).",
            buckets=DB_WAIT_BUCKETS_S,
        )
        self.db_pool_connections = r.gauge(
            "genworker_db_pool_connections",
            "Connections in the supervisor's DB pool: state idle or busy (their sum is the size).",
            ("state",),
        )
        self.worker_restarts = r.counter(
            "genworker_worker_restarts_total",
            "Worker processes replaced, by reason: exit, signal, heartbeat_timeout (crashes), "
            "recycle, reload (planned).",
            ("reason",),
        )
        self.workers_up = r.gauge(
            "genworker_workers_up", "Worker processes running and heartbeating."
        )
        self.leases_renewed = r.counter(
            "genworker_leases_renewed_total", "Job leases this node renewed."
        )
        self.leases_expired = r.counter(
            "genworker_leases_expired_total", "Expired job leases this node reclaimed."
        )
        self.ready = r.gauge(
            "genworker_ready", "1 when /readyz says ready (database, workers, no alarm)."
        )
        self.alarm_active = r.gauge(
            "genworker_alarm_active", "1 while a health alarm is raised.", ("alarm",)
        )

    def render(self) -> str:
        return self.registry.render()
