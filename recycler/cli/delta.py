"""`recycler diff | apply | recycle`: the Δ workflow on HF folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from recycler.cli.common import OutOpt, OverwriteOpt, QuietOpt, ShardOpt, TrackOpt, console, out, progress_bar
from recycler.cli.lora import AllowOtherBaseOpt, EnergyOpt, RankOpt, input_bytes

app = typer.Typer()  # commands are registered on the main app by `register`


ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="Compute threads (default: one per core, up to 4; env RECYCLER_THREADS). "
        "The output bytes do not depend on it.",
    ),
]


def _engine_threads(threads: int | None) -> None:
    """The engine parallelises across chunks (one kernel call per core at a time): OpenBLAS's own
    threads (np.dot) would only oversubscribe the cores. Effective if numpy is not imported yet.
    `--threads` reaches the engine through RECYCLER_THREADS (`recycler.io.reader.compute_threads`)."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if threads is not None:
        os.environ["RECYCLER_THREADS"] = str(threads)


def _policy(
    alpha: float,
    include: list[str] | None,
    exclude: list[str] | None,
    only_in_delta: str,
    vocab: str,
    tokenizer_from: str,
):
    from recycler.delta.policy import ApplyPolicy

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


MaxNormOpt = Annotated[
    float,
    typer.Option(
        help="Refuse if ‖Δ‖/‖base‖ over weight matrices exceeds this: the inputs are then not base and "
        "fine-tune of one model (exit code 5)."
    ),
]


def _policy_params(policy) -> dict[str, object]:
    return {k: ",".join(v) if isinstance(v, tuple) else v for k, v in policy.model_dump().items()}


def diff(
    base: Annotated[Path, typer.Argument(help="Base checkpoint m_s (HF folder, safetensors).")],
    tuned: Annotated[
        Path,
        typer.Argument(
            help="Its fine-tuned version m′_s (same architecture and shapes), or a PEFT LoRA adapter folder "
            "trained on BASE (adapter_config.json + adapter_model.safetensors)."
        ),
    ],
    output: OutOpt,
    dtype: Annotated[
        str,
        typer.Option(
            help="Storage dtype of Δ: auto (the inputs' bf16/fp16, else float32), float32, bfloat16 or float16. "
            "Always exact: what the dtype cannot hold is kept in a sparse float32 residual."
        ),
    ] = "auto",
    shard_size: ShardOpt = "5GB",
    max_relative_norm: MaxNormOpt = 0.5,
    hash_inputs: Annotated[
        bool,
        typer.Option(
            "--hash-inputs",
            help="Fingerprint inputs by hashing every weight byte (slower) instead of their structure.",
        ),
    ] = False,
    allow_other_base: AllowOtherBaseOpt = False,
    as_lora: Annotated[
        bool,
        typer.Option(
            "--as-lora",
            help="Write Δ as a PEFT LoRA adapter for BASE instead (truncated SVD; needs --rank or --energy).",
        ),
    ] = False,
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    track: TrackOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Extract Δ = TUNED − BASE into a verifiable Δ artifact (sharded safetensors + manifest).

    TUNED may be a LoRA adapter: Δ = scale·B·A per adapted module (float32), modules_to_save as
    saved − base; only the tensors the adapter changes are written.
    """
    if as_lora:  # before _engine_threads: the SVDs want every BLAS thread
        from recycler.cli.lora import write_lora
        from recycler.stages.sources import fine_tune_delta

        delta = fine_tune_delta(base, tuned, allow_other_base=allow_other_base)
        write_lora(delta, output, rank, energy, None, base, [base, tuned], overwrite)
        return
    _engine_threads(threads)
    if rank is not None or energy is not None:
        raise typer.BadParameter("--rank and --energy go with --as-lora")
    from recycler.io.checkpoint import open_checkpoint
    from recycler.io.writer import parse_size
    from recycler.registry.runlog import log_json_artifact
    from recycler.registry.runs import maybe_track
    from recycler.stages.extract import diff_checkpoints

    total = open_checkpoint(base).nbytes + input_bytes(tuned)
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
            allow_other_base=allow_other_base,
        )
        log_json_artifact(r.manifest, "delta_manifest.json")
    m = r.manifest
    if "adapter" in m["sources"]:
        a = m["sources"]["adapter"]
        console.print(
            f"  LoRA adapter: {a['lora_modules']} modules (rank {a['ranks']}, scale {a['scales']}), "
            f"{len(a['modules_to_save'])} saved whole; Δ stored as float32, {m['tensor_count']} tensors"
        )
        console.print(f"  ‖Δ‖/‖base‖ (adapted matrices) = {m['relative_norms'].get('matrices', 0.0):.4g}")
        out.print(f"wrote {r.path}")
        return
    res, rt = m["residual"], m["roundtrip"]
    console.print(
        f"  ‖Δ‖/‖base‖ (matrices) = {m['relative_norms'].get('matrices', 0.0):.4g}, {m['tensor_count']} tensors"
    )
    console.print(
        f"  stored as {m['dtype']} + residual: {res['exceptions']:,} exceptions "
        f"({100 * res['exception_rate']:.3f}%), {res['roundtrip_fixes']:,} round-trip fixes"
    )
    unchecked = (
        f" ({len(rt['unchecked_tensors'])} tensors of mixed, float64 or FP8 dtypes unchecked)"
        if not rt["exact"]
        else ""
    )
    console.print(f"  round trip exact: {rt['exact']}{unchecked}")
    out.print(f"wrote {r.path}")


def apply(
    target: Annotated[
        Path, typer.Argument(help="Target base m_t: a newer (recycling) or older (backporting) base version.")
    ],
    deltas: Annotated[
        list[Path],
        typer.Argument(
            help="Δ artifact(s) written by `recycler diff`, or LoRA adapter folders (their scale·B·A). "
            "Several compose: TARGET + Σ α_i·Δ_i, rounded once."
        ),
    ],
    output: OutOpt,
    alpha: Annotated[
        list[float] | None,
        typer.Option(
            "--alpha",
            "-a",
            help="Scale of Δ: output = target + α·Δ (1.0 as in the paper). With several Δs: once for all, "
            "or once per Δ in order.",
        ),
    ] = None,
    alpha_rule: Annotated[
        list[str] | None,
        typer.Option(
            "--alpha-rule",
            help="α for some tensors: [N:]SELECTOR=ALPHA, SELECTOR a family (embed, lm_head, attention, mlp, "
            "norm, other), layers:A-B or a name glob, '+' for 'and'; N limits it to Δ number N. The last "
            "matching rule wins; α = 0 leaves a tensor as the target has it. Repeatable.",
        ),
    ] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    only_in_delta: OnlyInDeltaOpt = "error",
    vocab: VocabOpt = "auto",
    tokenizer_from: TokOpt = "auto",
    shard_size: ShardOpt = "5GB",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    track: TrackOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Write TARGET + α·Δ (or TARGET + Σ α_i·Δ_i) as a checkpoint that loads with from_pretrained."""
    _engine_threads(threads)
    from recycler.stages.apply import apply_diff
    from recycler.stages.compose import compose, parse_rule
    from recycler.stages.sources import applied_delta

    alphas = alpha or [1.0]
    if len(alphas) not in (1, len(deltas)):
        raise typer.BadParameter(f"{len(alphas)} --alpha values for {len(deltas)} Δs: give one, or one per Δ")
    alphas = alphas * len(deltas) if len(alphas) == 1 else alphas
    try:
        rules = [parse_rule(r, len(deltas)) for r in alpha_rule or ()]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    policy = _policy(alphas[0], include, exclude, only_in_delta, vocab, tokenizer_from)
    params = {"target": target, "delta": ",".join(map(str, deltas)), "output": output}
    if len(deltas) == 1 and not rules:  # the one-Δ path: exact round trip at α = 1
        run = lambda **kw: apply_diff(target, deltas[0], output, overwrite=overwrite, **kw)  # noqa: E731
    else:
        inputs = [applied_delta(d) for d in deltas]
        params |= {"alphas": ",".join(f"{a:g}" for a in alphas), "alpha_rules": ";".join(alpha_rule or ())}
        run = lambda **kw: compose(  # noqa: E731
            target, inputs, alphas, rules, output, inputs=list(deltas), overwrite=overwrite, **kw
        )
    _transfer("apply", params, policy, target, shard_size, quiet, track, run)


def recycle(
    base: Annotated[Path, typer.Argument(help="Old base m_s.")],
    tuned: Annotated[
        Path, typer.Argument(help="Its fine-tuned version m′_s, or a PEFT LoRA adapter trained on BASE.")
    ],
    target: Annotated[Path, typer.Argument(help="New base m_t.")],
    output: OutOpt,
    alpha: AlphaOpt = 1.0,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    only_in_delta: OnlyInDeltaOpt = "error",
    vocab: VocabOpt = "auto",
    tokenizer_from: TokOpt = "auto",
    shard_size: ShardOpt = "5GB",
    max_relative_norm: MaxNormOpt = 0.5,
    allow_other_base: AllowOtherBaseOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    track: TrackOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Write TARGET + α·(TUNED − BASE) in one streaming pass, without storing Δ.

    Refused as `diff` refuses (unrelated models, changed non-float tensors). TUNED may be a LoRA adapter.
    """
    _engine_threads(threads)
    from recycler.stages.apply import recycle as run

    policy = _policy(alpha, include, exclude, only_in_delta, vocab, tokenizer_from)
    params = {"base": base, "tuned": tuned, "target": target, "output": output}
    _transfer(
        "recycle",
        params,
        policy,
        target,
        shard_size,
        quiet,
        track,
        lambda **kw: run(
            base,
            tuned,
            target,
            output,
            overwrite=overwrite,
            max_relative_norm=max_relative_norm,
            allow_other_base=allow_other_base,
            **kw,
        ),
    )


def _transfer(
    name: str, params: dict, policy, target: Path, shard_size: str, quiet: bool, track: bool | None, run
) -> None:
    """apply and recycle alike: tracked, with a progress bar over the target's bytes, then the report."""
    from recycler.io.checkpoint import open_checkpoint
    from recycler.io.writer import parse_size
    from recycler.registry.runlog import log_json_artifact
    from recycler.registry.runs import maybe_track

    with (
        maybe_track(name, {**params, **_policy_params(policy)}, enabled=track),
        progress_bar(name, open_checkpoint(target).nbytes, quiet) as tick,
    ):
        r = run(policy=policy, max_shard_bytes=parse_size(shard_size), on_progress=tick)
        log_json_artifact(r.report.model_dump(mode="json"), "compatibility.json")
    for line in r.report.summary_lines():
        console.print(f"  {line}")
    out.print(f"wrote {r.path}")


def register(main: typer.Typer) -> None:
    for command in (diff, apply, recycle):
        main.command()(command)
