"""`recycler`: the command line. Thin wrappers over the library with progress bars and one-line errors.

Command groups live in their own modules (recycler.cli.delta, .train, .registry, .toy, .doctor); the
service commands (cycle, watch, backport, serve, demo) come from the flows package through the
entry-point group `recycler.cli`, so the library never imports the flows. Every module imports its
heavy dependencies inside the commands, so `recycler --help` stays fast.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer

from recycler import __version__
from recycler.cli import artifact, chain, delta, doctor, lora, registry, toy, train
from recycler.cli.common import console, out
from recycler.errors import RecyclerError

ENTRY_POINTS = "recycler.cli"

app = typer.Typer(
    name="recycler",
    help=(
        "Recycle fine-tuning across base-model releases (Lin et al., 2025). "
        "Δ = fine-tuned − base is extracted once, verified, and added to new (recycling) or old (backporting) bases."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(f"recycler {__version__}")


def _mount() -> None:
    for module in (delta, artifact, lora, train, registry, toy, doctor, chain):
        module.register(app)
    for ep in entry_points(group=ENTRY_POINTS):  # the service commands (recycler_flows.cli)
        ep.load()(app)


_mount()


def main() -> None:
    from recycler.redact import install_redaction

    install_redaction()
    try:
        app()
    except RecyclerError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except OSError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
