"""Options shared by several CLI modules (kept apart so no CLI module imports another)."""

from __future__ import annotations

from typing import Annotated

import typer

TrackOpt = Annotated[
    bool | None,
    typer.Option(
        "--track/--no-track",
        help="Record this command as an MLflow run (default: $RECYCLER_TRACK, else off).",
        show_default=False,
    ),
]
