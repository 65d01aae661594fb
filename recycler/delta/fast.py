"""Which kernels compute a run: the fused compiled ones (`recycler.delta.fused`) or the numpy reference.

Both give the same bytes (tests/test_fused.py), so the choice is only about speed. The fused kernels
cost numba's import and the load of their compiled code from the on-disk cache (≈0.3 s warm, a few
seconds once after an install), so a run uses them only when it has enough elements to repay that
(`FUSED_MIN`); `RECYCLER_KERNELS=fused|numpy` forces either (tests, benchmarks, a machine where numba
cannot run). Dtypes the fused kernels do not handle (F64, F8, integers) and every refusal (NaN/Inf,
overflow: the reference names the culprit) go to the reference kernels, chunk by chunk.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from recycler.delta import kernels as ref
from recycler.delta.bits import bits
from recycler.delta.kernels import Blocks, DenseBlocks, DiffChunk, PairBlocks, Scratch, StoredBlocks
from recycler.delta.residual import EMPTY, ChunkResidual

FUSED_MIN = 1 << 24  # elements in a run (32 MB of bf16) from which the fused kernels pay for themselves
ENV = "RECYCLER_KERNELS"


class Kernels(Protocol):
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


class Fused:
    """The compiled one-pass kernels, with the reference behind every case they do not cover."""

    name = "fused"

    def __init__(self) -> None:
        self.k = _load_fused()
        self._lock = threading.Lock()
        self.fallbacks = 0  # chunks handed to the reference (tests check the fused path ran)

    def _kernel(self, factory, *key):
        """The compiled kernel for `key`, loaded (or compiled) once even when threads ask together."""
        with self._lock:
            return factory(*key)

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
        codes = self.k.CODES
        if not (bdt in codes and tdt in codes and store in codes):
            self.fallbacks += 1
            return ref.diff_chunk(base, bdt, tuned, tdt, out, store, sc)
        n = len(base)
        sp = _sparse(sc, n)
        check_rt = ref.roundtrip_checked(bdt, tdt)
        kernel = self._kernel(self.k.diff_kernel, codes[bdt], codes[tdt], codes[store], check_rt)
        status, ne, nr = kernel(
            bits(base), bits(tuned), bits(out), sp.exc_idx, sp.exc_val, sp.rt_idx, sp.sums
        )
        if status != self.k.OK:  # NaN/Inf: the reference says where (and raises)
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
        status = self._apply(target, dtype, out, delta, np.float32(alpha), exact_roundtrip)
        if status != self.k.OK:  # not covered, or a refusal the reference names
            self.fallbacks += 1
            ref.apply_chunk(target, dtype, out, delta, alpha, sc, exact_roundtrip=exact_roundtrip)

    def _apply(
        self, target: np.ndarray, dtype: str, out: np.ndarray, delta: Blocks, a32: np.float32, exact: bool
    ) -> int | None:
        codes, k = self.k.CODES, self.k
        if dtype not in codes:
            return None
        code, tb, ob = codes[dtype], bits(target), bits(out)
        if isinstance(delta, StoredBlocks):
            if delta.store not in codes:
                return None
            r = delta.res
            fix = exact and len(r.rt_idx) > 0 and r.rt_base.dtype == target.dtype == r.rt_tuned.dtype
            rt = (r.rt_idx, bits(r.rt_base), bits(r.rt_tuned)) if fix else (_EMPTY_I, tb[:0], tb[:0])
            kernel = self._kernel(k.apply_stored_kernel, code, codes[delta.store])
            return kernel(tb, ob, bits(delta.stored), r.exc_idx, r.exc_val, *rt, a32)
        if isinstance(delta, PairBlocks):
            if delta.bdt not in codes or delta.tdt not in codes:
                return None
            fix = exact and delta.bdt == delta.tdt == dtype and ref.roundtrip_checked(delta.bdt, delta.tdt)
            b, t = bits(delta.base), bits(delta.tuned)
            kernel = self._kernel(k.apply_pair_kernel, code, codes[delta.bdt], codes[delta.tdt], bool(fix))
            return kernel(tb, ob, b, t, a32)
        if isinstance(delta, DenseBlocks):
            return self._kernel(k.apply_dense_kernel, code)(tb, ob, delta.d32, a32)
        return None


def _load_fused():
    """Import the fused kernels and set up numba's compiler context (what loading a cached kernel
    needs). numba's probe for a BLAS imports scipy.linalg (0.5 s here) when scipy is installed; the
    kernels use no BLAS, so the probe is answered "none" unless scipy.linalg is already loaded."""
    block = "scipy.linalg" not in sys.modules
    if block:
        sys.modules["scipy.linalg"] = None  # type: ignore[assignment]  # import → ImportError
    try:
        from numba.core.registry import cpu_target

        from recycler.delta import fused  # numba: imported only when a run chooses these kernels

        cpu_target.target_context.refresh()
    finally:
        if block and "scipy.linalg" in sys.modules and sys.modules["scipy.linalg"] is None:
            del sys.modules["scipy.linalg"]
    return fused


_FUSED: Fused | None = None
_FUSED_LOCK = threading.Lock()


def _fused() -> Fused:
    global _FUSED
    with _FUSED_LOCK:
        if _FUSED is None:
            _FUSED = Fused()
        return _FUSED


def _mode() -> str:
    mode = os.environ.get(ENV, "auto")
    if mode not in ("auto", "fused", "numpy"):
        raise ValueError(f"{ENV}={mode!r}: expected auto, fused or numpy")
    return mode


def choose(elements: int) -> Kernels:
    """The kernels for a run over `elements` elements (see the module docstring)."""
    mode = _mode()
    if mode == "numpy" or (mode == "auto" and elements < FUSED_MIN):
        return Reference()
    return _fused()


def prefetch(elements: int) -> None:
    """Load the fused kernels on a background thread if a run of `elements` will choose them, so
    numba's start-up overlaps the command's own (reading headers, planning) instead of following it."""
    if _FUSED is None and _mode() != "numpy" and (elements >= FUSED_MIN or _mode() == "fused"):
        threading.Thread(target=_fused, name="load-kernels", daemon=True).start()
