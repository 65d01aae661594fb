"""Checks that a (base, fine-tuned) pair can give a Δ at all, shared by `diff` and the one-pass
`recycle` so that the two never disagree about what they accept.

* Relatedness: ‖Δ‖/‖base‖ over weight matrices above `max_relative_norm` means the inputs are not
  base and fine-tune of one model (exit code 5). `diff` measures it while writing Δ; `recycle`
  measures the blocks it streams anyway (`MeasuredPair`) and, before publishing, the tensors it did
  not stream whole (excluded, re-mapped vocabulary rows, a Δ the target does not take).
* Non-float tensors (integer buffers, int8-quantised weights) are not diffed: a Δ covers floating-
  point tensors (FP8 included, which widens exactly to float32). One that differs between base and
  fine-tune would keep the base's values after apply, so it is refused, naming it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from recycler.delta.bits import widen
from recycler.delta.kernels import PairBlocks, Scratch
from recycler.delta.math import tensor_family
from recycler.errors import IncompatibleCheckpoints, UnrelatedModels
from recycler.io.checkpoint import Checkpoint
from recycler.io.reader import ChunkReader, PairDelta, chunk_ranges, decode_into
from recycler.io.safetensors import TensorEntry

DEFAULT_MAX_RELATIVE_NORM = 0.5  # fine-tunes measure 1e-3..1e-1; unrelated inits measure ≈ √2

Sums = dict[str, tuple[float, float]]  # tensor name → (Σd32², Σbase²)


def relative_norms(sumsq: Sums, tensors: dict[str, TensorEntry], names: Iterable[str]) -> dict[str, float]:
    """‖Δ‖/‖base‖ per tensor family, over all tensors and over matrices; summed in `names` order (not in
    the order chunks arrived, which depends on the number of lanes), so the bytes never change."""
    sq: dict[str, dict[str, float]] = {"delta": defaultdict(float), "base": defaultdict(float)}
    for name in names:
        sd, sb = sumsq.get(name, (0.0, 0.0))
        keys = (tensor_family(name), "total") + (("matrices",) if len(tensors[name].shape) >= 2 else ())
        for key in keys:
            sq["delta"][key] += sd
            sq["base"][key] += sb
    return {
        fam: math.sqrt(sq["delta"][fam]) / max(math.sqrt(sq["base"][fam]), 1e-30)
        for fam in sorted(sq["delta"])
    }


def check_related(norms: dict[str, float], limit: float, base: Path, tuned: Path) -> None:
    """Judge relatedness on weight matrices: norm/bias vectors (≈1 and ≈0) would dilute or inflate it."""
    total = norms.get("matrices", norms.get("total", 0.0))
    if total > limit:
        raise UnrelatedModels(
            f"‖Δ‖/‖base‖ = {total:.3f} exceeds {limit} ({tuned} does not look like a fine-tune "
            f"of {base}); pass --max-relative-norm to override"
        )


def refuse_changed_non_float(base: Checkpoint, tuned: Checkpoint) -> list[str]:
    """The non-float tensors (all equal in both); IncompatibleCheckpoints naming any that differ."""
    skipped = [n for n, e in base.tensors.items() if not e.is_float]
    chunks = ChunkReader()
    try:
        changed = [n for n in skipped if not _same_bytes(chunks, base.tensors[n], tuned.tensors[n])]
    finally:
        chunks.close()
    if changed:
        dtypes = sorted({base.tensors[n].dtype for n in changed})
        raise IncompatibleCheckpoints(
            f"{tuned.path}: {len(changed)} non-float tensor(s) ({', '.join(dtypes)}) differ from {base.path}: "
            f"{changed[:10]}; a Δ covers floating-point tensors only, so applying it would keep the base's "
            "values. Dequantize both checkpoints (e.g. to bfloat16) and diff those"
        )
    return skipped


def _same_bytes(chunks: ChunkReader, a: TensorEntry, b: TensorEntry) -> bool:
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    for start, count in chunk_ranges(a.numel):
        x = chunks.raw(a, start, count, "a").view(np.uint8)
        if not np.array_equal(x, chunks.raw(b, start, count, "b").view(np.uint8)):
            return False
    return True


# ---- recycle: measured while streaming -------------------------------------------------------------------


class MeasuredBlocks(PairBlocks):
    """Pair blocks that record Σd32² and Σbase² of every block they produce (the numpy kernels) or of
    the whole chunk (the fused kernel, in the same pass as the output), keyed by position, so a chunk
    read twice (a tied head fed by the embedding's Δ) counts once."""

    measure = True

    def __init__(self, base, bdt, tuned, tdt, name: str, start: int, tally: dict):
        super().__init__(base, bdt, tuned, tdt)
        self.name, self.start, self.tally = name, start, tally

    def record(self, sumsq_delta: float, sumsq_base: float) -> None:
        self.tally[(self.name, self.start)] = (len(self.base), sumsq_delta, sumsq_base)

    def fill(self, s: int, e: int, w: np.ndarray, sc: Scratch) -> np.ndarray:
        d = super().fill(s, e, w, sc)
        b = widen(self.base[s:e], self.bdt, sc.b[: e - s])
        with np.errstate(over="ignore", invalid="ignore"):
            self.tally[(self.name, self.start + s)] = (e - s, float(np.dot(d, d)), float(np.dot(b, b)))
        return d


class MeasuredPair(PairDelta):
    """`PairDelta` whose whole-chunk blocks are measured; re-mapped rows (read_f32) are not."""

    def __init__(self, chunks: ChunkReader, base: TensorEntry, tuned: TensorEntry, tally: dict):
        super().__init__(chunks, base, tuned)
        self.tally = tally

    def blocks(self, start: int, count: int) -> MeasuredBlocks:
        b = self.chunks.raw(self.base, start, count, "base")
        t = self.chunks.raw(self.tuned, start, count, "tuned")
        return MeasuredBlocks(b, self.base.dtype, t, self.tuned.dtype, self.base.name, start, self.tally)

    def read_f32(self, start: int, count: int, out: np.ndarray) -> None:
        decode_into(PairDelta.blocks(self, start, count), out, self.chunks.kernels())


def pair_sums(base: Checkpoint, tuned: Checkpoint, names: Iterable[str], tally: dict) -> Sums:
    """Σd32², Σbase² per tensor: from `tally` where the stream covered a tensor whole, else read now."""
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for (name, _), (n, dd, bb) in sorted(tally.items()):
        acc = per[name]
        acc[0], acc[1], acc[2] = acc[0] + n, acc[1] + dd, acc[2] + bb
    out: Sums = {}
    chunks, sc = ChunkReader(), Scratch()
    try:
        for name in names:
            n, dd, bb = per.get(name, (0, 0.0, 0.0))
            if n != base.tensors[name].numel:
                dd, bb = _measure(chunks, sc, base.tensors[name], tuned.tensors[name])
            out[name] = (dd, bb)
    finally:
        chunks.close()
    return out


def _measure(chunks: ChunkReader, sc: Scratch, eb: TensorEntry, et: TensorEntry) -> tuple[float, float]:
    dd = bb = 0.0
    for start, count in chunk_ranges(eb.numel):
        blocks = MeasuredBlocks(
            chunks.raw(eb, start, count, "base"), eb.dtype, chunks.raw(et, start, count, "tuned"), et.dtype,
            eb.name, start, tally := {},
        )  # fmt: skip
        decode_into(blocks, chunks.scratch("d", count), sc)
        dd += sum(v[1] for v in tally.values())
        bb += sum(v[2] for v in tally.values())
    return dd, bb
