"""What the demo shows while it runs: rich progress bars on a terminal, plain lines elsewhere.

One bar per task while there are few; one per plan when there are many
(images done of those submitted so far, rate, ETA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

PER_TASK_UP_TO = 12  # more tasks than this: one bar per plan


@dataclass(frozen=True)
class TaskProgress:
    task_id: int
    plan: str
    tenant: str
    images: int
    done: int  # images finished, whatever the outcome
    finished: bool


class View(Protocol):
    def note(self, text: str) -> None: ...

    def update(self, tasks: Sequence[TaskProgress]) -> None: ...

    def close(self) -> None: ...


class Quiet:
    """--json: the document is the only output."""

    def note(self, text: str) -> None:
        return

    def update(self, tasks: Sequence[TaskProgress]) -> None:
        return

    def close(self) -> None:
        return


class Plain:
    """Not a terminal: milestones as plain lines, no redrawing."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def update(self, tasks: Sequence[TaskProgress]) -> None:
        return

    def close(self) -> None:
        return


class _Rate(ProgressColumn):
    def render(self, task: object) -> Text:
        speed = getattr(task, "speed", None)
        return Text("  -   img/s" if speed is None else f"{speed:5.1f} img/s", style="cyan")


class Bars:
    """A terminal: rich progress bars, redrawn in place."""

    def __init__(self, console: Console, plans: Sequence[str], total_tasks: int) -> None:
        self.console = console
        self.per_task = total_tasks <= PER_TASK_UP_TO
        self.plans = list(plans)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("images"),
            _Rate(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            refresh_per_second=8,
            speed_estimate_period=10.0,
        )
        self.bars: dict[object, TaskID] = {}
        self.started = False

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def _bar(self, key: object, description: str) -> TaskID:
        if key not in self.bars:
            self.bars[key] = self.progress.add_task(description, total=None)
        return self.bars[key]

    def update(self, tasks: Sequence[TaskProgress]) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        if self.per_task:
            for t in tasks:
                bar = self._bar(t.task_id, f"{t.plan:<6} task {t.task_id:<5} {t.tenant:<14}")
                self.progress.update(bar, total=t.images, completed=t.done)
            return
        for plan in self.plans:
            mine = [t for t in tasks if t.plan == plan]
            if not mine:
                continue
            finished = sum(t.finished for t in mine)
            bar = self._bar(plan, "")
            self.progress.update(
                bar,
                description=f"{plan:<6} {finished:>3}/{len(mine):<3} tasks done",
                total=sum(t.images for t in mine),
                completed=sum(t.done for t in mine),
            )

    def close(self) -> None:
        if self.started:
            self.progress.refresh()
            self.progress.stop()
            self.started = False


def make_view(console: Console, *, json_only: bool, plans: Sequence[str], total_tasks: int) -> View:
    if json_only:
        return Quiet()
    if console.is_terminal and not console.is_dumb_terminal:
        return Bars(console, plans, total_tasks)
    return Plain(console)
