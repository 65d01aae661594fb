"""`recycler lora-extract | lora-upgrade` (and `diff --as-lora`): Δs as PEFT LoRA adapters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from recycler.cli.common import OutOpt, OverwriteOpt, console, out

AllowOtherBaseOpt = Annotated[
    bool,
    typer.Option(
        "--allow-other-base",
        help="A LoRA adapter records the name of its base: accept a base folder of another name "
        "(shapes are still checked).",
    ),
]


def input_bytes(path: Path) -> int:
    """Bytes a progress bar counts for an input: a checkpoint's weights, an adapter's float32 Δ."""
    from recycler.io.adapter import is_adapter, open_adapter
    from recycler.io.checkpoint import open_checkpoint

    if is_adapter(path):
        return sum(4 * math.prod(s) for s in open_adapter(path).shapes().values())
    return open_checkpoint(path).nbytes


RankOpt = Annotated[
    int | None, typer.Option("--rank", "-r", help="LoRA rank of every module (truncated SVD).")
]
EnergyOpt = Annotated[
    float | None,
    typer.Option(
        "--energy",
        help="Per module, the smallest rank keeping this share of ‖Δ‖² (e.g. 0.99), instead of --rank.",
    ),
]
BaseNameOpt = Annotated[
    str | None,
    typer.Option(
        "--base-name",
        help="base_model_name_or_path recorded in adapter_config.json (default: the target base's folder).",
    ),
]


def write_lora(delta, output: Path, rank, energy, base_name, target, inputs, overwrite: bool) -> None:
    """Run the extraction and print what the low rank cost (shared by every command here)."""
    from recycler.io.checkpoint import open_checkpoint
    from recycler.stages.to_lora import delta_to_lora

    if (rank is None) == (energy is None):
        raise typer.BadParameter("give exactly one of --rank and --energy")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise typer.BadParameter(f"--energy must be in (0, 1], got {energy}")
    if rank is not None and rank < 1:
        raise typer.BadParameter(f"--rank must be at least 1, got {rank}")
    tgt = open_checkpoint(target) if target is not None else None
    name = base_name or (str(Path(target).resolve()) if target is not None else None)
    r = delta_to_lora(
        delta,
        output,
        rank=rank,
        energy=energy,
        base_name=name,
        target=tgt,
        inputs=list(inputs),
        overwrite=overwrite,
    )
    print_cost(r.manifest)
    out.print(f"wrote {r.path}")


def print_cost(m: dict) -> None:
    ranks, dropped = m["ranks"], m["dropped"]
    console.print(f"  {ranks['modules']} modules, rank {ranks['min']}–{ranks['max']}")
    t = Table("tensor family", "‖Δ − BA‖/‖Δ‖", title="what the low rank cost")
    for fam, err in m["relative_error"].items():
        t.add_row(fam, f"{err:.3g}")
    console.print(t)
    if dropped["tensors"]:
        console.print(
            f"  not representable as LoRA, left out: {len(dropped['tensors'])} tensors "
            f"({', '.join(dropped['tensors'][:3])}{', …' if len(dropped['tensors']) > 3 else ''}), "
            f"{100 * dropped['share_of_delta_sumsq']:.3g}% of ‖Δ‖²; over all of Δ ‖Δ − adapter‖/‖Δ‖ = "
            f"{m['relative_error_all']:.3g}"
        )


def lora_extract(
    delta: Annotated[Path, typer.Argument(help="A Δ artifact written by `recycler diff`.")],
    output: OutOpt,
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    target: Annotated[
        Path | None,
        typer.Option("--target", help="The base the adapter is for: shapes checked, name recorded."),
    ] = None,
    base_name: BaseNameOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a Δ as a PEFT LoRA adapter (loads with PeftModel.from_pretrained on its base)."""
    from recycler.stages.sources import stored_delta

    write_lora(stored_delta(delta), output, rank, energy, base_name, target, [delta], overwrite)


def lora_upgrade(
    adapter: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder trained on --from.")],
    output: OutOpt,
    old: Annotated[Path, typer.Option("--from", help="The base the adapter was trained on.")],
    new: Annotated[Path, typer.Option("--to", help="The new base version to move it to.")],
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    base_name: BaseNameOpt = None,
    allow_other_base: AllowOtherBaseOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Move an adapter to a new base in one command: adapter → Δ → adapter for --to.

    The adapter is checked against --from. Without --rank/--energy its own largest rank is kept
    (no low-rank loss).
    """
    from recycler.io.adapter import open_adapter
    from recycler.stages.sources import adapter_delta

    delta = adapter_delta(adapter, old, allow_other_base=allow_other_base)
    if rank is None and energy is None:
        rank = (
            max(m.rank for m in open_adapter(adapter).modules.values())
            if open_adapter(adapter).modules
            else 1
        )
    write_lora(delta, output, rank, energy, base_name, new, [adapter, old, new], overwrite)


def register(main: typer.Typer) -> None:
    main.command("lora-extract")(lora_extract)
    main.command("lora-upgrade")(lora_upgrade)
