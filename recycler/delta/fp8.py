"""FP8 weights (safetensors F8_E4M3 = torch.float8_e4m3fn, F8_E5M2 = torch.float8_e5m2) as uint8 bits.

Every FP8 value is a float32 value, so widening is a 256-entry table lookup and exact; a Δ of FP8
weights is computed and stored in float32 like any other. Narrowing a float32 result back is a
round to nearest, ties to even, on the exact values (float64 midpoints, never a second rounding).
A result that rounds beyond the largest finite value is refused, as BF16/F16 overflows are, rather
than saturated: E4M3 above 464 (464 itself is a tie that goes to the even 448; the format has no
Inf), E5M2 from 59392 (the tie above 57344 goes to the even code, Inf). torch's CPU conversion
saturates E4M3 to 448 and sends 59392 to 57344, so it is not the reference here; the IEEE rule is.
"""

from __future__ import annotations

import numpy as np

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
# The smallest float32 magnitude that overflows each format.
OVERFLOW_AT = {"F8_E4M3": float(np.nextafter(np.float32(464.0), np.float32(np.inf))), "F8_E5M2": 59392.0}


class NarrowOverflow(ArithmeticError):
    """A finite float32 result beyond the largest value of the output dtype."""

    def __init__(self, dtype: str, value: float):
        self.dtype, self.value = dtype, value
        super().__init__(f"{value!r} does not fit in {dtype}")


def _values(dtype: str) -> np.ndarray:
    """float64 value of each of the 256 codes (NaN/Inf where the format has them)."""
    mbits, bias = (3, 7) if dtype == "F8_E4M3" else (2, 15)
    out = np.empty(256, np.float64)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        e, m = (code & 0x7F) >> mbits, code & ((1 << mbits) - 1)
        if dtype == "F8_E4M3" and (code & 0x7F) == 0x7F:
            v = np.nan
        elif dtype == "F8_E5M2" and e == 31:
            v = np.inf if m == 0 else np.nan
        elif e == 0:
            v = m * 2.0 ** (1 - bias - mbits)
        else:
            v = (1 + m / (1 << mbits)) * 2.0 ** (e - bias)
        out[code] = sign * v
    return out


_VALUES = {d: _values(d) for d in FP8_DTYPES}
WIDEN = {d: v.astype(np.float32) for d, v in _VALUES.items()}  # exact: 2-4 significant bits
# Finite non-negative values in code order (increasing), for the rounding search.
_POSITIVE = {d: v[: int(np.argmax(~np.isfinite(v[:128]))) or 128] for d, v in _VALUES.items()}


def widen_fp8(src: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    np.take(WIDEN[dtype], src, out=out)
    return out


def narrow_fp8(src: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """Round finite float32 `src` to FP8 codes in `out` (nearest, ties to even; −0 stays −0).

    Raises NarrowOverflow for a value that does not fit (see the module docstring)."""
    a = np.abs(src.astype(np.float64))
    if len(a) and (top := float(a.max())) >= OVERFLOW_AT[dtype]:
        raise NarrowOverflow(dtype, top)
    pos = _POSITIVE[dtype]
    hi = np.minimum(np.searchsorted(pos, a, side="left"), len(pos) - 1)  # pos[hi-1] < a <= pos[hi]
    lo = np.maximum(hi - 1, 0)
    mid = (pos[lo] + pos[hi]) / 2  # exact in float64
    up = (a > mid) | ((a == mid) & (hi % 2 == 0))
    code = np.where(a == pos[hi], hi, np.where(up, hi, lo)).astype(np.uint8)
    code |= np.signbit(src).astype(np.uint8) << 7
    np.copyto(out, code)
