"""Stream tensors into size-bounded safetensors shards, hashing every byte as it is written.

The whole layout (which tensor goes to which shard, every header) is fixed up front from the plan, so
bytes can be appended chunk by chunk (with O_DIRECT, `recycler.io.direct`). Shards are written by *lanes*: lane i owns shards i, i+L, i+2L…
and runs its own thread that writes, hashes (sha256) and finally fsyncs them. sha256 of one file is
sequential, so one thread can hash only one shard at ≈1.5 GB/s; with L lanes and the engine feeding
their shards' chunks in turn (`lane_order`), L shards are hashed at once on L cores, overlapped with
the arithmetic. A small pool of reusable chunk buffers bounds memory whatever the model size.

A `Sidecar` gets every chunk's extra payload on the lane thread and writes its own files per shard
when the shard closes (the Δ residual, `recycler.io.residual`).
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from recycler.crashpoints import crash_point
from recycler.io.direct import ALIGN, DirectWriter, aligned_buffer
from recycler.io.layout import INDEX_NAME, SINGLE_NAME
from recycler.io.manifest import FileDigest
from recycler.io.safetensors import encode_header, itemsize

DEFAULT_SHARD_BYTES = 5 * 1024**3
CHUNK_ELEMS = 1 << 20  # elements per chunk (the reader reads and the engine computes this many)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


class Sidecar(Protocol):
    """Extra per-chunk payloads, handled on the lane thread of the chunk's shard."""

    def append(self, shard: int, tensor: PlannedTensor, start: int, count: int, payload: Any) -> None: ...

    def close(self, shard: int, name: str) -> dict[str, FileDigest]:
        """The shard `name` is complete: write this sidecar's files for it, return their digests."""
        ...


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '64KiB', or a number of bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace("IB", "B")
    for unit, mult in (("KB", 1024), ("MB", 1024**2), ("GB", 1024**3), ("TB", 1024**4), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def assign_shards(plan: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy, order-preserving packing; a tensor larger than the bound gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int, prefix: str = "model") -> list[str]:
    if count == 1:
        return [SINGLE_NAME if prefix == "model" else f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class _Cursor:
    """Producer-side position in one shard: which tensor is next and how many of its bytes arrived."""

    def __init__(self, tensors: list[int]):
        self.tensors, self.pos, self.written, self.opened = tensors, 0, 0, False


class ShardedWriter:
    """Append tensors chunk by chunk, each shard in its own tensor order; `close()` returns digests.

    Usage: `buf = w.buffer()` (uint8, `chunk_bytes`), fill `buf[:n]`, then `w.submit(i, buf, n)` where i
    is the tensor's index in the plan. Chunks of different shards may interleave (see `lane_order`);
    within a shard the writer checks that exactly each tensor's byte count arrives, in order.
    """

    def __init__(
        self,
        folder: Path,
        plan: list[PlannedTensor],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        pool: int = 6,
        *,
        lanes: int = 1,
        sidecar: Sidecar | None = None,
    ):
        self.folder, self.plan, self.sidecar = Path(folder), plan, sidecar
        self.shards = assign_shards(plan, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self.lanes = max(1, min(lanes, len(self.shards)))
        shard_of, members = [], []
        for si, shard in enumerate(self.shards):
            members.append(list(range(len(shard_of), len(shard_of) + len(shard))))
            shard_of += [si] * len(shard)
        self._shard_of = shard_of
        self._cursors = [_Cursor(m) for m in members]
        self.digests: dict[str, FileDigest] = {}
        self._digest_lock = threading.Lock()
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        # one chunk of the widest planned tensor; aligned, so O_DIRECT writes it without a copy
        self.chunk_bytes = max(
            [min(math.prod(t.shape), CHUNK_ELEMS) * itemsize(t.dtype) for t in plan] + [ALIGN]
        )
        for _ in range(pool + self.lanes):
            self._free.put(aligned_buffer(self.chunk_bytes))
        self._error: BaseException | None = None
        self._queues = [queue.Queue() for _ in range(self.lanes)]
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"shard-writer-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for t in self._threads:
            t.start()

    def lane_order(self) -> list[list[int]]:
        """Plan indices per lane, each lane's in the order it writes them. Feed lanes in turn."""
        lanes: list[list[int]] = [[] for _ in range(self.lanes)]
        for si, cursor in enumerate(self._cursors):
            lanes[si % self.lanes] += cursor.tensors
        return lanes

    # -- producer side -------------------------------------------------------------------------
    def buffer(self) -> np.ndarray:
        self._raise_if_failed()
        return self._free.get()

    def submit(self, index: int, buf: np.ndarray, nbytes: int, extra: Any = None) -> None:
        si = self._shard_of[index]
        cur = self._cursors[si]
        self._skip_empty(cur)
        if cur.pos >= len(cur.tensors) or cur.tensors[cur.pos] != index:
            raise ValueError(f"tensor {self.plan[index].name} submitted out of order")
        t = self.plan[index]
        if cur.written + nbytes > t.nbytes:
            raise ValueError(f"too many bytes for tensor {t.name}")
        self._open(si)
        start = cur.written // itemsize(t.dtype)
        self._queues[si % self.lanes].put(("data", si, buf, nbytes, (t, start, extra)))
        cur.written += nbytes
        if cur.written == t.nbytes:
            cur.pos, cur.written = cur.pos + 1, 0
            self._skip_empty(cur)
            if cur.pos == len(cur.tensors):
                self._queues[si % self.lanes].put(("close", si, None, 0, None))

    def close(self) -> dict[str, FileDigest]:
        """Finish every shard (empty ones too), write the index (for several shards), return digests."""
        for si, cur in enumerate(self._cursors):
            self._skip_empty(cur)
            if cur.pos != len(cur.tensors):
                raise RuntimeError(
                    f"writer closed before tensor {self.plan[cur.tensors[cur.pos]].name} was complete"
                )
            if not cur.opened:  # only zero-sized tensors: header only
                self._open(si)
                self._queues[si % self.lanes].put(("close", si, None, 0, None))
        self._stop()
        self._raise_if_failed()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in self.plan)},
                "weight_map": {t.name: self.names[self._shard_of[i]] for i, t in enumerate(self.plan)},
            }
            data = json.dumps(index, indent=2).encode()
            (self.folder / INDEX_NAME).write_bytes(data)
            self.digests[INDEX_NAME] = FileDigest(hashlib.sha256(data).hexdigest(), len(data))
        return self.digests

    def abort(self) -> None:
        self._stop(timeout=30)

    # -- internals -----------------------------------------------------------------------------
    def _skip_empty(self, cur: _Cursor) -> None:
        while cur.pos < len(cur.tensors) and self.plan[cur.tensors[cur.pos]].nbytes == 0:
            cur.pos += 1

    def _open(self, si: int) -> None:
        cur = self._cursors[si]
        if not cur.opened:
            cur.opened = True
            tensors = [(t.name, t.dtype, t.shape) for t in self.shards[si]]
            header = encode_header(tensors, {"format": "pt"}, align=ALIGN)  # data starts on a disk block
            self._queues[si % self.lanes].put(("open", si, header, 0, None))

    def _stop(self, timeout: float | None = None) -> None:
        for q in self._queues:
            q.put(("stop", -1, None, 0, None))
        for t in self._threads:
            t.join(timeout)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self, work: queue.Queue) -> None:
        """One lane: open → data… → close per shard, strictly in the order the producer queued them."""
        f = hasher = None
        si, size = -1, 0
        while True:
            kind, shard, payload, nbytes, extra = work.get()
            if kind == "stop":
                if f is not None:
                    f.abort()
                return
            if self._error is not None:
                if kind == "data":
                    self._free.put(payload)
                continue
            try:
                if kind == "open":
                    si, hasher, size = shard, hashlib.sha256(), len(payload)
                    f = DirectWriter(self.folder / self.names[si])  # closed by "close"
                    _write(f, hasher, payload)
                elif kind == "data":
                    _sha256(hasher, memoryview(payload)[:nbytes])
                    if self.sidecar is not None:
                        tensor, start, side = extra
                        self.sidecar.append(si, tensor, start, nbytes // itemsize(tensor.dtype), side)
                    size += nbytes
                    f.write_owned(payload, nbytes, lambda buf=payload: self._free.put(buf))  # last: owns buf
                elif kind == "close":
                    _fsync_close(f)  # here, overlapped with compute, not all at publish time
                    f = None
                    extra_files = self.sidecar.close(si, self.names[si]) if self.sidecar is not None else {}
                    with self._digest_lock:
                        self.digests[self.names[si]] = FileDigest(hasher.hexdigest(), size)
                        self.digests.update(extra_files)
                        closed = sum(1 for n in self.digests if n in self.names)
                    crash_point(f"write:shard-closed={closed}")
            except BaseException as e:  # surfaced on the producer's next call, naming the file
                name = self.names[si] if si >= 0 else ""
                self._error = (
                    OSError(e.errno, e.strerror, str(self.folder / name)) if isinstance(e, OSError) else e
                )
                if kind == "data":
                    self._free.put(payload)


# Small named steps, so that a profile (bench/profile_delta.py) tells hashing, writing and fsync apart.
def _write(f, hasher, data) -> None:
    f.write(data)
    _sha256(hasher, data)


def _sha256(hasher, data) -> None:
    hasher.update(data)


def _fsync_close(f: DirectWriter) -> None:
    f.close()
