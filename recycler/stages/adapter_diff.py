"""`recycler diff BASE ADAPTER`: the Δ of a PEFT LoRA adapter as a Δ artifact like any other.

Only the tensors the adapter changes are written (a sparse Δ: applying it leaves every other tensor of
the target as it is, and the compatibility report lists them). Values are float32: scale·B·A is not a
16-bit number, so a 16-bit store would put nearly every element into the residual.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from recycler.delta.bits import widen
from recycler.delta.math import tensor_family
from recycler.delta.vocab import tokenizer_fingerprint
from recycler.io.atomic import atomic_folder
from recycler.io.checkpoint import Checkpoint, load_vocab
from recycler.io.manifest import fingerprint, write_manifest
from recycler.io.reader import WINDOW, ChunkReader, chunk_ranges, compute_threads, interleave, ordered_map
from recycler.io.writer import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedWriter
from recycler.stages.sources import DeltaInputs, adapter_delta

ADAPTER_DTYPES = ("auto", "float32")


def diff_adapter(
    base: Checkpoint,
    adapter_path: Path,
    out: Path,
    *,
    dtype: str = "auto",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    allow_other_base: bool = False,
    base_id: str | None = None,
    tuned_id: str | None = None,
    hash_inputs: bool = False,
    on_progress=None,
) -> dict:
    """Write the adapter's Δ relative to `base` (checked: shapes and recorded base name); returns the
    manifest. Raises IncompatibleCheckpoints / InvalidCheckpoint before anything is written."""
    if dtype not in ADAPTER_DTYPES:
        raise ValueError(f"a LoRA adapter's Δ is stored as float32 (--dtype auto or float32), not {dtype!r}")
    delta = adapter_delta(adapter_path, base.path, allow_other_base=allow_other_base)
    names = [n for n in base.tensors if n in delta.side.tensors]  # base order: sequential reads
    plan = [PlannedTensor(n, "F32", base.tensors[n].shape) for n in names]
    with atomic_folder(out, [base.path, Path(adapter_path)], overwrite=overwrite) as tmp:
        with compute_threads() as workers:  # no residual: float32 holds every value
            writer = ShardedWriter(tmp, plan, max_shard_bytes, pool=WINDOW + 3, lanes=workers)
            try:
                sumsq = _stream(base, delta, plan, writer, on_progress, workers)
                digests = writer.close()
            except BaseException:
                writer.abort()
                raise
        _copy_side_files(base, delta, Path(adapter_path), tmp)
        src = {
            "fingerprint": fingerprint(base, full=hash_inputs),
            "model_type": (base.config or {}).get("model_type"),
        }
        adapter = {"id": tuned_id, **delta.provenance["adapter"]} if tuned_id else delta.provenance["adapter"]
        body = {
            "kind": "diff",
            "dtype": "float32",
            "tensor_count": len(plan),
            "skipped_non_float": [],
            "vocab_size": base.vocab_size,
            "tied_embeddings": base.tied_embeddings,
            "tokenizer_fingerprint": tokenizer_fingerprint(load_vocab(delta.side_folder)),
            "base_tokenizer_fingerprint": tokenizer_fingerprint(load_vocab(base.path)),
            "sources": {
                "base": {"id": base_id, **src} if base_id else src,
                "adapter": adapter,
            },
            "relative_norms": _relative_norms(sumsq, base, names),
            "residual": None,
            "roundtrip": {
                "exact": False,
                "mismatched_elements": 0,
                "fixed_elements": 0,
                "unchecked_tensors": [],
                "adapter": "Δ = float32(scale·B·A) from the adapter's factors (computed in float64, rounded "
                "once); modules_to_save as saved − base, exactly",
            },
        }
        return write_manifest(tmp, body, dict(digests))


def _stream(
    base: Checkpoint,
    delta: DeltaInputs,
    plan: list[PlannedTensor],
    writer: ShardedWriter,
    on_progress,
    workers,
) -> dict[str, list[float]]:
    """Every planned Δ tensor chunk by chunk into `writer`; Σd² and Σbase² per tensor, in chunk order."""
    chunks = ChunkReader()
    make = delta.open(chunks)
    sources = [make(t.name) for t in plan]

    def compute(item: tuple[int, int, int]):
        i, start, count = item
        buf = writer.buffer()
        d = buf[: 4 * count].view(np.float32)
        sources[i].read_f32(start, count, d)
        entry = base.tensors[plan[i].name]
        b = widen(chunks.raw(entry, start, count, "base"), entry.dtype, chunks.scratch("b32", count))
        return item, buf, float(np.dot(d, d)), float(np.dot(b, b))

    lanes = [
        ((i, s, c) for i in lane for s, c in chunk_ranges(math.prod(plan[i].shape)))
        for lane in writer.lane_order()
    ]
    sumsq: dict[str, list[float]] = {}
    try:
        for (i, _, count), buf, sd, sb in ordered_map(
            compute, interleave(lanes), workers=workers, window=WINDOW
        ):
            writer.submit(i, buf, 4 * count)
            s = sumsq.setdefault(plan[i].name, [0.0, 0.0])
            s[0], s[1] = s[0] + sd, s[1] + sb
            if on_progress:
                on_progress(4 * count)
    finally:
        chunks.close()
    return sumsq


def _relative_norms(sumsq: dict[str, list[float]], base: Checkpoint, names: list[str]) -> dict[str, float]:
    """‖Δ‖/‖base‖ per family, over the adapted tensors (summed in plan order: the same bytes every run)."""
    sq: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name in names:
        sd, sb = sumsq.get(name, (0.0, 0.0))
        keys = (tensor_family(name), "total") + (("matrices",) if len(base.tensors[name].shape) >= 2 else ())
        for key in keys:
            sq[key][0] += sd
            sq[key][1] += sb
    return {k: math.sqrt(d) / max(math.sqrt(b), 1e-30) for k, (d, b) in sorted(sq.items())}


def _copy_side_files(base: Checkpoint, delta: DeltaInputs, adapter: Path, tmp: Path) -> None:
    """The tokenizer the fine-tune used (the adapter's if it has one, else its base's) and both configs;
    the adapter's config under another name, so the Δ folder is not mistaken for an adapter."""
    src = delta.side_folder
    for f in Checkpoint(src, {}, None).side_files():
        shutil.copy2(f, tmp / f.name)
    if (base.path / "config.json").is_file():
        shutil.copy2(base.path / "config.json", tmp / "base_config.json")
    shutil.copy2(adapter / "adapter_config.json", tmp / "source_adapter_config.json")
