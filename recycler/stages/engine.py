"""The streaming loops of `diff` and `apply`/`recycle`: chunks read, computed by the pure kernels
(`recycler.delta.fast` picks the fused compiled ones or the numpy reference, same bytes) on worker
threads, handed to the shard writer in order. The kernels release the GIL, so chunks of one tensor
are computed on every worker thread at once.

Order: the writer's lanes each own some shards; chunks are generated lane by lane in turn
(`interleave`), so while one lane's thread hashes shard i another hashes shard i+1. Results that go
into a manifest (norms, counts) are accumulated per tensor in chunk order, whatever the interleaving
or the number of cores, so a manifest is the same bytes on every machine with the same kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from recycler.delta.bits import carrier
from recycler.delta.compat import Job
from recycler.delta.fast import choose
from recycler.delta.fp8 import NarrowOverflow
from recycler.delta.kernels import NonFiniteChunk
from recycler.errors import NonFiniteValues
from recycler.io.checkpoint import Checkpoint
from recycler.io.reader import (
    WINDOW,
    ChunkReader,
    DeltaSource,
    RowMapped,
    chunk_ranges,
    interleave,
    ordered_map,
)
from recycler.io.safetensors import TensorEntry, itemsize
from recycler.io.writer import PlannedTensor, ShardedWriter

Progress = Callable[[int], None] | None
Opener = Callable[[ChunkReader], Callable[[str], DeltaSource]]  # per run: Δ tensor name → its source


@dataclass
class DiffTotals:
    """Per Δ tensor: Σd32² and Σbase², summed chunk by chunk in order."""

    sumsq: dict[str, list[float]] = field(default_factory=dict)


def _items(writer: ShardedWriter, numels: list[int]) -> Iterator[tuple[int, int, int]]:
    lanes = [((i, s, c) for i in lane for s, c in chunk_ranges(numels[i])) for lane in writer.lane_order()]
    return interleave(lanes)


def stream_diff(
    base: Checkpoint,
    tuned: Checkpoint,
    plan: list[PlannedTensor],
    writer: ShardedWriter,
    on_progress: Progress,
    workers: int,
) -> DiffTotals:
    """Compute every planned Δ tensor (stored dtype = its plan dtype) into `writer`, residual alongside."""
    chunks = ChunkReader()
    numels = [math.prod(t.shape) for t in plan]
    kernels = choose()

    def compute(item: tuple[int, int, int]):
        i, start, count = item
        t = plan[i]
        eb, et = base.tensors[t.name], tuned.tensors[t.name]
        buf = writer.buffer()
        nbytes = count * itemsize(t.dtype)
        b, f = chunks.raw(eb, start, count, "base"), chunks.raw(et, start, count, "tuned")
        try:
            out = buf[:nbytes].view(carrier(t.dtype))
            dc = kernels.diff_chunk(b, eb.dtype, f, et.dtype, out, t.dtype, chunks.kernels())
        except NonFiniteChunk as e:
            where = {"base": eb.file, "fine-tuned": et.file}.get(e.role, et.file)
            raise NonFiniteValues(
                f"{where}: tensor {t.name!r}: {e.count} NaN/Inf value(s) in the {e.role}; refusing to produce a Δ"
                if e.count
                else f"{where}: tensor {t.name!r}: fine-tuned − base overflows float32"
            ) from None
        return item, buf, nbytes, dc

    totals = DiffTotals()
    try:
        for (i, _, count), buf, nbytes, dc in ordered_map(
            compute, _items(writer, numels), workers=workers, window=max(WINDOW, workers)
        ):
            writer.submit(i, buf, nbytes, dc.residual)
            s = totals.sumsq.setdefault(plan[i].name, [0.0, 0.0])
            s[0] += dc.sumsq_delta
            s[1] += dc.sumsq_base
            if on_progress:
                name = plan[i].name
                on_progress(
                    count * (itemsize(base.tensors[name].dtype) + itemsize(tuned.tensors[name].dtype))
                )
    finally:
        chunks.close()
    return totals


@dataclass
class ApplyJob:
    """One output tensor: the target entry and where its Δ comes from (None: copied unchanged)."""

    entry: TensorEntry
    source: DeltaSource | None
    delta_name: str | None
    exact_roundtrip: bool


def prepare_jobs(
    jobs: list[Job[TensorEntry]], opener: Opener, chunks: ChunkReader, alpha: float
) -> list[ApplyJob]:
    """Attach a Δ source to every planned job. The round-trip fix needs α = 1 and rows in place."""
    out = []
    make = opener(chunks)
    for job in jobs:
        source = make(job.delta_name) if job.delta_name is not None else None
        if source is not None and job.rowmap is not None:
            source = RowMapped(source, job.rowmap, math.prod(job.entry.shape[1:]), chunks)
        out.append(ApplyJob(job.entry, source, job.delta_name, alpha == 1.0 and job.rowmap is None))
    return out


def stream_apply(
    jobs: list[Job[TensorEntry]],
    opener: Opener,
    alpha: float,
    writer: ShardedWriter,
    on_progress: Progress,
    workers: int,
) -> None:
    """Compute target + α·Δ for every job on `workers` threads; hand chunks to the writer in order."""
    chunks = ChunkReader()
    work = prepare_jobs(jobs, opener, chunks, alpha)
    numels = [j.entry.numel for j in work]
    kernels = choose()

    def compute(item: tuple[int, int, int]) -> tuple[int, np.ndarray, int]:
        i, start, count = item
        job = work[i]
        e = job.entry
        buf = writer.buffer()
        nbytes = count * itemsize(e.dtype)
        raw = chunks.raw(e, start, count, "target")
        if not e.is_float or job.source is None:
            np.copyto(buf[:nbytes], raw.view(np.uint8))
            return i, buf, nbytes
        try:
            blocks = job.source.blocks(start, count)
            out = buf[:nbytes].view(carrier(e.dtype))
            kernels.apply_chunk(
                raw, e.dtype, out, blocks, alpha, chunks.kernels(), exact_roundtrip=job.exact_roundtrip
            )
        except NonFiniteChunk as err:
            raise _nonfinite(err, e, job.delta_name) from None
        except NarrowOverflow as err:  # FP8 targets: the kernels' range check covers BF16/F16 only
            raise NonFiniteValues(
                f"{e.file}: tensor {e.name!r}: target + α·Δ overflows {e.dtype} (|value| {err.value:.4g})"
            ) from None
        return i, buf, nbytes

    try:
        for i, buf, nbytes in ordered_map(
            compute, _items(writer, numels), workers=workers, window=max(WINDOW, workers)
        ):
            writer.submit(i, buf, nbytes)
            if on_progress:
                on_progress(nbytes)
    finally:
        chunks.close()


def _nonfinite(err: NonFiniteChunk, e: TensorEntry, delta_name: str | None) -> NonFiniteValues:
    if err.role == "target":
        return NonFiniteValues(f"{e.file}: tensor {e.name!r} has {err.count} NaN/Inf value(s) in the target")
    if err.role == "Δ":
        return NonFiniteValues(f"Δ tensor {delta_name!r} has {err.count} NaN/Inf value(s)")
    return NonFiniteValues(f"{e.file}: tensor {e.name!r}: target + α·Δ overflows {e.dtype}")
