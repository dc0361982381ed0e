-- Figures for /metrics and the alarms (genworker/ops/readings.py). Read every few seconds at
-- most, whatever the scrape rate; each reads a small, indexed set.

-- task_depth --
-- Unfinished tasks by state: queued ones wait for their first image (the queue_depth alarm).
SELECT status, count(*) AS n FROM genworker.tasks
 WHERE status IN ('queued', 'running') GROUP BY status

-- oldest_runnable --
-- Seconds the longest-waiting runnable job has waited (NULL when none is runnable).
SELECT extract(epoch FROM now() - least(
           (SELECT min(run_after) FROM genworker.jobs WHERE status = 'queued'),
           (SELECT min(run_after) FROM genworker.jobs
             WHERE status = 'scheduled' AND run_after <= now())))::float8 AS age_s

-- db_now --
-- The server's clock: where the finished-task watermark starts.
SELECT now() AS now

-- finished_tasks --
-- Tasks finished after a point in time and not seen yet, oldest first, with how they ended
-- (the completion-time histogram).
SELECT id, plan, extract(epoch FROM finished_at - created_at)::float8 AS took_s, finished_at,
       status
  FROM genworker.tasks
 WHERE finished_at > %(since)s AND status IN ('succeeded', 'failed', 'cancelled')
   AND NOT (id = ANY (%(seen)s::bigint[]))
 ORDER BY finished_at, id LIMIT %(limit)s
