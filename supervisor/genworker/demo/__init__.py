"""`genworker demo`: the old system's busiest morning, replayed on a real node.

scenario.py  the morning's arrivals (seeded)
baseline.py  the old design as a discrete-event model
node.py      the child processes (simulated API, `genworker start`), stopped by PID
noderow.py   reading the node's row: ready workers, busy slot-seconds
live.py      progress bars on a terminal, plain lines elsewhere
report.py    the figures and the summary tables
run.py       the command itself
"""

from __future__ import annotations

from genworker.demo.run import cmd_demo

__all__ = ["cmd_demo"]
