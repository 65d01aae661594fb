"""`recycler chain show | retry | skip`: read a family's release chain, and unblock it by hand.

The chain (recycler.registry.chain) records every base release the service has seen for one
fine-tuned variant, in the order its cycle started. A release given up after `max_attempts` (or
refused, with `after_refusal: stop`) blocks the chain: `retry` gives it new attempts, `skip` lets the
chain go on without it. Both take the family's turn, so they never interleave with a running cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from recycler.cli.common import out

SpecOpt = Annotated[
    Path, typer.Option("--spec", "-s", help="The family's spec (family and variant come from it).")
]
VersionArg = Annotated[str, typer.Argument(help="The base release, e.g. v4.")]

chain_app = typer.Typer(
    help="A family's release chain: which release is where, and how to unblock it.", no_args_is_help=True
)


def _services():  # type: ignore[no-untyped-def]
    from recycler.service.services import Services

    return Services.from_settings()


@chain_app.command("show")
def show(spec: SpecOpt) -> None:
    """Every release the chain has seen, in the order its cycle started, with its state and reason."""
    from rich.table import Table

    from recycler.registry.chain import ChainLedger, ordered
    from recycler.service.spec import load_spec

    s = load_spec(spec)
    entries = ChainLedger(_services().registry, s.family, s.variant).entries()
    table = Table(title=f"chain {s.family}-{s.variant}", caption="unblock: recycler chain retry | skip")
    for column in ("#", "release", "content", "state", "attempts", "reason"):
        table.add_column(column)
    for e in ordered(entries):
        table.add_row(str(e.seq or "–"), e.version, e.fingerprint[:12], e.state, str(e.attempts), e.reason)
    out.print(table)


@chain_app.command("retry")
def retry(version: VersionArg, spec: SpecOpt) -> None:
    """Give a refused, failed or given-up release a fresh set of attempts (the next watcher runs it)."""
    from recycler.service.chain import operator_update
    from recycler.service.spec import load_spec

    entry = operator_update(_services(), load_spec(spec), version, "retry")
    out.print(f"{entry.version}: {entry.state}, {entry.reason}; the next watcher pass runs its cycle")


@chain_app.command("skip")
def skip(
    version: VersionArg,
    spec: SpecOpt,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the chain).")] = "",
    source: Annotated[
        str | None,
        typer.Option(
            "--source", help="The release source: needed to skip a release the chain has not seen yet."
        ),
    ] = None,
) -> None:
    """Make a release terminal so the chain goes on without it (recorded as skipped, with the reason)."""
    from recycler.service import steps
    from recycler.service.chain import operator_update
    from recycler.service.spec import load_spec

    s, svc = load_spec(spec), _services()
    release = steps.find_release(steps.open_releases(svc, source, s), version) if source else None
    entry = operator_update(svc, s, version, "skip", reason, release=release)
    out.print(f"{entry.version}: {entry.state} ({entry.reason})")


def register(app: typer.Typer) -> None:
    app.add_typer(chain_app, name="chain")
