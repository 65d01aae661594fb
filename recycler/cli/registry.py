"""`recycler publish`, `recycler fetch`, `recycler lineage` and `recycler registry ls`.

Store and registry locations come from RECYCLER_* settings (recycler.settings). mlflow and boto3 are
imported inside the commands so that `recycler --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from recycler.cli.common import console, out, progress_bar

if TYPE_CHECKING:
    from recycler.registry.lineage import LineageNode

registry_app = typer.Typer(help="Inspect the model registry.", no_args_is_help=True)


def publish(
    folder: Annotated[
        Path, typer.Argument(help="Folder with a manifest.json (a Δ or model written by recycler).")
    ],
    kind: Annotated[
        str, typer.Option("--kind", help="diff, model, base or adapter (a PEFT LoRA adapter folder).")
    ] = "model",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the artifact reference as JSON.")] = False,
) -> None:
    """Publish FOLDER to the artifact store (files first, manifest last); prints the artifact URI.

    Idempotent: the address is the manifest's sha256, so publishing the same content again is a no-op.
    A model folder without a manifest (e.g. a fine-tune's output) gets one first; hidden entries such
    as `.checkpoints/` are never published.
    """
    from recycler.io.checkpoint import MANIFEST_NAME
    from recycler.settings import get_settings
    from recycler.store import KINDS, ensure_manifest, open_store, prepare

    if kind not in KINDS:
        raise typer.BadParameter(f"--kind must be one of {', '.join(KINDS)}")
    if kind == "adapter":
        from recycler.io.adapter import open_adapter

        open_adapter(folder)  # a supported LoRA adapter, named if not (DoRA, LoHa, …)
    if not (folder / MANIFEST_NAME).is_file() and kind in ("model", "base", "adapter"):
        ensure_manifest(folder, kind=kind)
        console.print(f"wrote {folder / MANIFEST_NAME}")
    store = open_store(get_settings())
    total = prepare(folder, kind, verify=False).total
    with progress_bar("publish", total, quiet) as tick:
        ref = store.publish(folder, kind, on_progress=tick)
    if as_json:
        out.print_json(json.dumps({"kind": ref.kind, "digest": ref.digest, "uri": ref.uri}))
    else:
        out.print(ref.uri, highlight=False, soft_wrap=True)


def fetch(
    uri: Annotated[
        str, typer.Argument(help="Artifact URI: s3://bucket/prefix/<kind>/<sha256> or a store path.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Destination folder (created atomically).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing destination.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Download an artifact and verify every file's sha256 and size before publishing it as OUTPUT."""
    from recycler.settings import get_settings
    from recycler.store import resolve_uri

    try:
        store, ref = resolve_uri(uri, get_settings())
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    total = sum(int(f["size"]) for f in store.manifest(ref)["files"].values())
    with progress_bar("fetch", total, quiet) as tick:
        dest = store.fetch(ref, output, overwrite=overwrite, on_progress=tick)
    out.print(f"wrote {dest}", highlight=False)


def _parse_model_ref(spec: str) -> tuple[str, str | None]:
    for sep in ("@", "/"):
        if sep in spec:
            name, _, which = spec.rpartition(sep)
            return name, which
    return spec, None


def lineage(
    model: Annotated[
        str, typer.Argument(help="MODEL, MODEL@VERSION or MODEL@ALIAS (default: newest version).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the tree as JSON.")] = False,
    mermaid: Annotated[
        Path | None, typer.Option("--mermaid", help="Also write a Mermaid flowchart here.")
    ] = None,
    log: Annotated[
        bool, typer.Option("--log", help="Log the tree (JSON, Mermaid, PNG) to an MLflow run.")
    ] = False,
) -> None:
    """Show where a registered model version comes from: fine-tunes, Δs and bases, back to the first base."""
    from recycler.registry.client import Registry
    from recycler.registry.lineage import lineage as lineage_of
    from recycler.registry.lineage_graph import to_mermaid
    from recycler.registry.runlog import log_json_artifact, log_lineage
    from recycler.registry.runs import tracked_run
    from recycler.settings import get_settings

    settings = get_settings()
    reg = Registry.from_settings(settings)
    name, which = _parse_model_ref(model)
    if which is None:
        newest = reg.latest(name)
        if newest is None:
            from recycler.errors import RegistryError

            raise RegistryError(f"{name}: no versions in the registry at {reg.uri}")
        which = newest.version
    tree = lineage_of(reg, name, which)
    if mermaid:
        mermaid.write_text(to_mermaid(tree))
    if as_json:
        out.print_json(json.dumps(tree.to_dict()))
    else:
        out.print(rich_tree(tree))
    if log:
        with tracked_run(
            f"lineage {tree.name}/{tree.version}",
            tags={"recycler.command": "lineage"},
            settings=settings,
            enabled=True,
        ) as run:
            log_json_artifact(tree.to_dict(), "lineage.json")
            log_lineage(
                reg, reg.get(tree.name, tree.version or which)
            )  # lineage.png, lineage.md, lineage.dot
        console.print(f"logged to run {run.info.run_id if run else '?'}")


def rich_tree(node: LineageNode):
    from rich.tree import Tree

    def label(n: LineageNode) -> str:
        parts = [f"[bold]{n.label}[/bold]"]
        if n.relation != "self":
            parts.insert(0, f"[dim]{n.relation}:[/dim]")
        if n.tags.get("base_version"):
            parts.append(f"base {n.tags['base_version']}")
        if n.aliases:
            parts.append("[green]" + ", ".join(n.aliases) + "[/green]")
        parts += [f"{k}={v}" for k, v in sorted(n.tags.items()) if k.startswith("eval.")]
        if n.note:
            parts.append(f"[yellow]({n.note})[/yellow]")
        return " ".join(parts)

    def add(tree: Tree, n: LineageNode) -> None:
        for c in n.children:
            add(tree.add(label(c)), c)

    root = Tree(label(node))
    add(root, node)
    return root


@registry_app.command("ls")
def registry_ls(
    family: Annotated[str | None, typer.Option("--family", help="Only this model family.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Families, registered models, their versions and aliases."""
    from rich.table import Table

    from recycler.registry.client import Registry
    from recycler.settings import get_settings

    reg = Registry.from_settings(get_settings())
    rows = []
    for m in reg.models():
        if family and m["family"] != family:
            continue
        versions = reg.versions(m["kind"], m["family"], m["variant"])
        rows.append(
            {
                **m,
                "versions": [v.version for v in versions],
                "releases": [v.tags.get("base_version", "?") for v in versions],
            }
        )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=f"registry {reg.uri}", caption="versions: registry version number (base release)")
    for col in ("family", "model", "kind", "versions", "aliases"):
        table.add_column(col)
    for r in rows:
        pairs = [f"{v} ({rel})" for v, rel in zip(r["versions"], r["releases"], strict=True)]
        shown = (
            ", ".join(pairs)
            if len(pairs) <= 6
            else f"{', '.join(pairs[:2])} … {', '.join(pairs[-2:])} ({len(pairs)})"
        )
        aliases = ", ".join(f"{a} → {r['name']}/{v}" for a, v in sorted(r["aliases"].items()))
        table.add_row(r["family"], r["name"], r["kind"], shown or "none", aliases)
    out.print(table)


def register(app: typer.Typer) -> None:
    """Add the commands to the main `recycler` app."""
    app.command()(publish)
    app.command()(fetch)
    app.command()(lineage)
    app.add_typer(registry_app, name="registry")
