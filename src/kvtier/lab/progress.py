"""A rich progress bar for benchmark runs, or nothing (tests, --disable-tqdm, pipes).

`run_benchmark` reports `progress(finished, total)`; this turns those calls into one bar per
run, labelled with the configuration and workload.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

ProgressFn = Callable[[int, int], None]
TaskFactory = Callable[[str], ProgressFn]


def _noop(finished: int, total: int) -> None:
    return None


@contextlib.contextmanager
def bench_progress(enabled: bool = True,
                   console: Console | None = None) -> Iterator[TaskFactory]:
    """Yield `new_task(label) -> progress_fn`; a no-op factory when disabled."""
    if not enabled:
        yield lambda label: _noop
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as bar:

        def new_task(label: str) -> ProgressFn:
            task = bar.add_task(label, total=None)

            def update(finished: int, total: int) -> None:
                bar.update(task, completed=finished, total=total)

            return update

        yield new_task
