"""Every exit code a genworker process ends with, and what it tells whoever reads it.

systemd reads the supervisor's (genworker.service: RestartPreventExitStatus lists the
ones a restart cannot fix); the supervisor reads its workers' (a recycle is not a
crash; a worker that cannot boot stops the node).
"""

from __future__ import annotations

EXIT_OK = 0  # done as asked: a stop signal, a finished command, a worker told to stop
EXIT_FAILED = 1  # failed: a supervisor task or a command raised; a worker crashed
EXIT_USAGE = 2  # bad flags, settings or input: fix the command line (do not restart)
EXIT_BOOT = 3  # a worker could not start (bad handler, bad config); its node stops with it too
EXIT_RECYCLE = 4  # a worker made way for a fresh one (jobs or memory limit): not a crash
EXIT_ORPHAN = 5  # a worker whose supervisor went away
EXIT_CRASH_LOOP = 6  # every worker keeps dying: the supervisor gives up, systemd restarts it
EXIT_INTERRUPTED = 130  # a command stopped by Ctrl-C (128 + SIGINT)
