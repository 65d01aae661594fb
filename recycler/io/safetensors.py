"""The safetensors file format, parsed and written by hand so that we can stream.

We read headers ourselves (instead of `safe_open`) to enforce our own caps before any JSON is parsed,
to reject duplicate keys, and to know byte offsets so tensors can be read in bounded chunks with
`pread`. We write headers ourselves so a shard can be streamed chunk by chunk and hashed as it goes.
Layout: 8-byte little-endian header length N, N bytes of JSON (space padded), then the data region.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from recycler.errors import InvalidCheckpoint

MAX_HEADER_BYTES = 16 * 1024 * 1024  # real 405B-parameter shards have headers of tens of KB
MAX_TENSORS_PER_FILE = 100_000
MAX_NAME_LENGTH = 1024

# safetensors dtype name → bytes per element (the torch dtypes live in recycler.io.reader).
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # FP8 widens exactly to float32


def itemsize(dtype: str) -> int:
    return ITEMSIZE[dtype]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: `file`, absolute byte range [start, end), dtype and shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


U64_MAX = 2**64 - 1
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _strict_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """JSON objects as the reference parser (Rust serde_json) would have them, or ValueError: no
    duplicate keys, and no string with an unpaired UTF-16 surrogate escape ("\\ud800"), which Python
    decodes but serde_json refuses."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:80]!r}")
        _valid_text(k)
        if isinstance(v, str):
            _valid_text(v)
        out[k] = v
    return out


def _valid_text(text: str) -> None:
    text.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate


def _json_int(literal: str) -> int:
    """Integers are shapes and offsets, which the reference reads as unsigned 64-bit: above that, or
    "-0" (a float to serde_json), it refuses. Other negatives are refused by the shape/offset checks."""
    value = int(literal)
    if value > U64_MAX or (value == 0 and literal.startswith("-")):
        raise ValueError(f"integer {literal[:30]} is not an unsigned 64-bit integer")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _decode(raw: bytes) -> object:
    return json.loads(
        raw.decode("utf-8"),
        object_pairs_hook=_strict_object,
        parse_int=_json_int,
        parse_constant=_no_constant,
    )


def declared_size(path: Path) -> int | None:
    """The file size a safetensors file's header declares (8 + header + data), or None while its
    header is not all there. How a release folder that is still being copied is told from a
    complete one without trusting timestamps: a shard caught mid-copy is shorter than it declares."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                return 8 + n  # malformed: listed, then refused by read_header with its reason
            raw = f.read(n)
        if len(raw) < n:
            return None
    except OSError:
        return None
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return Path(path).stat().st_size  # all there but malformed: listed, then refused by read_header
    return 8 + n + max(ends, default=0)


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate the header of one safetensors file; return its tensors and metadata.

    Raises InvalidCheckpoint naming the file for: short or truncated files, header length out of
    bounds, invalid/duplicate-key JSON, unknown dtypes, shape/size disagreement, overlapping or
    uncovered byte ranges (this also rejects appended polyglot payloads). Never laxer than the
    reference parser (safetensors' Rust code), which tests/test_fuzz_validator.py checks
    differentially: whatever is accepted here loads with `safetensors`.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InvalidCheckpoint(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
                raise InvalidCheckpoint(
                    f"{path}: invalid header length {n} (file is {size} bytes, cap {MAX_HEADER_BYTES}); "
                    "the file is truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as e:
        raise InvalidCheckpoint(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = _decode(raw)
    except (ValueError, RecursionError) as e:  # UnicodeError is a ValueError
        raise InvalidCheckpoint(
            f"{path}: malformed safetensors header ({type(e).__name__}: {str(e)[:200]})"
        ) from e
    if not isinstance(header, dict):
        raise InvalidCheckpoint(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)  # null is allowed, as by the reference parser
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidCheckpoint(f"{path}: __metadata__ must be a map of strings to strings")
    if len(header) > MAX_TENSORS_PER_FILE:
        raise InvalidCheckpoint(f"{path}: {len(header)} tensors exceeds the cap of {MAX_TENSORS_PER_FILE}")
    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(path, name, info, data_start)
    _check_coverage(path, entries.values(), data_start, size)
    return entries, metadata


def _entry(path: Path, name: str, info: object, data_start: int) -> TensorEntry:
    where = f"{path}: tensor {name[:80]!r}"
    if not name or len(name) > MAX_NAME_LENGTH or "\x00" in name:
        raise InvalidCheckpoint(f"{where}: invalid tensor name (empty, NUL or over {MAX_NAME_LENGTH} chars)")
    if not isinstance(info, dict) or set(info) != ENTRY_KEYS:
        raise InvalidCheckpoint(f"{where}: entry must be an object with exactly {sorted(ENTRY_KEYS)}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise InvalidCheckpoint(f"{where}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidCheckpoint(f"{where}: invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise InvalidCheckpoint(f"{where}: invalid data_offsets {offsets!r}")
    expected = _checked_nbytes(shape, itemsize(dtype))
    if expected is None:
        raise InvalidCheckpoint(f"{where}: shape {shape} overflows a 64-bit size")
    if offsets[1] - offsets[0] != expected:
        raise InvalidCheckpoint(
            f"{where}: shape {shape} of {dtype} needs {expected} bytes but data_offsets span {offsets[1] - offsets[0]}"
        )
    return TensorEntry(name, path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _checked_nbytes(shape: list[int], size: int) -> int | None:
    """Bytes of a tensor, or None where the reference's checked 64-bit arithmetic overflows (it
    multiplies the dimensions in order, so [2**40, 2**40, 0] overflows although it holds nothing)."""
    n = 1
    for d in shape:
        n *= d
        if n > U64_MAX:
            return None
    return n * size if n * size * 8 <= U64_MAX else None


def _check_coverage(path: Path, entries, data_start: int, size: int) -> None:
    """Byte ranges must tile the data region exactly: no overlap, no gap, nothing appended."""
    pos = data_start
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start != pos:
            kind = "overlapping" if e.start < pos else "gap before"
            raise InvalidCheckpoint(
                f"{path}: {kind} data for tensor {e.name!r} (offset {e.start - data_start})"
            )
        pos = e.end
    if pos != size:
        what = "truncated" if pos > size else f"{size - pos} unexplained trailing bytes"
        raise InvalidCheckpoint(f"{path}: data region does not match the file size ({what})")


def encode_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str], *, align: int = 8
) -> bytes:
    """Header bytes (length prefix + JSON, space-padded so the data starts at a multiple of `align`,
    at least 8 as the format asks) for tensors laid out in the given order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % max(align, 8))
    return struct.pack("<Q", len(raw)) + raw
