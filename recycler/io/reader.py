"""Chunked float32 views of tensors on disk: the streaming half of the Δ engine.

A `DeltaSource` fills a float32 buffer with elements [start, start+count) of one Δ tensor, read from a
stored Δ, computed on the fly from a (base, fine-tuned) pair, or gathered row by row through a
vocabulary `RowMap`. Memory is a handful of chunk buffers whatever the tensor or model size.
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

import torch

from recycler.delta.vocab import RowMap, row_runs
from recycler.errors import InvalidCheckpoint, NonFiniteValues
from recycler.io.safetensors import TensorEntry

# safetensors dtype name ↔ torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
T = TypeVar("T")
R = TypeVar("R")

CHUNK_ELEMS = (
    1 << 20
)  # 1M elements: 2 MiB reads of bf16 (pread is fastest from ~2 MiB up), 4 MiB float32 in L3


class ChunkReader:
    """Reads chunks of tensors with pread into reusable per-slot buffers.

    Resident memory is the slot buffers, whatever the checkpoint size. pread with MiB-sized blocks
    moves page-cached data at ~5 GB/s here, where touching a memory map faults at ~1 GB/s. A view
    returned for a slot is valid until the next read into the same slot.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._open_lock = threading.Lock()
        self._local = threading.local()  # buffers are per thread; file descriptors are shared (pread)

    def scratch(self, slot: str, count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A reusable per-thread buffer of `count` elements."""
        bufs = self._local.__dict__.setdefault("scratch", {})
        key = (slot, dtype)
        buf = bufs.get(key)
        if buf is None or buf.numel() < count:
            buf = bufs[key] = torch.empty(max(count, CHUNK_ELEMS), dtype=dtype)
        return buf[:count]

    def raw(self, entry: TensorEntry, start: int, count: int, slot: str) -> torch.Tensor:
        """Elements [start, start+count) of `entry` in its own dtype."""
        dtype = DTYPES[entry.dtype]
        if start < 0 or start + count > entry.numel:
            raise ValueError(f"chunk [{start}, {start + count}) outside tensor {entry.name}")
        view = self.scratch(f"raw:{slot}", count * dtype.itemsize, torch.uint8)
        self._read(entry, entry.start + start * dtype.itemsize, memoryview(view.numpy()))
        return view.view(dtype)

    def widen(self, entry: TensorEntry, start: int, count: int, out: torch.Tensor, slot: str) -> torch.Tensor:
        return out.copy_(self.raw(entry, start, count, slot))

    def _read(self, entry: TensorEntry, offset: int, into: memoryview) -> None:
        fd = self._fds.get(entry.file)
        if fd is None:
            with self._open_lock:
                fd = self._fds.get(entry.file)
                if fd is None:
                    fd = self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
        got = 0
        while got < len(into):
            n = os.preadv(fd, [into[got:]], offset + got)
            if n == 0:
                raise InvalidCheckpoint(f"{entry.file}: file shrank while reading tensor {entry.name!r}")
            got += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class DeltaSource(Protocol):
    numel: int

    def read_f32(self, start: int, count: int, out: torch.Tensor) -> None:
        """Fill `out` (float32, `count` elements) with Δ elements [start, start+count)."""
        ...


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise NonFiniteValues if `values` (a chunk) holds NaN/Inf; `what` names file and tensor."""
    if not torch.isfinite(values).all():
        n = int((~torch.isfinite(values)).sum())
        raise NonFiniteValues(
            f"{what}: {n} NaN/Inf value(s) in this chunk; refusing to produce a Δ from them"
        )


class StoredDelta:
    """A tensor of a Δ artifact, widened to float32."""

    def __init__(self, chunks: ChunkReader, entry: TensorEntry):
        self.chunks, self.entry, self.numel = chunks, entry, entry.numel

    def read_f32(self, start: int, count: int, out: torch.Tensor) -> None:
        self.chunks.widen(self.entry, start, count, out, "delta")


class PairDelta:
    """Δ = tuned − base computed on the fly (fused recycling: no Δ artifact is written)."""

    def __init__(self, chunks: ChunkReader, base: TensorEntry, tuned: TensorEntry):
        self.chunks, self.base, self.tuned, self.numel = chunks, base, tuned, base.numel

    def read_f32(self, start: int, count: int, out: torch.Tensor) -> None:
        scratch = self.chunks.scratch("pair", count)
        self.chunks.widen(self.tuned, start, count, out, "tuned")
        self.chunks.widen(self.base, start, count, scratch, "base")
        out.sub_(scratch)


class RowMapped:
    """A vocabulary tensor's Δ re-indexed to the target's rows; unmatched rows read as zero."""

    def __init__(self, inner: DeltaSource, rowmap: RowMap, cols: int):
        self.inner, self.cols = inner, cols
        self.numel = len(rowmap.src_rows) * cols
        self._runs = row_runs(rowmap.src_rows)  # (target_row, source_row or -1, length)
        self._starts = [r[0] * cols for r in self._runs]

    def read_f32(self, start: int, count: int, out: torch.Tensor) -> None:
        i = bisect.bisect_right(self._starts, start) - 1
        pos, end = start, start + count
        while pos < end:
            trow, srow, length = self._runs[i]
            run_end = (trow + length) * self.cols
            n = min(end, run_end) - pos
            dst = out[pos - start : pos - start + n]
            if srow < 0:
                dst.zero_()
            else:
                self.inner.read_f32(srow * self.cols + (pos - trow * self.cols), n, dst)
            pos += n
            i += 1


def cores() -> int:
    return len(os.sched_getaffinity(0))


@contextlib.contextmanager
def compute_threads() -> Iterator[int]:
    """Parallelise across chunks, not inside them: one intra-op thread per chunk worker. On 2 cores,
    torch's own two threads plus the writer thread oversubscribe the CPU and stall on barriers.
    Yields the number of chunk workers to use."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield min(4, cores())
    finally:
        torch.set_num_threads(before)


WINDOW = 4  # chunks in flight between the reader/compute threads and the writer


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, window: int) -> Iterator[R]:
    """`map(fn, items)` on `workers` threads, results in order, at most `window` items in flight.

    torch kernels, pread, write and sha256 all release the GIL, so chunks computed on two threads
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


def chunk_ranges(numel: int, chunk: int = CHUNK_ELEMS):
    for start in range(0, numel, chunk):
        yield start, min(chunk, numel - start)
