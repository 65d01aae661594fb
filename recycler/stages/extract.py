"""Extract Δ = fine-tuned − base as a verifiable artifact, streaming tensor by tensor.

The artifact is an HF-style folder: sharded safetensors of Δ (+ index), the fine-tuned source's
tokenizer, chat template and generation config (needed to align vocabularies and to give an applied
model its chat template), both source configs, and manifest.json written last.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recycler.delta.compat import compare_tensor_sets
from recycler.delta.kernels import roundtrip_checked
from recycler.delta.vocab import tokenizer_fingerprint
from recycler.errors import IncompatibleCheckpoints
from recycler.io.adapter import is_adapter
from recycler.io.atomic import atomic_folder
from recycler.io.checkpoint import Checkpoint, load_vocab, open_checkpoint
from recycler.io.layout import SHARD_NAME
from recycler.io.manifest import fingerprint, write_manifest
from recycler.io.reader import WINDOW, compute_threads
from recycler.io.residual import ResidualSpill, describe
from recycler.io.writer import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedWriter
from recycler.stages.adapter_diff import diff_adapter
from recycler.stages.engine import stream_diff
from recycler.stages.pair_checks import (
    DEFAULT_MAX_RELATIVE_NORM,
    check_related,
    refuse_changed_non_float,
    relative_norms,
)

# Storage dtype of Δ. "auto": the inputs' dtype when both are bf16 or fp16 (half the bytes of float32),
# float32 otherwise. Every choice is exact: what the stored dtype cannot hold goes into the residual.
DELTA_DTYPES = {"auto": None, "float32": "F32", "bfloat16": "BF16", "float16": "F16"}
DTYPE_LABELS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

Progress = Callable[[int], None]


@dataclass(frozen=True)
class DiffResult:
    path: Path
    manifest: dict


def store_dtype(choice: str, base_dtype: str, tuned_dtype: str) -> str:
    """The dtype a Δ tensor is stored in (see DELTA_DTYPES)."""
    if DELTA_DTYPES[choice] is not None:
        return DELTA_DTYPES[choice]
    return base_dtype if base_dtype == tuned_dtype and base_dtype in ("BF16", "F16") else "F32"


def diff_checkpoints(
    base_path: Path,
    tuned_path: Path,
    out: Path,
    *,
    dtype: str = "auto",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_relative_norm: float = DEFAULT_MAX_RELATIVE_NORM,
    overwrite: bool = False,
    hash_inputs: bool = False,
    base_id: str | None = None,
    tuned_id: str | None = None,
    on_progress: Progress | None = None,
    allow_other_base: bool = False,
) -> DiffResult:
    """Write Δ = tuned − base to `out`, atomically: stored in `dtype` plus the residual that makes it exact.

    Raises InvalidCheckpoint / IncompatibleCheckpoints before any computation, NonFiniteValues on
    NaN/Inf inputs, UnrelatedModels when ‖Δ‖/‖base‖ exceeds `max_relative_norm`; `out` is then absent.
    The manifest depends on content only: ids appear only when given (`base_id`, `tuned_id`).
    `tuned_path` may be a PEFT LoRA adapter folder (`recycler.stages.adapter_diff`).
    """
    if is_adapter(tuned_path):
        manifest = diff_adapter(
            open_checkpoint(base_path),
            tuned_path,
            out,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
            allow_other_base=allow_other_base,
            base_id=base_id,
            tuned_id=tuned_id,
            hash_inputs=hash_inputs,
            on_progress=on_progress,
        )
        return DiffResult(Path(out), manifest)
    if dtype not in DELTA_DTYPES:
        raise ValueError(f"unsupported Δ dtype {dtype!r}; choose one of {sorted(DELTA_DTYPES)}")
    base, tuned = open_checkpoint(base_path), open_checkpoint(tuned_path)
    problems = compare_tensor_sets(base.tensors, tuned.tensors)
    if problems:
        raise IncompatibleCheckpoints(f"cannot diff {tuned.path} against {base.path}: " + "; ".join(problems))
    skipped = refuse_changed_non_float(base, tuned)  # equal in both: nothing is dropped
    names = [n for n, e in base.tensors.items() if e.is_float]
    plan = [
        PlannedTensor(
            n, store_dtype(dtype, base.tensors[n].dtype, tuned.tensors[n].dtype), base.tensors[n].shape
        )
        for n in names
    ]

    with atomic_folder(out, [base.path, tuned.path], overwrite=overwrite) as tmp:
        spill = ResidualSpill(tmp)
        with compute_threads() as workers:
            writer = ShardedWriter(tmp, plan, max_shard_bytes, pool=WINDOW + 3, lanes=workers, sidecar=spill)
            try:
                totals = stream_diff(base, tuned, plan, writer, on_progress, workers)
                digests = writer.close()
            except BaseException:
                writer.abort()
                raise
        norms = relative_norms({n: tuple(v) for n, v in totals.sumsq.items()}, base.tensors, names)
        check_related(norms, max_relative_norm, base.path, tuned.path)
        _copy_side_files(base, tuned, tmp)
        residual = describe(spill, sum(base.tensors[n].numel for n in names))
        residual["files"] = sorted(k for k in digests if k.startswith("residual/"))
        body = {
            "kind": "diff",
            **_contents(base, tuned, plan, skipped),
            "sources": {
                "base": _source(base, base_id, hash_inputs),
                "tuned": _source(tuned, tuned_id, hash_inputs),
            },
            "relative_norms": norms,
            "residual": residual,
            "roundtrip": _roundtrip(base, tuned, names, residual),
        }
        manifest = write_manifest(tmp, body, dict(digests))
    return DiffResult(Path(out), manifest)


def _contents(base: Checkpoint, tuned: Checkpoint, plan: list[PlannedTensor], skipped: list[str]) -> dict:
    stored = sorted({t.dtype for t in plan})
    return {
        "dtype": DTYPE_LABELS[stored[0]] if len(stored) == 1 else "mixed",
        "tensor_count": len(plan),
        "skipped_non_float": skipped,
        "vocab_size": tuned.vocab_size,
        "tied_embeddings": tuned.tied_embeddings,
        "tokenizer_fingerprint": tokenizer_fingerprint(load_vocab(tuned.path)),
        "base_tokenizer_fingerprint": tokenizer_fingerprint(load_vocab(base.path)),
    }


def _roundtrip(base: Checkpoint, tuned: Checkpoint, names: list[str], residual: dict) -> dict:
    """The round trip is exact for every tensor the residual could check (one 16/32-bit float dtype)."""
    unchecked = [n for n in names if not roundtrip_checked(base.tensors[n].dtype, tuned.tensors[n].dtype)]
    return {
        "exact": not unchecked,
        "mismatched_elements": 0,
        "fixed_elements": residual["roundtrip_fixes"],
        "unchecked_tensors": unchecked,
    }


def _copy_side_files(base: Checkpoint, tuned: Checkpoint, tmp: Path) -> None:
    for f in tuned.side_files():
        shutil.copy2(f, tmp / f.name)
    for role, ck in (("base", base), ("tuned", tuned)):
        if (ck.path / "config.json").is_file():
            shutil.copy2(ck.path / "config.json", tmp / f"{role}_config.json")


def _source(ck: Checkpoint, ident: str | None, full: bool) -> dict:
    """What the manifest says about an input: its content, never where it was (no path, no folder name)."""
    src = {
        "fingerprint": fingerprint(ck, full=full),
        "model_type": (ck.config or {}).get("model_type"),
        "dtypes": sorted({e.dtype for e in ck.tensors.values()}),
        "vocab_size": ck.vocab_size,
    }
    if ck.manifest is not None:  # the weights' sha256, free from the manifest: a copy without it matches
        files = ck.manifest.get("files") or {}
        src["weights"] = {rel: f["sha256"] for rel, f in sorted(files.items()) if SHARD_NAME.match(rel)}
    return {"id": ident, **src} if ident else src
