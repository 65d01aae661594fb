"""Extract Δ = fine-tuned − base as a verifiable artifact, streaming tensor by tensor.

The artifact is an HF-style folder: sharded safetensors of Δ (+ index), the fine-tuned source's
tokenizer, chat template and generation config (needed to align vocabularies and to give an applied
model its chat template), both source configs, and manifest.json written last.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from recycler.delta.compat import compare_tensor_sets
from recycler.delta.math import diff_into, roundtrip_mismatches, squared_norm, tensor_family
from recycler.delta.vocab import tokenizer_fingerprint
from recycler.errors import IncompatibleCheckpoints, UnrelatedModels
from recycler.io.atomic import atomic_folder
from recycler.io.checkpoint import Checkpoint, load_vocab, open_checkpoint
from recycler.io.manifest import fingerprint, write_manifest
from recycler.io.reader import (
    DTYPE_NAMES,
    DTYPES,
    WINDOW,
    ChunkReader,
    check_finite,
    chunk_ranges,
    compute_threads,
    ordered_map,
)
from recycler.io.writer import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedWriter

DELTA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_RELATIVE_NORM = 0.5  # fine-tunes measure 1e-3..1e-1; unrelated inits measure ≈ √2

Progress = Callable[[int], None]


@dataclass(frozen=True)
class DiffResult:
    path: Path
    manifest: dict


def diff_checkpoints(
    base_path: Path,
    tuned_path: Path,
    out: Path,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_relative_norm: float = DEFAULT_MAX_RELATIVE_NORM,
    overwrite: bool = False,
    hash_inputs: bool = False,
    base_id: str | None = None,
    tuned_id: str | None = None,
    on_progress: Progress | None = None,
) -> DiffResult:
    """Write Δ = tuned − base (computed in float32, stored as `dtype`) to `out`, atomically.

    Raises InvalidCheckpoint / IncompatibleCheckpoints before any computation, NonFiniteValues on
    NaN/Inf inputs, UnrelatedModels when ‖Δ‖/‖base‖ exceeds `max_relative_norm`; `out` is then absent.
    """
    if dtype not in DELTA_DTYPES:
        raise ValueError(f"unsupported Δ dtype {dtype!r}; choose one of {sorted(DELTA_DTYPES)}")
    base, tuned = open_checkpoint(base_path), open_checkpoint(tuned_path)
    problems = compare_tensor_sets(base.tensors, tuned.tensors)
    if problems:
        raise IncompatibleCheckpoints(f"cannot diff {tuned.path} against {base.path}: " + "; ".join(problems))
    out_dtype = DELTA_DTYPES[dtype]
    names = [n for n, e in base.tensors.items() if e.is_float]
    skipped = [n for n, e in base.tensors.items() if not e.is_float]
    plan = [PlannedTensor(n, DTYPE_NAMES[out_dtype], base.tensors[n].shape) for n in names]

    with atomic_folder(out, [base.path, tuned.path], overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard_bytes, pool=WINDOW + 3)
        try:
            with compute_threads() as workers:
                stats = _stream_diff(base, tuned, names, out_dtype, writer, on_progress, workers)
            digests = writer.close()
        except BaseException:
            writer.abort()
            raise
        norms = {
            fam: math.sqrt(stats["delta"][fam]) / max(math.sqrt(stats["base"][fam]), 1e-30)
            for fam in sorted(stats["delta"])
        }
        # Judge relatedness on weight matrices: norm/bias vectors (≈1 and ≈0) would dilute or inflate it.
        total = norms.get("matrices", norms.get("total", 0.0))
        if total > max_relative_norm:
            raise UnrelatedModels(
                f"‖Δ‖/‖base‖ = {total:.3f} exceeds {max_relative_norm} ({tuned.path} does not look like a fine-tune "
                f"of {base.path}); pass --max-relative-norm to override"
            )
        for f in tuned.side_files():
            shutil.copy2(f, tmp / f.name)
        for role, ck in (("base", base), ("tuned", tuned)):
            if (ck.path / "config.json").is_file():
                shutil.copy2(ck.path / "config.json", tmp / f"{role}_config.json")
        tuned_vocab, base_vocab = load_vocab(tuned.path), load_vocab(base.path)
        body = {
            "kind": "diff",
            "dtype": dtype,
            "tensor_count": len(names),
            "skipped_non_float": skipped,
            "sources": {
                "base": _source(base, base_id, hash_inputs),
                "tuned": _source(tuned, tuned_id, hash_inputs),
            },
            "vocab_size": tuned.vocab_size,
            "tied_embeddings": tuned.tied_embeddings,
            "tokenizer_fingerprint": tokenizer_fingerprint(tuned_vocab),
            "base_tokenizer_fingerprint": tokenizer_fingerprint(base_vocab),
            "relative_norms": norms,
            "roundtrip": {"exact": stats["mismatch"] == 0, "mismatched_elements": stats["mismatch"]},
        }
        manifest = write_manifest(tmp, body, {k: v for k, v in digests.items()})
    return DiffResult(Path(out), manifest)


def _source(ck: Checkpoint, ident: str | None, full: bool) -> dict:
    return {
        "id": ident or ck.path.resolve().name,
        "fingerprint": fingerprint(ck, full=full),
        "model_type": (ck.config or {}).get("model_type"),
        "dtypes": sorted({e.dtype for e in ck.tensors.values()}),
        "vocab_size": ck.vocab_size,
    }


def _stream_diff(
    base: Checkpoint,
    tuned: Checkpoint,
    names: list[str],
    out_dtype: torch.dtype,
    writer: ShardedWriter,
    on_progress: Progress | None,
    workers: int = 1,
) -> dict:
    """Chunk loop. Returns per-family Σ‖Δ‖², Σ‖base‖² and the round-trip mismatch count.

    Chunks are computed on `workers` threads but summed in plan order, so the norms recorded in the
    manifest are the same bytes on every run.
    """
    chunks = ChunkReader()
    lossy_store = out_dtype != torch.float32

    def compute(
        item: tuple[str, int, int],
    ) -> tuple[tuple[str, int, int], torch.Tensor, int, float, float, int]:
        name, start, count = item
        eb, et = base.tensors[name], tuned.tensors[name]
        buf = writer.buffer()
        nbytes = count * out_dtype.itemsize
        d = chunks.scratch("delta32", count) if lossy_store else buf[:nbytes].view(out_dtype)
        b = chunks.scratch("base32", count)
        tuned_raw = chunks.raw(et, start, count, "tuned")
        diff_into(chunks.raw(eb, start, count, "base"), tuned_raw, b, d)
        sd, sb = squared_norm(d), squared_norm(b)
        if not (math.isfinite(sd) and math.isfinite(sb)):
            check_finite(chunks.raw(eb, start, count, "base"), f"{eb.file}: tensor {name!r}")
            check_finite(tuned_raw, f"{et.file}: tensor {name!r}")
        if lossy_store:
            buf[:nbytes].view(out_dtype).copy_(d)
        mismatch = 0
        # bf16/fp16 inputs round-trip exactly through a float32 Δ (see recycler.delta.math); check the rest.
        if lossy_store or {"F32", "F64"} & {eb.dtype, et.dtype}:
            mismatch = roundtrip_mismatches(b, tuned_raw, buf[:nbytes].view(out_dtype))
        return item, buf, nbytes, sd, sb, mismatch

    sq: dict[str, dict[str, float]] = {"delta": defaultdict(float), "base": defaultdict(float)}
    mismatch = 0
    items = ((n, start, count) for n in names for start, count in chunk_ranges(base.tensors[n].numel))
    try:
        for (name, _, count), buf, nbytes, sd, sb, mm in ordered_map(
            compute, items, workers=workers, window=WINDOW
        ):
            eb = base.tensors[name]
            keys = (
                (tensor_family(name), "total", "matrices")
                if len(eb.shape) >= 2
                else (tensor_family(name), "total")
            )
            for key in keys:
                sq["delta"][key] += sd
                sq["base"][key] += sb
            mismatch += mm
            writer.submit(buf, nbytes)
            if on_progress:
                on_progress(count * (DTYPES[eb.dtype].itemsize + DTYPES[tuned.tensors[name].dtype].itemsize))
    finally:
        chunks.close()
    return {"delta": dict(sq["delta"]), "base": dict(sq["base"]), "mismatch": mismatch}
