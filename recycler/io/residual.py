"""The Δ residual on disk: `residual/<shard>.safetensors`, one file per Δ shard, written and read by chunk.

For each Δ tensor `name` with a non-empty residual (`recycler.delta.residual`), in plan order:
  name.__exc_idx  I32 (I64 past 2³¹ elements)  ascending flat indices      name.__exc_val  F32  d32 there
  name.__rt_idx   I32/I64                      ascending flat indices      name.__rt_base  m, name.__rt_tuned m′
  name.__exc_ptr, name.__rt_ptr  I64[⌈numel / BLOCK⌉ + 1]: entries before element j·BLOCK,
so a chunk's slice is found with two small reads whatever the tensor size. The files are safetensors
(parsed by our validator like every input), kept out of the Δ's HF index and in a sub-folder so that
loaders and tools that glob `*.safetensors` see only the Δ itself (its nearest-dtype values).

Residual sizes are known only once a shard's chunks are computed, while safetensors wants every offset
in its header: each array is spilled to a scratch file as chunks arrive (page cache) and copied into the
final file, hashed on the way, when the shard closes (on that shard's writer lane).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recycler.delta.residual import EMPTY, ChunkResidual
from recycler.errors import InvalidCheckpoint
from recycler.io.direct import DirectReads, DirectWriter, aligned_buffer, open_for_reads, pread_into
from recycler.io.manifest import FileDigest
from recycler.io.reader import CHUNK_ELEMS, ChunkReader
from recycler.io.safetensors import TensorEntry, encode_header, read_header
from recycler.io.writer import PlannedTensor

FORMAT = "recycler-residual/1"
RESIDUAL_DIR = "residual"
BLOCK = CHUNK_ELEMS  # the diff computes chunks of exactly this size, so a pointer entry per chunk
KINDS = {"exc": ("idx", "val"), "rt": ("idx", "base", "tuned")}
DTYPE_OF = {np.dtype(np.uint16): "BF16", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}
COPY_BLOCK = 1 << 20
SPILL_STAGE = 256 << 10  # five spills per shard being written: keep their staging small


def residual_name(shard: str) -> str:
    return f"{RESIDUAL_DIR}/{shard}"


@dataclass
class _Tensor:
    """What one Δ tensor's residual has accumulated so far in its shard's spill files."""

    name: str
    numel: int
    counts: dict[str, list[int]] = field(default_factory=lambda: {"exc": [0], "rt": [0]})
    dtypes: dict[str, str] = field(default_factory=dict)  # array → safetensors dtype

    @property
    def index_dtype(self) -> str:
        return "I32" if self.numel < 2**31 else "I64"


class ResidualSpill:
    """Writer sidecar: collects every chunk's residual per shard and writes the shard's residual file."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        (self.folder / RESIDUAL_DIR).mkdir(exist_ok=True)
        self._tensors: dict[int, dict[str, _Tensor]] = {}
        self._spills: dict[int, dict[str, object]] = {}
        self._totals: dict[int, dict[str, int]] = {}  # per shard: lanes append concurrently

    def append(self, shard: int, tensor: PlannedTensor, start: int, count: int, part: ChunkResidual) -> None:
        tensors = self._tensors.setdefault(shard, {})
        rec = tensors.get(tensor.name)
        if rec is None:
            rec = tensors[tensor.name] = _Tensor(tensor.name, int(np.prod(tensor.shape)))
        if start != (len(rec.counts["exc"]) - 1) * BLOCK:
            raise ValueError(f"residual of {tensor.name}: chunk at {start} out of order")
        part = part if part is not None else EMPTY
        idx_dtype = np.int32 if rec.index_dtype == "I32" else np.int64
        for kind, arrays in (
            ("exc", (part.exc_idx, part.exc_val)),
            ("rt", (part.rt_idx, part.rt_base, part.rt_tuned)),
        ):
            n = len(arrays[0])
            rec.counts[kind].append(rec.counts[kind][-1] + n)
            totals = self._totals.setdefault(shard, {"exc": 0, "rt": 0})
            totals[kind] += n
            if not n:
                continue
            for role, a in zip(KINDS[kind], arrays, strict=True):
                a = (a + start).astype(idx_dtype) if role == "idx" else a
                rec.dtypes[f"{kind}_{role}"] = rec.index_dtype if role == "idx" else DTYPE_OF[a.dtype]
                self._spill(shard, f"{kind}_{role}").write(memoryview(np.ascontiguousarray(a).view(np.uint8)))

    def close(self, shard: int, name: str) -> dict[str, FileDigest]:
        """Write `residual/<name>` from the spills (hashing it), fsync it, drop the spills."""
        spills = self._spills.pop(shard, {})
        for f in spills.values():
            f.close(fsync=False)  # on disk (O_DIRECT): read back below around the page cache
        tensors = [
            t for t in self._tensors.pop(shard, {}).values() if t.counts["exc"][-1] or t.counts["rt"][-1]
        ]
        layout, ptrs = [], {}
        for t in tensors:
            for kind, roles in KINDS.items():
                n = t.counts[kind][-1]
                if not n:
                    continue
                for role in roles:
                    layout.append((f"{t.name}.__{kind}_{role}", t.dtypes[f"{kind}_{role}"], (n,)))
                ptrs[f"{t.name}.__{kind}_ptr"] = np.asarray(t.counts[kind], np.int64)
                layout.append((f"{t.name}.__{kind}_ptr", "I64", (len(t.counts[kind]),)))
        header = encode_header(layout, {"format": FORMAT, "block": str(BLOCK)})
        rel = residual_name(name)
        h, out = hashlib.sha256(), DirectWriter(self.folder / rel, stage=COPY_BLOCK)
        buf, direct = aligned_buffer(COPY_BLOCK), DirectReads()  # shared: the spills are read one at a time
        readers = {k: _SpillReader(f.path, buf, direct) for k, f in spills.items()}
        try:
            for data in _final_bytes(header, layout, ptrs, readers):
                out.write(data)
                h.update(data)
            out.close()
        except BaseException:
            out.abort()
            raise
        finally:
            for r in readers.values():
                r.close()
            direct.close()
        return {rel: FileDigest(h.hexdigest(), out.size)}

    @property
    def totals(self) -> dict[str, int]:
        return {k: sum(t[k] for t in self._totals.values()) for k in KINDS}

    def _spill(self, shard: int, array: str) -> DirectWriter:
        spills = self._spills.setdefault(shard, {})
        if array not in spills:
            spills[array] = DirectWriter(
                self.folder / RESIDUAL_DIR / f".spill-{shard}-{array}", stage=SPILL_STAGE
            )
        return spills[array]


class _SpillReader:
    """Reads a spill file back in order, then deletes it."""

    def __init__(self, path: Path, buf: np.ndarray, direct: DirectReads):
        self.path, self.offset, self.fd, self.direct, self.buf = path, 0, open_for_reads(path), direct, buf

    def read(self, nbytes: int) -> memoryview:
        into = memoryview(self.buf)[: min(nbytes, COPY_BLOCK)]
        n = pread_into(self.fd, self.path, self.offset, into, self.direct)
        if n < len(into):
            raise OSError(f"residual spill {self.path} is shorter than expected")
        self.offset += n
        return into

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)


def _final_bytes(header, layout, ptrs, readers):
    """The residual file's bytes in order: header, then each array (copied from its spill)."""
    yield header
    for tname, dtype, shape in layout:
        _, _, suffix = tname.rpartition(".__")
        if suffix.endswith("_ptr"):
            yield ptrs[tname].tobytes()
            continue
        left = shape[0] * np.dtype(_NP[dtype]).itemsize
        while left:
            data = readers[suffix].read(left)
            left -= len(data)
            yield data


_NP = {"I32": np.int32, "I64": np.int64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


class ResidualReader:
    """The residual files of a ΔR artifact, validated up front, read chunk by chunk."""

    def __init__(self, folder: Path, files: list[str], delta: dict[str, TensorEntry], chunks: ChunkReader):
        self.chunks = chunks
        self._entries: dict[str, dict[str, TensorEntry]] = {}
        self._ptr: dict[tuple[str, str], np.ndarray] = {}
        for rel in files:
            entries, meta = read_header(Path(folder) / rel)
            if meta.get("format") != FORMAT or meta.get("block") != str(BLOCK):
                raise InvalidCheckpoint(f"{folder / rel}: not a {FORMAT} file with block {BLOCK}")
            for full, e in entries.items():
                name, sep, array = full.rpartition(".__")
                if not sep or name not in delta:
                    raise InvalidCheckpoint(f"{e.file}: residual tensor {full!r} names no Δ tensor")
                self._entries.setdefault(name, {})[array] = e
        for name, arrays in self._entries.items():
            _validate(name, arrays, delta[name])

    def chunk(self, name: str, start: int, count: int) -> ChunkResidual:
        """The residual of elements [start, start+count) of Δ tensor `name`, chunk-local indices."""
        arrays = self._entries.get(name)
        if not arrays:
            return EMPTY
        got = {}
        for kind, roles in KINDS.items():
            if f"{kind}_idx" not in arrays:
                continue
            ptr = self._pointers(name, kind)
            lo, hi = int(ptr[start // BLOCK]), int(ptr[-(-(start + count) // BLOCK)])
            idx = self.chunks.array(arrays[f"{kind}_idx"], lo, hi - lo).astype(np.int64)
            a, b = np.searchsorted(idx, (start, start + count))  # unaligned reads (realigned vocabulary rows)
            got[f"{kind}_idx"] = idx[a:b] - start
            for role in roles[1:]:
                got[f"{kind}_{role}"] = self.chunks.array(arrays[f"{kind}_{role}"], lo + a, b - a)
        res = ChunkResidual(**got)
        try:
            res.check(count)
        except ValueError as e:
            raise InvalidCheckpoint(
                f"{arrays['exc_idx' if 'exc_idx' in arrays else 'rt_idx'].file}: {name}: {e}"
            ) from None
        return res

    def counts(self) -> dict[str, int]:
        return {
            kind: sum(a[f"{kind}_idx"].numel for a in self._entries.values() if f"{kind}_idx" in a)
            for kind in KINDS
        }

    def _pointers(self, name: str, kind: str) -> np.ndarray:
        key = (name, kind)
        if key not in self._ptr:
            e = self._entries[name][f"{kind}_ptr"]
            ptr = self.chunks.array(e, 0, e.numel)
            n = self._entries[name][f"{kind}_idx"].numel
            if ptr[0] != 0 or ptr[-1] != n or np.any(ptr[1:] < ptr[:-1]):
                raise InvalidCheckpoint(f"{e.file}: {name}: malformed {kind} pointer table")
            self._ptr[key] = ptr
        return self._ptr[key]


def _validate(name: str, arrays: dict[str, TensorEntry], delta: TensorEntry) -> None:
    """Shapes and dtypes of one tensor's residual arrays, against the Δ tensor they patch."""
    blocks = -(-delta.numel // BLOCK) + 1
    for kind, roles in KINDS.items():
        present = [r for r in (*roles, "ptr") if f"{kind}_{r}" in arrays]
        if not present:
            continue
        if len(present) != len(roles) + 1:
            raise InvalidCheckpoint(f"{delta.file}: residual of {name!r}: incomplete {kind} arrays {present}")
        n = arrays[f"{kind}_idx"].shape
        for role in roles:
            e = arrays[f"{kind}_{role}"]
            want = ("I32", "I64") if role == "idx" else ("F32",) if role == "val" else ("BF16", "F16", "F32")
            if e.dtype not in want or e.shape != n or len(n) != 1:
                raise InvalidCheckpoint(
                    f"{e.file}: residual {e.name!r}: dtype {e.dtype} shape {list(e.shape)}"
                )
        p = arrays[f"{kind}_ptr"]
        if p.dtype != "I64" or p.shape != (blocks,):
            raise InvalidCheckpoint(f"{p.file}: residual {p.name!r}: expected I64[{blocks}]")
    extra = set(arrays) - {f"{k}_{r}" for k, roles in KINDS.items() for r in (*roles, "ptr")}
    if extra:
        raise InvalidCheckpoint(f"{delta.file}: residual of {name!r}: unknown arrays {sorted(extra)}")


def describe(spill: ResidualSpill, elements: int) -> dict:
    """The manifest's summary of a residual."""
    exc, rt = spill.totals["exc"], spill.totals["rt"]
    return {
        "format": FORMAT,
        "block": BLOCK,
        "elements": elements,
        "exceptions": exc,
        "roundtrip_fixes": rt,
        "exception_rate": round(exc / elements, 8) if elements else 0.0,
    }
