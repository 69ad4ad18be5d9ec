"""A progress bar on stderr that never draws while a run is being timed.

rich's ``Progress`` normally refreshes from a background thread ten times a second;
onnxruntime releases the GIL while it runs, so that thread would render *during* timed
runs and steal a core from the model. Here ``auto_refresh`` is off and the harness
calls the callback between runs only (at most five times a second).
"""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@contextlib.contextmanager
def rich_progress(console: Console | None = None):
    """Yield a ``progress(description, done, total)`` callback drawing one bar on stderr.

    Yields ``None`` (no progress reporting) when stderr is not a terminal.
    """
    console = console or Console(stderr=True)
    if not console.is_terminal:
        # Bars drawn into a pipe or a log file are noise, and a finished Live display
        # leaves a blank line there; report progress only to a person watching.
        yield None
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        auto_refresh=False,
        transient=True,
    )
    task = progress.add_task("starting", total=None)

    def update(description: str, done: int, total: int | None) -> None:
        progress.update(task, description=description, completed=done, total=total)
        progress.refresh()

    with progress:
        yield update
