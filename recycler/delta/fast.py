"""Which kernels compute a run: the fused compiled ones (`recycler.delta._native`, C) or the numpy reference.

Both give the same bytes (tests/test_native.py), so the choice is only about speed. The fused kernels
are a C extension on the stable ABI (`recycler/delta/_native.c`): loading it costs a millisecond and
no memory worth counting, so every run uses it when it is installed. Where it is not (a source install
on a machine without a C compiler: the extension is optional) the numpy kernels compute the same bytes,
slower, and `recycler doctor` says so. `RECYCLER_KERNELS=fused|numpy` forces either (tests,
benchmarks); `fused` without the extension is an error. Dtypes the fused kernels do not handle (F64,
integers, FP8 mixed with other dtypes) and every refusal (NaN/Inf, overflow: the reference names the
culprit) go to the reference kernels, chunk by chunk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import numpy as np

from recycler.delta import kernels as ref
from recycler.delta.bits import bits
from recycler.delta.kernels import Blocks, DenseBlocks, DiffChunk, PairBlocks, Scratch, StoredBlocks
from recycler.delta.residual import EMPTY, ChunkResidual

ENV = "RECYCLER_KERNELS"
CODES = {"BF16": 0, "F16": 1, "F32": 2, "F8_E4M3": 3, "F8_E5M2": 4}  # the C module's dtype codes
# Its status for a computed chunk. Else: 1, NaN/Inf or an overflow somewhere; 2, no kernel for this
# combination of dtypes (FP8 is compiled for FP8 throughout with a float32 Δ). The reference decides.
OK = 0

try:
    from recycler.delta import _native as _NATIVE_MODULE
except ImportError:  # built without a compiler: the numpy kernels
    _NATIVE_MODULE = None
NATIVE: ModuleType | None = _NATIVE_MODULE


class Kernels(Protocol):
    name: str

    def diff_chunk(
        self,
        base: np.ndarray,
        bdt: str,
        tuned: np.ndarray,
        tdt: str,
        out: np.ndarray,
        store: str,
        sc: Scratch,
    ) -> DiffChunk: ...

    def apply_chunk(
        self,
        target: np.ndarray,
        dtype: str,
        out: np.ndarray,
        delta: Blocks,
        alpha: float,
        sc: Scratch,
        *,
        exact_roundtrip: bool,
    ) -> None: ...


class Reference:
    """The numpy kernels of `recycler.delta.kernels`."""

    name = "numpy"
    diff_chunk = staticmethod(ref.diff_chunk)
    apply_chunk = staticmethod(ref.apply_chunk)


@dataclass
class _Sparse:
    """Per-thread buffers the diff kernel appends sparse entries to (pages touched only as used)."""

    exc_idx: np.ndarray
    exc_val: np.ndarray
    rt_idx: np.ndarray
    sums: np.ndarray


def _sparse(sc: Scratch, n: int) -> _Sparse:
    sp = getattr(sc, "sparse", None)
    if sp is None or len(sp.exc_idx) < n:
        sp = sc.sparse = _Sparse(
            np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.int64), np.zeros(2)
        )
    return sp


_EMPTY_I = np.zeros(0, np.int64)
_I64, _F32 = np.dtype(np.int64), np.dtype(np.float32)


class Fused:
    """The compiled one-pass kernels, with the reference behind every case they do not cover."""

    name = "fused"

    def __init__(self, native: ModuleType) -> None:
        self.k = native
        self.fallbacks = 0  # chunks handed to the reference (tests check the fused path ran)

    def diff_chunk(
        self,
        base: np.ndarray,
        bdt: str,
        tuned: np.ndarray,
        tdt: str,
        out: np.ndarray,
        store: str,
        sc: Scratch,
    ) -> DiffChunk:
        codes = CODES
        if not (bdt in codes and tdt in codes and store in codes):
            self.fallbacks += 1
            return ref.diff_chunk(base, bdt, tuned, tdt, out, store, sc)
        n = len(base)
        sp = _sparse(sc, n)
        check_rt = ref.roundtrip_checked(bdt, tdt)
        status, ne, nr = self.k.diff(
            codes[bdt],
            codes[tdt],
            codes[store],
            check_rt,
            *(bits(base), bits(tuned), bits(out), sp.exc_idx, sp.exc_val, sp.rt_idx, sp.sums),
        )
        if status != OK:  # NaN/Inf: the reference says where (and raises)
            self.fallbacks += 1
            return ref.diff_chunk(base, bdt, tuned, tdt, out, store, sc)
        exc = (sp.exc_idx[:ne].copy(), sp.exc_val[:ne].copy()) if ne else (EMPTY.exc_idx, EMPTY.exc_val)
        rt_idx = sp.rt_idx[:nr].copy()
        rt = (rt_idx, base[rt_idx], tuned[rt_idx]) if nr else (EMPTY.rt_idx, EMPTY.rt_base, EMPTY.rt_tuned)
        res = ChunkResidual(*exc, *rt)
        return DiffChunk(res, float(sp.sums[0]), float(sp.sums[1]))

    def apply_chunk(
        self,
        target: np.ndarray,
        dtype: str,
        out: np.ndarray,
        delta: Blocks,
        alpha: float,
        sc: Scratch,
        *,
        exact_roundtrip: bool,
    ) -> None:
        status = self._apply(target, dtype, out, delta, float(np.float32(alpha)), exact_roundtrip)
        if status != OK:  # not covered, or a refusal the reference names
            self.fallbacks += 1
            ref.apply_chunk(target, dtype, out, delta, alpha, sc, exact_roundtrip=exact_roundtrip)

    def _apply(
        self, target: np.ndarray, dtype: str, out: np.ndarray, delta: Blocks, a32: float, exact: bool
    ) -> int | None:
        codes, k = CODES, self.k
        if dtype not in codes:
            return None
        code, tb, ob = codes[dtype], bits(target), bits(out)
        if isinstance(delta, StoredBlocks):
            r = delta.res
            if delta.store not in codes or (r.exc_idx.dtype, r.exc_val.dtype) != (_I64, _F32):
                return None  # the C kernel reads int64 indices and float32 values, nothing else
            fix = exact and len(r.rt_idx) > 0 and r.rt_base.dtype == target.dtype == r.rt_tuned.dtype
            rt = (r.rt_idx, bits(r.rt_base), bits(r.rt_tuned)) if fix else (_EMPTY_I, tb[:0], tb[:0])
            stored = bits(delta.stored)
            return k.apply_stored(code, codes[delta.store], tb, ob, stored, r.exc_idx, r.exc_val, *rt, a32)
        if isinstance(delta, PairBlocks):
            if delta.bdt not in codes or delta.tdt not in codes:
                return None
            fix = exact and delta.bdt == delta.tdt == dtype and ref.roundtrip_checked(delta.bdt, delta.tdt)
            b, t = bits(delta.base), bits(delta.tuned)
            sums = np.zeros(2) if delta.measure else None
            status = k.apply_pair(
                code, codes[delta.bdt], codes[delta.tdt], bool(fix), tb, ob, b, t, a32, sums
            )
            if status == OK and sums is not None:
                delta.record(float(sums[0]), float(sums[1]))
            return status
        if isinstance(delta, DenseBlocks) and delta.d32.dtype == _F32:
            return k.apply_dense(code, tb, ob, delta.d32, a32)
        return None


_FUSED: Fused | None = None


def _mode() -> str:
    mode = os.environ.get(ENV, "auto")
    if mode not in ("auto", "fused", "numpy"):
        raise ValueError(f"{ENV}={mode!r}: expected auto, fused or numpy")
    return mode


def available() -> bool:
    """Whether the compiled kernels are installed (a source install without a compiler has none)."""
    return NATIVE is not None


def choose() -> Kernels:
    """The kernels for a run (see the module docstring)."""
    global _FUSED
    mode = _mode()
    if mode == "numpy" or (mode == "auto" and NATIVE is None):
        return Reference()
    if NATIVE is None:
        raise ImportError(
            f"{ENV}=fused but recycler.delta._native is not built: reinstall with a C compiler "
            "(pip install --force-reinstall --no-deps recycler) or unset it to use the numpy kernels"
        )
    if _FUSED is None:
        _FUSED = Fused(NATIVE)
    return _FUSED
