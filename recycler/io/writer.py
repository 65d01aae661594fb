"""Stream tensors into size-bounded safetensors shards, hashing every byte as it is written.

The whole layout (which tensor goes to which shard, every header) is fixed up front from the plan, so
bytes can be appended chunk by chunk. Writing and sha256 run on a background thread (both release the
GIL), overlapping with the arithmetic on the caller's thread; a small pool of reusable chunk buffers
bounds memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from recycler.crashpoints import crash_point
from recycler.io.layout import INDEX_NAME, SINGLE_NAME
from recycler.io.manifest import FileDigest
from recycler.io.safetensors import encode_header, itemsize

DEFAULT_SHARD_BYTES = 5 * 1024**3
CHUNK_BYTES = 4 << 20  # one chunk of float32 output (stream.CHUNK_ELEMS elements)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


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


class ShardedWriter:
    """Append tensors, in plan order, chunk by chunk; `close()` returns per-file sha256 and size.

    Usage: `buf = w.buffer()` (uint8, CHUNK_BYTES), fill `buf[:n]`, then `w.submit(buf, n)`.
    The writer checks that exactly each tensor's byte count arrives, in order.
    """

    def __init__(
        self,
        folder: Path,
        plan: list[PlannedTensor],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        pool: int = 6,
    ):
        self.folder = Path(folder)
        self.shards = assign_shards(plan, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self._order = [(si, t) for si, shard in enumerate(self.shards) for t in shard]
        self._pos = 0  # index into _order
        self._written = 0  # bytes of the current tensor
        self._current_shard = -1
        self.digests: dict[str, FileDigest] = {}
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(pool):
            self._free.put(torch.empty(CHUNK_BYTES, dtype=torch.uint8))
        self._work: queue.Queue = queue.Queue(maxsize=pool)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()
        self._advance_empty()

    # -- producer side -------------------------------------------------------------------------
    def buffer(self) -> torch.Tensor:
        self._raise_if_failed()
        return self._free.get()

    def submit(self, buf: torch.Tensor, nbytes: int) -> None:
        si, t = self._order[self._pos]
        if self._written + nbytes > t.nbytes:
            raise ValueError(f"too many bytes for tensor {t.name}")
        self._open_shard_if_needed(si)
        self._work.put(("data", buf, nbytes))
        self._written += nbytes
        if self._written == t.nbytes:
            self._pos += 1
            self._written = 0
            self._advance_empty()

    def close(self) -> dict[str, FileDigest]:
        """Finish the last shard, write the index (for several shards), and return digests."""
        if self._pos != len(self._order):
            raise RuntimeError(f"writer closed before tensor {self._order[self._pos][1].name} was complete")
        self._work.put(("close", None, 0))
        self._work.put(("stop", None, 0))
        self._thread.join()
        self._raise_if_failed()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                "weight_map": {t.name: self.names[si] for si, t in self._order},
            }
            data = json.dumps(index, indent=2).encode()
            (self.folder / INDEX_NAME).write_bytes(data)
            self.digests[INDEX_NAME] = FileDigest(hashlib.sha256(data).hexdigest(), len(data))
        return self.digests

    def abort(self) -> None:
        self._work.put(("stop", None, 0))
        self._thread.join(timeout=30)

    # -- internals -----------------------------------------------------------------------------
    def _advance_empty(self) -> None:
        """Zero-sized tensors need no data; step over them (opening their shard)."""
        while self._pos < len(self._order) and self._order[self._pos][1].nbytes == 0:
            self._open_shard_if_needed(self._order[self._pos][0])
            self._pos += 1

    def _open_shard_if_needed(self, si: int) -> None:
        if si != self._current_shard:
            if self._current_shard >= 0:
                self._work.put(("close", None, 0))
            self._current_shard = si
            header = encode_header([(t.name, t.dtype, t.shape) for t in self.shards[si]], {"format": "pt"})
            self._work.put(("open", self.names[si], header))

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        f = hasher = None
        name, size = "", 0
        while True:
            kind, payload, arg = self._work.get()
            if kind == "stop":
                if f is not None:
                    f.close()
                return
            if self._error is not None:
                if kind == "data":
                    self._free.put(payload)
                continue
            try:
                if kind == "open":
                    name, hasher, size = payload, hashlib.sha256(), 0
                    f = open(self.folder / name, "wb")  # noqa: SIM115 (closed by the "close" message)
                    f.write(arg)
                    hasher.update(arg)
                    size += len(arg)
                elif kind == "data":
                    view = memoryview(payload.numpy())[:arg]
                    f.write(view)
                    hasher.update(view)
                    size += arg
                    self._free.put(payload)
                elif kind == "close" and f is not None:
                    f.flush()
                    os.fsync(f.fileno())  # here, overlapped with compute, not all at publish time
                    f.close()
                    f = None
                    self.digests[name] = FileDigest(hasher.hexdigest(), size)
                    crash_point(f"write:shard-closed={len(self.digests)}")
            except BaseException as e:  # surfaced on the producer's next call, naming the file
                self._error = (
                    OSError(e.errno, e.strerror, str(self.folder / name)) if isinstance(e, OSError) else e
                )
                if kind == "data":
                    self._free.put(payload)
