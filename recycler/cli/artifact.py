"""`recycler inspect | verify | demo-delta`: read what recycler wrote, and try the Δ workflow on tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from recycler.cli.common import OverwriteOpt, console, out
from recycler.errors import RecyclerError


def inspect(
    path: Annotated[Path, typer.Argument(help="A Δ artifact or a model folder written by recycler.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest.")] = False,
) -> None:
    """Show what a Δ (or recycled model) is: sources, dtype, size, relative norms, vocabulary."""
    from recycler.io.checkpoint import open_checkpoint

    ck = open_checkpoint(path, require_config=False)
    m = ck.manifest
    if m is None:
        raise RecyclerError(f"{path}: no manifest.json; `recycler inspect` reads folders written by recycler")
    if as_json:
        out.print_json(json.dumps(m))
        return
    t = Table(title=f"{m.get('kind')} {path}", show_header=False)
    t.add_row("tool", m.get("tool", "?"))
    t.add_row("tensors", str(len(ck.tensors)))
    t.add_row(
        "size", f"{sum(f['size'] for f in m['files'].values()) / 1e6:,.1f} MB in {len(m['files'])} files"
    )
    for role, src in (m.get("sources") or {}).items():
        t.add_row(f"source: {role}", json.dumps(src, default=str)[:200])
    for key in (
        "dtype",
        "alpha",
        "vocab_size",
        "tied_embeddings",
        "roundtrip",
        "residual",
        "ranks",
        "dropped",
    ):
        if key in m:
            t.add_row(key, json.dumps(m[key]))
    for fam, v in (m.get("relative_norms") or {}).items():
        t.add_row(f"‖Δ‖/‖base‖ {fam}", f"{v:.4g}")
    for fam, v in (m.get("relative_error") or {}).items():  # an adapter written from a Δ
        t.add_row(f"‖Δ − BA‖/‖Δ‖ {fam}", f"{v:.4g}")
    out.print(t)


def verify(path: Annotated[Path, typer.Argument(help="A folder written by recycler (Δ or model).")]) -> None:
    """Re-hash every file against manifest.json; fail on any missing, altered or unlisted file."""
    from recycler.io.manifest import verify_folder

    r = verify_folder(path)
    out.print(
        f"ok: {path} ({r['kind']}): {r['files']} files, {r['bytes']:,} bytes, {r['tensors']} tensors match the manifest"
    )


def demo_delta(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the demo's models, Δ and summary.")
    ] = Path("out/demo-delta"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Run the Δ workflow alone (diff, recycle, backport, verify) on tiny models (CPU, seconds)."""
    from recycler.toy.delta_demo import run_demo

    summary = run_demo(output, overwrite=overwrite, say=lambda m: console.print(m, highlight=False))
    out.print_json(json.dumps(summary))
    out.print(f"wrote {output}")


def register(main: typer.Typer) -> None:
    for command in (inspect, verify):
        main.command()(command)
    main.command("demo-delta")(demo_delta)
