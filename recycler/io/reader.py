"""Chunked reads of tensors on disk, and the Δ sources the engine adds to a target chunk by chunk.

Reads are `pread`s into reusable per-thread buffers (numpy, no torch: the Δ commands start in a
fraction of a second). A Δ source yields, for elements [start, start+count) of one tensor, the block
provider the kernels consume (`recycler.delta.kernels`): a stored Δ with its residual, a (base,
fine-tuned) pair computed on the fly, or rows re-indexed through a vocabulary `RowMap`. Memory is a
handful of chunk buffers whatever the tensor or model size.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from recycler.delta.bits import carrier
from recycler.delta.kernels import Blocks, DenseBlocks, PairBlocks, Scratch, StoredBlocks
from recycler.delta.residual import EMPTY, ChunkResidual
from recycler.delta.vocab import RowMap, row_runs
from recycler.errors import InvalidCheckpoint
from recycler.io.direct import DirectReads, aligned_buffer, open_for_reads, pread_into
from recycler.io.safetensors import TensorEntry
from recycler.io.writer import (
    CHUNK_ELEMS,  # 1M elements: 2 MiB reads of bf16 (pread is fastest from ~2 MiB up)
)

T = TypeVar("T")
R = TypeVar("R")

WINDOW = 4  # chunks in flight between the compute threads and the writer


class ChunkReader:
    """Reads chunks of tensors with pread into reusable per-thread slot buffers.

    Resident memory is the slot buffers, whatever the checkpoint size. pread with MiB-sized blocks
    moves page-cached data at ~5 GB/s here, where touching a memory map faults at ~1 GB/s; bytes not in
    the page cache are read with O_DIRECT (`recycler.io.direct.pread_into`). A view returned for a
    slot is valid until the next read into the same slot on the same thread.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._direct = DirectReads()  # what is not in the page cache is read around it
        self._open_lock = threading.Lock()
        self._local = threading.local()  # buffers are per thread; file descriptors are shared (pread)

    def scratch(self, slot: str, count: int, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """A reusable per-thread buffer of `count` elements."""
        bufs = self._local.__dict__.setdefault("scratch", {})
        key = (slot, np.dtype(dtype))
        buf = bufs.get(key)
        if buf is None or len(buf) < count:
            n = max(count, CHUNK_ELEMS)  # page-aligned, so O_DIRECT reads land in it without a copy
            buf = bufs[key] = aligned_buffer(n * np.dtype(dtype).itemsize).view(dtype)
        return buf[:count]

    def kernels(self) -> Scratch:
        """This thread's warm block buffers for `recycler.delta.kernels`."""
        sc = self._local.__dict__.get("kernels")
        if sc is None:
            sc = self._local.kernels = Scratch()
        return sc

    def raw(self, entry: TensorEntry, start: int, count: int, slot: str) -> np.ndarray:
        """Elements [start, start+count) of `entry` in its carrier dtype (bf16 as uint16 bits)."""
        dtype = carrier(entry.dtype)
        if start < 0 or start + count > entry.numel:
            raise ValueError(f"chunk [{start}, {start + count}) outside tensor {entry.name}")
        view = self.scratch(f"raw:{slot}", count * dtype.itemsize, np.uint8)
        self._read(entry, entry.start + start * dtype.itemsize, memoryview(view))
        return view.view(dtype)

    def array(self, entry: TensorEntry, start: int, count: int) -> np.ndarray:
        """Elements [start, start+count) of `entry` in a fresh array (small reads: residuals, tables)."""
        dtype = carrier(entry.dtype)
        if start < 0 or count < 0 or start + count > entry.numel:
            raise InvalidCheckpoint(
                f"{entry.file}: read [{start}, {start + count}) outside tensor {entry.name!r}"
            )
        out = np.empty(count, dtype)
        self._read(entry, entry.start + start * dtype.itemsize, memoryview(out.view(np.uint8)))
        return out

    def _read(self, entry: TensorEntry, offset: int, into: memoryview) -> None:
        fd = self._fds.get(entry.file)
        if fd is None:
            with self._open_lock:
                fd = self._fds.get(entry.file)
                if fd is None:
                    fd = self._fds[entry.file] = open_for_reads(entry.file)
        if pread_into(fd, entry.file, offset, into, self._direct) < len(into):
            raise InvalidCheckpoint(f"{entry.file}: file shrank while reading tensor {entry.name!r}")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._direct.close()


class ResidualSource(Protocol):
    def chunk(self, name: str, start: int, count: int) -> ChunkResidual: ...


class DeltaSource(Protocol):
    numel: int

    def blocks(self, start: int, count: int) -> Blocks:
        """The Δ of elements [start, start+count), as the kernels' block provider."""
        ...

    def read_f32(self, start: int, count: int, out: np.ndarray) -> None:
        """Fill `out` (float32, `count` elements) with the float32 Δ of elements [start, start+count)."""
        ...


def decode_into(blocks: Blocks, out: np.ndarray, sc: Scratch) -> None:
    """The float32 Δ of a whole chunk into `out`."""
    for s in range(0, len(out), sc.block):
        e = min(s + sc.block, len(out))
        w = blocks.fill(s, e, out[s:e], sc)
        if not np.may_share_memory(w, out):  # a view of the input (float32 Δ): copy it over
            np.copyto(out[s:e], w)


class StoredDelta:
    """A tensor of a Δ artifact: the stored values, patched by its residual (ΔR) if there is one."""

    def __init__(self, chunks: ChunkReader, entry: TensorEntry, residual: ResidualSource | None = None):
        self.chunks, self.entry, self.residual, self.numel = chunks, entry, residual, entry.numel

    def blocks(self, start: int, count: int, slot: str = "delta") -> StoredBlocks:
        res = self.residual.chunk(self.entry.name, start, count) if self.residual is not None else EMPTY
        return StoredBlocks(self.chunks.raw(self.entry, start, count, slot), self.entry.dtype, res)

    def read_f32(self, start: int, count: int, out: np.ndarray) -> None:
        decode_into(self.blocks(start, count), out, self.chunks.kernels())


class PairDelta:
    """Δ = tuned − base computed on the fly (recycling in one pass: no Δ artifact is written)."""

    def __init__(self, chunks: ChunkReader, base: TensorEntry, tuned: TensorEntry):
        self.chunks, self.base, self.tuned, self.numel = chunks, base, tuned, base.numel

    def blocks(self, start: int, count: int) -> PairBlocks:
        b = self.chunks.raw(self.base, start, count, "base")
        t = self.chunks.raw(self.tuned, start, count, "tuned")
        return PairBlocks(b, self.base.dtype, t, self.tuned.dtype)

    def read_f32(self, start: int, count: int, out: np.ndarray) -> None:
        decode_into(self.blocks(start, count), out, self.chunks.kernels())


class RowMapped:
    """A vocabulary tensor's Δ re-indexed to the target's rows; unmatched rows read as zero."""

    def __init__(self, inner: DeltaSource, rowmap: RowMap, cols: int, chunks: ChunkReader):
        self.inner, self.cols, self.chunks = inner, cols, chunks
        self.numel = len(rowmap.src_rows) * cols
        self._runs = row_runs(rowmap.src_rows)  # (target_row, source_row or -1, length)
        self._starts = [r[0] * cols for r in self._runs]

    def blocks(self, start: int, count: int) -> DenseBlocks:
        out = self.chunks.scratch("rowmapped", count)
        self.read_f32(start, count, out)
        return DenseBlocks(out)

    def read_f32(self, start: int, count: int, out: np.ndarray) -> None:
        i = bisect.bisect_right(self._starts, start) - 1
        pos, end = start, start + count
        while pos < end:
            trow, srow, length = self._runs[i]
            n = min(end, (trow + length) * self.cols) - pos
            dst = out[pos - start : pos - start + n]
            if srow < 0:
                dst.fill(0)
            else:
                self.inner.read_f32(srow * self.cols + (pos - trow * self.cols), n, dst)
            pos += n
            i += 1


def cores() -> int:
    return len(os.sched_getaffinity(0))


THREADS_ENV = "RECYCLER_THREADS"  # set by the Δ commands' --threads


@contextlib.contextmanager
def compute_threads() -> Iterator[int]:
    """Chunk workers (and writer lanes) to use: $RECYCLER_THREADS, else one per core up to 4. Each
    kernel call is single-threaded and releases the GIL, so parallelism is across chunks (of one
    tensor too); sha256 and writes run on the writer's lane threads beside them. The bytes written do
    not depend on this number."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        yield min(4, cores())
        return
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: expected a positive number of threads")
    yield int(value)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, window: int) -> Iterator[R]:
    """`map(fn, items)` on `workers` threads, results in order, at most `window` items in flight.

    numpy ufuncs, pread, write and sha256 all release the GIL, so chunks computed on two threads
    use two cores; the bounded window keeps memory at a few chunks and cannot starve the writer.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunk") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def chunk_ranges(numel: int, chunk: int = CHUNK_ELEMS) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, chunk):
        yield start, min(chunk, numel - start)


def interleave(lanes: list[Iterable[T]]) -> Iterator[T]:
    """Items of several lanes in turn (one from each), each lane's in its own order."""
    iters = [iter(lane) for lane in lanes]
    while iters:
        for it in list(iters):
            try:
                yield next(it)
            except StopIteration:
                iters.remove(it)
