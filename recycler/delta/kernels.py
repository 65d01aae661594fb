"""The Δ engine's arithmetic on one chunk: diff into a stored Δ + residual, and target + α·Δ.

What is computed (d32 = float32(m′) − float32(m), every operation rounded to float32):
  diff   stored = d32 rounded to the store dtype S (saturating at ±max), plus the residual
         (`recycler.delta.residual`): exc where widen(stored) ≠ d32, rt where the round trip fails.
  apply  out = narrow_T(float32(m_t) + α₃₂·d32) with α₃₂ = float32(α), the product and the sum each
         an IEEE float32 operation (README: "What is exact"), and out = m′ where m_t equals m bit for bit at
         an rt element (α = 1, one dtype throughout): m_t + (m′ − m) is then exactly m′.
These are the definitions in `recycler.delta.math` (the eager oracle); tests/test_kernels.py checks the
two agree bit for bit. recycle (Δ never stored) is apply with a `PairBlocks` source: the same bits
as diff then apply.

Speed: a chunk (1M elements) is walked in BLOCK-element blocks so the float32 intermediates (three
256 KiB buffers) stay in L2; every step is a numpy ufunc into a warm buffer. NaN/Inf never pass: the
squared norms computed anyway (np.dot, 0.07 ns/element) are non-finite if any input, Δ or result is,
and only then is the block scanned exactly to say which (`NonFiniteChunk`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recycler.delta.bits import OVERFLOW_AT, bits, narrow, round_sparse, widen
from recycler.delta.residual import EMPTY, ChunkResidual

BLOCK = 1 << 16
EXACT_DTYPES = ("BF16", "F16", "F32")  # dtypes whose round trip through the residual is exact


class NonFiniteChunk(ValueError):
    """NaN/Inf in an input (`role` names it) or a result that overflows; the engine names the tensor."""

    def __init__(self, role: str, count: int):
        self.role, self.count = role, count
        super().__init__(f"{count} NaN/Inf value(s) in the {role}" if count else f"{role} overflows")


class Scratch:
    """Warm float32 block buffers for one thread (kernels are not thread-safe across a Scratch)."""

    def __init__(self, block: int = BLOCK):
        self.block = block
        self.a, self.b, self.d, self.y = (np.empty(block, np.float32) for _ in range(4))
        self.u = np.empty(block, np.uint32)
        self.m = np.empty(block, np.bool_)


@dataclass
class DiffChunk:
    residual: ChunkResidual
    sumsq_delta: float  # Σd32², for the manifest's relative norms
    sumsq_base: float


def roundtrip_checked(base_dtype: str, tuned_dtype: str) -> bool:
    """The residual can make the round trip exact only when both sides share a 16/32-bit float dtype."""
    return base_dtype == tuned_dtype and base_dtype in EXACT_DTYPES


# ---- diff ------------------------------------------------------------------------------------------


def diff_chunk(
    base: np.ndarray, bdt: str, tuned: np.ndarray, tdt: str, out: np.ndarray, store: str, sc: Scratch
) -> DiffChunk:
    """Fill `out` (store dtype carrier) with the stored Δ of one chunk; return its residual and norms.

    Dense work per block (L2-resident); the sparse work (rounding the exceptions, checking the
    round-trip candidates exactly) once per chunk, where a few numpy calls cover every block.
    """
    check_rt = roundtrip_checked(bdt, tdt)
    exc_i, exc_v, rt_i, rt_y = [], [], [], []
    sd = sb = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(0, len(base), sc.block):
            e = min(s + sc.block, len(base))
            k = e - s
            f = widen(tuned[s:e], tdt, sc.a[:k])
            b = widen(base[s:e], bdt, sc.b[:k])
            d = out[s:e] if store == "F32" else sc.d[:k]
            np.subtract(f, b, out=d)
            dd, bb = float(np.dot(d, d)), float(np.dot(b, b))
            if not (np.isfinite(dd) and np.isfinite(bb)):  # NaN/Inf somewhere, or only a Σ that overflowed
                _refuse_nonfinite(("base", b), ("fine-tuned", f), ("Δ (overflows float32)", d))
                dd, bb = _sumsq(d), _sumsq(b)
            sd, sb = sd + dd, sb + bb
            if store != "F32" and len(idx := _exceptions(d, out[s:e], store, sc)):
                exc_i.append(idx + s)
                exc_v.append(d[idx])
            if check_rt and len(idx := _roundtrip_candidates(b, d, f, sc)):
                rt_i.append(idx + s)
                rt_y.append(sc.y[idx])
    exc_idx, exc_val = _cat(exc_i, EMPTY.exc_idx), _cat(exc_v, EMPTY.exc_val)
    if len(exc_idx):
        out[exc_idx] = round_sparse(exc_val, store, saturate=True)
    rt_idx = _cat(rt_i, EMPTY.rt_idx)
    if len(rt_idx):  # exactly: rounded to the dtype, is float32(m) + d32 not m′?
        rt_idx = rt_idx[bits(round_sparse(_cat(rt_y, EMPTY.exc_val), bdt)) != bits(tuned[rt_idx])]
    rt = (
        (rt_idx, base[rt_idx], tuned[rt_idx])
        if len(rt_idx)
        else (EMPTY.rt_idx, EMPTY.rt_base, EMPTY.rt_tuned)
    )
    return DiffChunk(ChunkResidual(exc_idx, exc_val, *rt), sd, sb)


def _cat(arrays: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0] if arrays else empty


def _exceptions(d: np.ndarray, o: np.ndarray, store: str, sc: Scratch) -> np.ndarray:
    """Round d32 to the store dtype into `o`; return where it could not hold d32 (rounded later)."""
    k = len(d)
    m = sc.m[:k]
    if store == "BF16":
        # bf16 is the high half: it holds d32 exactly iff the low half is zero, and then truncation
        # is the rounding. Only the exceptions need a real RNE (and saturation).
        np.right_shift(d.view(np.uint32), 16, out=o, casting="unsafe")
        np.bitwise_and(d.view(np.uint32), 0xFFFF, out=sc.u[:k])
        np.not_equal(sc.u[:k], 0, out=m)
    else:
        np.copyto(o, d, casting="unsafe")
        np.not_equal(bits(widen(o, store, sc.y[:k])), bits(d), out=m)
    return np.flatnonzero(m)


def _roundtrip_candidates(b: np.ndarray, d: np.ndarray, f: np.ndarray, sc: Scratch) -> np.ndarray:
    """Where float32(m) + d32 is not float32(m′) bit for bit (so a −0 that comes back +0 counts):
    a superset of the round-trip failures, left in sc.y for the exact check."""
    k = len(b)
    y, m = sc.y[:k], sc.m[:k]
    np.add(b, d, out=y)
    np.not_equal(bits(y), bits(f), out=m)
    return np.flatnonzero(m) if m.any() else EMPTY.rt_idx


# ---- apply -----------------------------------------------------------------------------------------


class StoredBlocks:
    """Δ blocks of a stored tensor: widen(stored), with the exceptions' exact d32 scattered in."""

    def __init__(self, stored: np.ndarray, store: str, residual: ChunkResidual):
        self.stored, self.store, self.res = stored, store, residual

    def fill(self, s: int, e: int, w: np.ndarray, sc: Scratch) -> np.ndarray:
        idx = self.res.exc_idx
        i, j = np.searchsorted(idx, (s, e)) if len(idx) else (0, 0)
        if self.store == "F32":
            if j == i:
                return self.stored[s:e]  # nothing to patch: use the input as it is
            np.copyto(w, self.stored[s:e])  # never write into the input
        else:
            widen(self.stored[s:e], self.store, w)
        if j > i:
            w[idx[i:j] - s] = self.res.exc_val[i:j]
        return w

    def fix_roundtrip(self, target: np.ndarray, dtype: str, out: np.ndarray, sc: Scratch) -> None:
        """out = m′ at rt elements where the target equals m bit for bit (sparse)."""
        r = self.res
        if len(r.rt_idx) and r.rt_base.dtype == target.dtype == r.rt_tuned.dtype:
            hit = bits(target[r.rt_idx]) == bits(r.rt_base)
            out[r.rt_idx[hit]] = r.rt_tuned[hit]


class PairBlocks:
    """Δ blocks computed on the fly from base and fine-tuned chunks (recycle: Δ is never stored)."""

    measure = False  # True: the fused kernel also sums Σd32², Σbase² and passes them to `record`

    def __init__(self, base: np.ndarray, bdt: str, tuned: np.ndarray, tdt: str):
        self.base, self.bdt, self.tuned, self.tdt = base, bdt, tuned, tdt

    def record(self, sumsq_delta: float, sumsq_base: float) -> None:
        """The fused kernel's sums over the whole chunk (called only when `measure`)."""

    def fill(self, s: int, e: int, w: np.ndarray, sc: Scratch) -> np.ndarray:
        f = widen(self.tuned[s:e], self.tdt, w)
        b = widen(self.base[s:e], self.bdt, sc.b[: e - s])
        np.subtract(f, b, out=w)
        return w

    def fix_roundtrip(self, target: np.ndarray, dtype: str, out: np.ndarray, sc: Scratch) -> None:
        """out = m′ wherever the target equals m bit for bit: where the round trip holds that is what
        the formula gave already, so this is `StoredBlocks.fix_roundtrip` without a stored rt set."""
        if not (self.bdt == self.tdt == dtype and roundtrip_checked(self.bdt, self.tdt)):
            return
        tb, bb = bits(target), bits(self.base)
        for s in range(0, len(target), sc.block):
            e = min(s + sc.block, len(target))
            m = sc.m[: e - s]
            np.equal(tb[s:e], bb[s:e], out=m)
            if m.any():
                np.copyto(out[s:e], self.tuned[s:e], where=m)


class DenseBlocks:
    """Δ blocks of an already decoded float32 chunk (vocabulary-realigned rows)."""

    def __init__(self, d32: np.ndarray):
        self.d32 = d32

    def fill(self, s: int, e: int, w: np.ndarray, sc: Scratch) -> np.ndarray:
        return self.d32[s:e]

    def fix_roundtrip(self, target: np.ndarray, dtype: str, out: np.ndarray, sc: Scratch) -> None:
        return None  # rows were moved: m at a target position is not known


Blocks = StoredBlocks | PairBlocks | DenseBlocks


def apply_chunk(
    target: np.ndarray,
    dtype: str,
    out: np.ndarray,
    delta: Blocks,
    alpha: float,
    sc: Scratch,
    *,
    exact_roundtrip: bool,
) -> None:
    """out (carrier of `dtype`) = narrow(float32(target) + float32(α)·Δ); see the module docstring.

    `exact_roundtrip` (α = 1 and base, fine-tuned and target of one dtype) enables the rt fix.
    Raises NonFiniteChunk naming the target, the Δ or the result.
    """
    a32 = np.float32(alpha)
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(0, len(target), sc.block):
            e = min(s + sc.block, len(target))
            k = e - s
            t = widen(target[s:e], dtype, sc.a[:k])
            w = delta.fill(s, e, sc.d[:k], sc)
            r = out[s:e] if dtype == "F32" else sc.y[:k]
            if alpha == 1.0:
                np.add(t, w, out=r)
            elif alpha == -1.0:
                np.subtract(t, w, out=r)
            else:  # float32(α)·Δ rounded to float32, then the sum rounded to float32 (two steps)
                np.multiply(w, a32, out=r)
                np.add(t, r, out=r)
            _check_result(r, dtype, t, w)
            if dtype != "F32":
                narrow(r, dtype, out[s:e], sc.u[:k])
    if exact_roundtrip:
        delta.fix_roundtrip(target, dtype, out, sc)


def _check_result(r: np.ndarray, dtype: str, t: np.ndarray, w: np.ndarray) -> None:
    """Refuse NaN/Inf in the target or Δ and results that overflow the output dtype.

    Fast path: Σr² is finite only if every |r| < 1.8e19, far below the bf16 and float32 overflow.
    Otherwise (or for float16, which overflows at 65520) the extremes decide, exactly.
    """
    if dtype != "F16" and np.isfinite(np.dot(r, r)):
        return
    _refuse_nonfinite(("target", t), ("Δ", w))
    lo, hi = float(r.min()), float(r.max())
    if not (np.isfinite(lo) and np.isfinite(hi) and max(-lo, hi) < OVERFLOW_AT.get(dtype, float("inf"))):
        raise NonFiniteChunk(f"target + α·Δ in {dtype}", 0)


def _sumsq(x: np.ndarray) -> float:
    """Σx² (float32 dot, 0.07 ns/element); in float64 when float32 overflows (|x| ≳ 1.8e19)."""
    with np.errstate(over="ignore"):
        s = float(np.dot(x, x))
    if not np.isfinite(s):
        x64 = x.astype(np.float64)
        s = float(np.dot(x64, x64))
    return s


def _refuse_nonfinite(*arrays: tuple[str, np.ndarray]) -> None:
    """Raise for the first array holding NaN/Inf; return if all are finite (a Σx² that overflowed)."""
    for role, a in arrays:
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise NonFiniteChunk(role, bad)
