"""What the CLI's command modules share: consoles, option types and the one progress bar.

Kept apart so that no command module imports another; heavy dependencies stay out (rich and typer
only), so `recycler --help` is fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

console = Console(stderr=True)  # progress, notes and errors
out = Console()  # results

TrackOpt = Annotated[
    bool | None,
    typer.Option(
        "--track/--no-track",
        help="Record this command as an MLflow run (default: $RECYCLER_TRACK, else off).",
        show_default=False,
    ),
]
OutOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Destination folder (created atomically; must not exist).")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing destination once the new one is complete.")
]
ShardOpt = Annotated[
    str, typer.Option("--shard-size", help="Upper bound per safetensors shard, e.g. 5GB, 500MB.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


@contextmanager
def progress_bar(label: str, total: int, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    """Byte-level progress with throughput and ETA, on stderr."""
    if quiet:
        yield None
        return
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as p:
        task = p.add_task(label, total=total)
        yield lambda n: p.advance(task, n)
