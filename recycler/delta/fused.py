"""The Δ engine's arithmetic compiled: one pass per element for diff and apply (numba, no GIL).

Each kernel reads the inputs' bit patterns once and, per element, widens to float32, subtracts or
adds α·Δ, narrows with round-to-nearest-even, detects residual exceptions and round-trip fixes,
writes the output and appends the sparse entries: the memory traffic is the inputs and the output,
once. They compute exactly what `recycler.delta.kernels` (the numpy reference) computes, bit for bit
(`tests/test_fused.py`: every bf16 pattern, random blocks of every dtype with NaN/Inf/±0/subnormals
and α ≠ 1); norms are summed in float64 (the reference sums float32 dot products), which changes a
manifest's relative norms in the last digits only and never with the thread count.

Everything is integer arithmetic on bit patterns plus IEEE float32 add/subtract/multiply, which numba
compiles without fast-math (no contraction into FMA, no reassociation), so the results are the IEEE
results the reference gets from numpy. Dtype codes (`CODES`) select the widening and narrowing
step: a new input format (F8) needs only a `_widen` branch and a code.

Importing this module imports numba (≈0.3 s) and loads the compiled kernels from numba's on-disk
cache (compiled on the first call after an install, a few seconds once); `recycler.delta.fast`
imports it only for inputs large enough to repay that.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

BF16, F16, F32 = 0, 1, 2
CODES = {"BF16": BF16, "F16": F16, "F32": F32}
OK, NONFINITE = 0, 1

_EXP32 = np.uint32(0x7F800000)


@intrinsic
def _f32(typingctx, u):
    """The float32 whose bit pattern is the uint32 `u` (a register bitcast, no memory)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _u32(typingctx, x):
    """The bit pattern of the float32 `x`."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(inline="always", **_JIT)
def _f16_to_f32(h):
    """float16 bits → float32 bits, exact (subnormals normalised, NaN payloads kept, as numpy)."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0x1F:
        return sign | np.uint32(0x7F800000) | (m << np.uint32(13))
    if e != 0:
        return sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))
    if m == 0:
        return sign
    p = np.uint32(9)  # the leading bit of a subnormal's mantissa
    while (m >> p) == 0:
        p -= np.uint32(1)
    return sign | ((p + np.uint32(103)) << np.uint32(23)) | ((m << (np.uint32(23) - p)) & np.uint32(0x7FFFFF))


@njit(inline="always", **_JIT)
def _f32_to_f16(u):
    """float32 bits → float16 bits, round to nearest even (overflow → ±Inf, as numpy's cast)."""
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # Inf, NaN (quietened, payload's high bits kept)
        if a == np.uint32(0x7F800000):
            return np.uint16(sign | np.uint32(0x7C00))
        return np.uint16(sign | np.uint32(0x7E00) | ((a >> np.uint32(13)) & np.uint32(0x3FF)))
    if a >= np.uint32(0x477FF000):  # ≥ 65520 rounds to Inf
        return np.uint16(sign | np.uint32(0x7C00))
    if a >= np.uint32(0x38800000):  # a float16 normal: rebias, keep 10 bits, RNE (carry is correct)
        m = a - np.uint32(0x38000000)
        return np.uint16(
            sign | ((m + np.uint32(0xFFF) + ((m >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13))
        )
    if a < np.uint32(0x33000000):  # ≤ 2⁻²⁵ (a tie at 2⁻²⁵ goes to even: 0)
        return np.uint16(sign)
    e = a >> np.uint32(23)  # a float16 subnormal: k·2⁻²⁴ with k = mantissa >> (126 − e), RNE
    mant = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    s = np.uint32(126) - e
    half = (np.uint32(1) << (s - np.uint32(1))) - np.uint32(1)
    return np.uint16(sign | ((mant + half + ((mant >> s) & np.uint32(1))) >> s))


@njit(inline="always", **_JIT)
def _widen(x, code):
    """float32 bits of one element of a `code` array (BF16/F16 carried as uint16, F32 as uint32)."""
    if code == BF16:
        return np.uint32(x) << np.uint32(16)
    if code == F16:
        return _f16_to_f32(x)
    return np.uint32(x)


@njit(inline="always", **_JIT)
def _round(u, code):
    """float32 bits → `code` bits, RNE, for finite values (and ±Inf): `bits.narrow`/`round_sparse`."""
    if code == BF16:
        return np.uint32((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    if code == F16:
        return np.uint32(_f32_to_f16(u))
    return u


@njit(inline="always", **_JIT)
def _saturate(h, code):
    """A stored Δ stays finite: ±Inf (from a finite d32) becomes ±max (`round_sparse(saturate=True)`).
    Branch-free: ±max is the pattern just below ±Inf in both formats."""
    if code == BF16:
        return h - np.uint32((h & np.uint32(0x7FFF)) == np.uint32(0x7F80))
    if code == F16:
        return h - np.uint32((h & np.uint32(0x7FFF)) == np.uint32(0x7C00))
    return h


@njit(inline="always", **_JIT)
def _too_big(rb, code):
    """1 if the float32 result `rb` (bits) is NaN/Inf or rounds to ±Inf in `code` (a refusal)."""
    a = rb & np.uint32(0x7FFFFFFF)
    if code == BF16:
        return np.uint32(a >= np.uint32(0x7F7F8000))
    if code == F16:
        return np.uint32(a >= np.uint32(0x477FF000))
    return np.uint32(a >= np.uint32(0x7F800000))


@njit(fastmath={"reassoc"}, **_JIT)
def _sumsq(d, base, bcode):
    """(Σd², Σwiden(base)²) in float64. Reassociation lets the sums vectorise (their order is then the
    compiler's, fixed for a machine); nothing else is computed in this function."""
    sd = 0.0
    sb = 0.0
    for j in range(len(base)):
        x = np.float64(d[j])
        y = np.float64(_f32(_widen(base[j], bcode)))
        sd += x * x
        sb += y * y
    return sd, sb


@njit(inline="always", **_JIT)
def _mask8(x):
    """Bit k = bit 0 of byte k of the uint64 `x` (the other bits of each byte ignored)."""
    return ((x & np.uint64(0x0101010101010101)) * np.uint64(0x0102040810204080)) >> np.uint64(56)


BLOCK = 2048  # elements per diff block: its float32 Δ, base and flags stay in L1


@functools.cache
def diff_kernel(bcode: int, tcode: int, scode: int, check_rt: bool):
    """The diff kernel for one combination of dtypes (constants, so each compiles to straight code).

    kernel(base, tuned, out, exc_idx, exc_val, rt_idx, sums) → (status, exceptions, rt fixes):
    out = d32 rounded to the store dtype (saturated), the sparse entries appended to the index and
    value buffers, sums = [Σd32², Σbase²]. Per block: one vectorised pass over the elements (widen,
    subtract, narrow, write, flag exceptions and round-trip failures), then the block's sums and a
    scan of its flags, both in L1.
    """

    @njit(**_JIT)
    def kernel(base, tuned, out, exc_idx, exc_val, rt_idx, sums):
        n = len(base)
        dbuf = np.empty(BLOCK, np.float32)
        flags = np.zeros(BLOCK, np.uint8)
        words = flags.view(np.uint64)
        ne = 0
        nr = 0
        sd = 0.0
        sb = 0.0
        for s in range(0, n, BLOCK):
            k = min(BLOCK, n - s)
            bs, ts, os = base[s : s + k], tuned[s : s + k], out[s : s + k]
            hits = np.uint32(0)
            for j in range(k):
                fb = _widen(ts[j], tcode)
                b = _f32(_widen(bs[j], bcode))
                d = _f32(fb) - b
                db = _u32(d)
                dbuf[j] = d
                e = np.uint32(0)
                if scode == F32:
                    os[j] = db
                else:
                    h = _round(db, scode)
                    if scode == BF16:
                        e = np.uint32((db & np.uint32(0xFFFF)) != np.uint32(0))
                    else:
                        e = np.uint32(_widen(h, scode) != db)
                    os[j] = _saturate(h, scode)
                r = np.uint32(0)
                if check_rt:
                    yb = _u32(b + d)
                    r = np.uint32(yb != fb)  # a candidate; the exact check is in the scan
                f = e | (r << np.uint32(1))
                flags[j] = f
                hits |= f
            x, y = _sumsq(dbuf, bs, bcode)
            sd += x
            sb += y
            if hits:
                if k < BLOCK:
                    flags[k:] = 0
                for w in range(BLOCK // 8):  # 8 flags a word: visit only the set ones
                    x = words[w]
                    if x:
                        m = _mask8(x)
                        while m:
                            j = 8 * w + trailing_zeros(m)
                            exc_idx[ne] = s + j
                            exc_val[ne] = dbuf[j]
                            ne += 1
                            m &= m - np.uint64(1)
                        m = _mask8(x >> np.uint64(1))
                        while m:  # float32(m) + d32 is not m′: does it round to m′ in the dtype?
                            j = 8 * w + trailing_zeros(m)
                            yb = _u32(_f32(_widen(bs[j], bcode)) + dbuf[j])
                            rt_idx[nr] = s + j
                            nr += _round(yb, bcode) != np.uint32(ts[j])
                            m &= m - np.uint64(1)
        sums[0] = sd
        sums[1] = sb
        if not (np.isfinite(sd) and np.isfinite(sb)):  # Σ of float32² cannot overflow float64
            return NONFINITE, ne, nr
        return OK, ne, nr

    return kernel


@functools.cache
def apply_stored_kernel(code: int, scode: int):
    """kernel(target, out, stored, exc_idx, exc_val, rt_idx, rt_base, rt_tuned, a32) → status.

    out = narrow(t + α₃₂·Δ) with Δ = widen(stored) in one vectorised pass; then the exceptions'
    elements recomputed with their exact d32, then m′ where the target is m at a round-trip element
    (the rt arrays are empty unless that applies). NONFINITE: NaN/Inf or an overflowing result
    (checked again element by element with the exact d32 when the fast pass saw one, since an
    exception's nearest-dtype value may overflow where d32 does not).
    """

    @njit(**_JIT)
    def kernel(target, out, stored, exc_idx, exc_val, rt_idx, rt_base, rt_tuned, a32):
        bad = np.uint32(0)
        for i in range(len(target)):
            t = _f32(_widen(target[i], code))
            w = _f32(_widen(stored[i], scode))
            rb = _u32(t + a32 * w)
            bad |= _too_big(rb, code)
            out[i] = _round(rb, code)
        if bad:  # maybe only at an exception's nearest-dtype value: check with the exact ones
            bad = np.uint32(0)
            p = 0
            nxt = exc_idx[0] if len(exc_idx) else -1
            for i in range(len(target)):
                w = _f32(_widen(stored[i], scode))
                if i == nxt:
                    w = exc_val[p]
                    p += 1
                    nxt = exc_idx[p] if p < len(exc_idx) else -1
                bad |= _too_big(_u32(_f32(_widen(target[i], code)) + a32 * w), code)
        for p in range(len(exc_idx)):
            i = exc_idx[p]
            t = _f32(_widen(target[i], code))
            rb = _u32(t + a32 * exc_val[p])
            bad |= _too_big(rb, code)
            out[i] = _round(rb, code)
        if bad:
            return NONFINITE
        for p in range(len(rt_idx)):
            i = rt_idx[p]
            if np.uint32(target[i]) == np.uint32(rt_base[p]):
                out[i] = rt_tuned[p]
        return OK

    return kernel


@functools.cache
def apply_pair_kernel(code: int, bcode: int, tcode: int, fix_rt: bool):
    """kernel(target, out, base, tuned, a32) → status: recycle, out = narrow(t + α₃₂·(f − b)), and
    out = m′ where the target is m bit for bit (`fix_rt`: α = 1, one dtype throughout)."""

    @njit(**_JIT)
    def kernel(target, out, base, tuned, a32):
        bad = np.uint32(0)
        for i in range(len(target)):
            tb = np.uint32(target[i])
            t = _f32(_widen(tb, code))
            w = _f32(_widen(tuned[i], tcode)) - _f32(_widen(base[i], bcode))
            rb = _u32(t + a32 * w)
            bad |= _too_big(rb, code)
            o = _round(rb, code)
            if fix_rt:
                o = np.uint32(tuned[i]) if tb == np.uint32(base[i]) else o
            out[i] = o
        return NONFINITE if bad else OK

    return kernel


@functools.cache
def apply_dense_kernel(code: int):
    """kernel(target, out, d32, a32) → status: out = narrow(t + α₃₂·d32) (vocabulary-realigned rows)."""

    @njit(**_JIT)
    def kernel(target, out, d32, a32):
        bad = np.uint32(0)
        for i in range(len(target)):
            t = _f32(_widen(target[i], code))
            rb = _u32(t + a32 * d32[i])
            bad |= _too_big(rb, code)
            out[i] = _round(rb, code)
        return NONFINITE if bad else OK

    return kernel
