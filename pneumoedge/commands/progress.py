"""Rich progress bars for the library's plain progress callbacks (the runtime never draws)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pneumoedge.runtime.folder import ProgressCallback, RunSummary


@contextlib.contextmanager
def folder_progress(console: Console, enabled: bool, title: str = "infer") -> Iterator[Optional[ProgressCallback]]:
    """A `run_folder` progress callback drawing a bar on `console`, or None when not `enabled`."""
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn(f"[bold]{title}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task = bar.add_task(title, total=None, rate="")

    def update(rows: int, total: Optional[int], summary: RunSummary) -> None:
        rate = f"{summary.images_per_s:.1f} img/s" if summary.elapsed_s > 0 and summary.predicted else ""
        bar.update(task, completed=rows, total=total, rate=rate)

    with bar:
        yield update
