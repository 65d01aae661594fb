"""`recycler` command line: thin wrappers over the Python API with progress bars and one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from recycler import __version__
from recycler.cli_options import TrackOpt
from recycler.errors import RecyclerError

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
console = Console(stderr=True)
out = Console()

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


def _policy(
    alpha: float,
    include: list[str] | None,
    exclude: list[str] | None,
    only_in_delta: str,
    vocab: str,
    tokenizer_from: str,
):
    from recycler.policy import ApplyPolicy

    return ApplyPolicy(
        alpha=alpha,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        only_in_delta=only_in_delta,
        vocab=vocab,
        tokenizer_from=tokenizer_from,
    )


AlphaOpt = Annotated[
    float, typer.Option("--alpha", "-a", help="Scale of Δ: output = target + α·Δ (1.0 as in the paper).")
]
IncludeOpt = Annotated[
    list[str] | None, typer.Option("--include", help="Only add Δ to tensors matching this glob (repeatable).")
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option("--exclude", help="Copy tensors matching this glob unchanged (repeatable)."),
]
OnlyInDeltaOpt = Annotated[
    str, typer.Option("--only-in-delta", help="Δ tensors missing from the target: 'error' or 'ignore'.")
]
VocabOpt = Annotated[
    str,
    typer.Option(
        "--vocab",
        help="Embedding rows when vocabularies differ: 'auto' (align by token string), 'tokens', 'prefix' (row i to row i), 'error'.",
    ),
]
TokOpt = Annotated[
    str,
    typer.Option(
        "--tokenizer-from", help="Output tokenizer/chat template: 'auto', 'source' (fine-tuned) or 'target'."
    ),
]


def _policy_params(policy) -> dict[str, object]:
    return {k: ",".join(v) if isinstance(v, tuple) else v for k, v in policy.model_dump().items()}


def _report(result) -> None:
    for line in result.report.summary_lines():
        console.print(f"  {line}")
    out.print(f"wrote {result.path}")


@app.command()
def diff(
    base: Annotated[Path, typer.Argument(help="Base checkpoint m_s (HF folder, safetensors).")],
    tuned: Annotated[
        Path, typer.Argument(help="Its fine-tuned version m′_s (same architecture and shapes).")
    ],
    output: OutOpt,
    dtype: Annotated[
        str,
        typer.Option(
            help="Storage dtype of Δ: float32 (exact round trip, default), bfloat16 or float16 (half the size, lossy)."
        ),
    ] = "float32",
    shard_size: ShardOpt = "5GB",
    max_relative_norm: Annotated[
        float,
        typer.Option(
            help="Refuse if ‖Δ‖/‖base‖ exceeds this: the inputs are then not base and fine-tune of one model."
        ),
    ] = 0.5,
    hash_inputs: Annotated[
        bool,
        typer.Option(
            "--hash-inputs",
            help="Fingerprint inputs by hashing every weight byte (slower) instead of their structure.",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    track: TrackOpt = None,
) -> None:
    """Extract Δ = TUNED − BASE into a verifiable Δ artifact (sharded safetensors + manifest)."""
    from recycler.checkpoint import open_checkpoint
    from recycler.extract import diff_checkpoints
    from recycler.tracking import log_json_artifact, maybe_track
    from recycler.writer import parse_size

    total = open_checkpoint(base).nbytes + open_checkpoint(tuned).nbytes
    params = {"base": base, "tuned": tuned, "output": output, "dtype": dtype, "shard_size": shard_size}
    with maybe_track("diff", params, enabled=track), progress_bar("diff", total, quiet) as tick:
        r = diff_checkpoints(
            base,
            tuned,
            output,
            dtype=dtype,
            max_shard_bytes=parse_size(shard_size),
            max_relative_norm=max_relative_norm,
            overwrite=overwrite,
            hash_inputs=hash_inputs,
            on_progress=tick,
        )
        log_json_artifact(r.manifest, "delta_manifest.json")
    console.print(
        f"  ‖Δ‖/‖base‖ (matrices) = {r.manifest['relative_norms']['matrices']:.4g}, {r.manifest['tensor_count']} tensors, round trip exact: {r.manifest['roundtrip']['exact']}"
    )
    out.print(f"wrote {r.path}")


@app.command()
def apply(
    target: Annotated[
        Path, typer.Argument(help="Target base m_t: a newer (recycling) or older (backporting) base version.")
    ],
    delta: Annotated[Path, typer.Argument(help="Δ artifact written by `recycler diff`.")],
    output: OutOpt,
    alpha: AlphaOpt = 1.0,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    only_in_delta: OnlyInDeltaOpt = "error",
    vocab: VocabOpt = "auto",
    tokenizer_from: TokOpt = "auto",
    shard_size: ShardOpt = "5GB",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    track: TrackOpt = None,
) -> None:
    """Write TARGET + α·Δ as a checkpoint that loads with AutoModelForCausalLM.from_pretrained."""
    from recycler.checkpoint import open_checkpoint
    from recycler.tracking import log_json_artifact, maybe_track
    from recycler.transfer import apply_diff
    from recycler.writer import parse_size

    policy = _policy(alpha, include, exclude, only_in_delta, vocab, tokenizer_from)
    params = {"target": target, "delta": delta, "output": output, **_policy_params(policy)}
    with (
        maybe_track("apply", params, enabled=track),
        progress_bar("apply", open_checkpoint(target).nbytes, quiet) as tick,
    ):
        r = apply_diff(
            target,
            delta,
            output,
            policy=policy,
            max_shard_bytes=parse_size(shard_size),
            overwrite=overwrite,
            on_progress=tick,
        )
        log_json_artifact(r.report.model_dump(mode="json"), "compatibility.json")
    _report(r)


@app.command()
def recycle(
    base: Annotated[Path, typer.Argument(help="Old base m_s.")],
    tuned: Annotated[Path, typer.Argument(help="Its fine-tuned version m′_s.")],
    target: Annotated[Path, typer.Argument(help="New base m_t.")],
    output: OutOpt,
    alpha: AlphaOpt = 1.0,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    only_in_delta: OnlyInDeltaOpt = "error",
    vocab: VocabOpt = "auto",
    tokenizer_from: TokOpt = "auto",
    shard_size: ShardOpt = "5GB",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    track: TrackOpt = None,
) -> None:
    """Write TARGET + α·(TUNED − BASE) in one streaming pass, without storing Δ."""
    from recycler.checkpoint import open_checkpoint
    from recycler.tracking import log_json_artifact, maybe_track
    from recycler.transfer import recycle as run
    from recycler.writer import parse_size

    policy = _policy(alpha, include, exclude, only_in_delta, vocab, tokenizer_from)
    params = {"base": base, "tuned": tuned, "target": target, "output": output, **_policy_params(policy)}
    with (
        maybe_track("recycle", params, enabled=track),
        progress_bar("recycle", open_checkpoint(target).nbytes, quiet) as tick,
    ):
        r = run(
            base,
            tuned,
            target,
            output,
            policy=policy,
            max_shard_bytes=parse_size(shard_size),
            overwrite=overwrite,
            on_progress=tick,
        )
        log_json_artifact(r.report.model_dump(mode="json"), "compatibility.json")
    _report(r)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A Δ artifact or a model folder written by recycler.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest.")] = False,
) -> None:
    """Show what a Δ (or recycled model) is: sources, dtype, size, relative norms, vocabulary."""
    from recycler.checkpoint import open_checkpoint

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
    for key in ("dtype", "alpha", "vocab_size", "tied_embeddings", "roundtrip"):
        if key in m:
            t.add_row(key, json.dumps(m[key]))
    for fam, v in (m.get("relative_norms") or {}).items():
        t.add_row(f"‖Δ‖/‖base‖ {fam}", f"{v:.4g}")
    out.print(t)


@app.command()
def verify(path: Annotated[Path, typer.Argument(help="A folder written by recycler (Δ or model).")]) -> None:
    """Re-hash every file against manifest.json; fail on any missing, altered or unlisted file."""
    from recycler.manifest import verify_folder

    r = verify_folder(path)
    out.print(
        f"ok: {path} ({r['kind']}): {r['files']} files, {r['bytes']:,} bytes, {r['tensors']} tensors match the manifest"
    )


@app.command("demo-delta")
def demo_delta(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the demo's models, Δ and summary.")
    ] = Path("out/demo-delta"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Run the Δ workflow alone (diff, recycle, backport, verify) on tiny models (CPU, seconds)."""
    from recycler.demo import run_demo

    summary = run_demo(output, overwrite=overwrite, say=lambda m: console.print(m, highlight=False))
    out.print_json(json.dumps(summary))
    out.print(f"wrote {output}")


@app.command()
def demo(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for releases, registry, artifacts and logs.")
    ] = Path("out/demo"),
    fast: Annotated[
        bool, typer.Option("--fast", help="The small toy family (a smoke test in ~2 minutes, not evidence).")
    ] = False,
    versions: Annotated[
        str, typer.Option("--versions", help="Toy releases to publish, oldest first (comma-separated).")
    ] = "v3,v4,v5",
    overwrite: OverwriteOpt = False,
) -> None:
    """The service end to end, unattended: releases v1→v3 picked up by the watcher, one iterative
    release cycle each (apply Δ^iter, fine-tune, evaluate, gate, register), then a backport onto v1.

    Embedded defaults: Prefect without a server, MLflow on a SQLite file, local artifacts, CPU.
    """
    import os
    import shutil
    import time

    from recycler.errors import OutputExists

    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise OutputExists(f"{output} holds an earlier demo; pass --overwrite to start over")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    from flows.demo import REPORT_COLUMNS, embedded_environment, format_report

    for key, value in embedded_environment(output).items():
        os.environ[key] = value
    from flows.demo import run_demo as run_service_demo

    start = time.perf_counter()
    result = run_service_demo(
        output,
        fast=fast,
        say=lambda m: console.print(f"[bold]»[/bold] {m}", highlight=False),
        versions=tuple(v.strip() for v in versions.split(",") if v.strip()),
    )
    table = Table(title=f"recycler demo: toy family, {len(result['cycles'])} release cycles + backport")
    for col in REPORT_COLUMNS:
        table.add_column(col)
    rows, registered = format_report(result)
    for row in rows:
        table.add_row(*row)
    out.print(table)
    out.print(
        "accuracy on the held-out task; steps to FT(M): steps FT from M+Δ needs to reach FT(M)'s final accuracy"
    )
    out.print("registered: " + " · ".join(registered))
    out.print(
        "timings: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result["timings"].items())
        + f" (wall {time.perf_counter() - start:.0f} s)"
    )
    (output / "demo.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    db = result["tracking_uri"]
    out.print(
        f"lineage: recycler lineage toy-arith-ft@champion   (with RECYCLER_HOME={output / '.recycler'})"
    )
    out.print(f"MLflow UI: mlflow ui --backend-store-uri {db} --port 5000   then open http://127.0.0.1:5000")


@app.command()
def version() -> None:
    """Print the version."""
    out.print(f"recycler {__version__}")


def _mount() -> None:
    """Sub-command groups live in their own modules; each imports its heavy dependencies lazily."""
    from recycler import cli_doctor, cli_registry, cli_service, cli_toy, cli_train

    for module in (cli_train, cli_service, cli_registry, cli_toy, cli_doctor):
        module.register(app)


_mount()


def main() -> None:
    from recycler.tracking import install_redaction

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
