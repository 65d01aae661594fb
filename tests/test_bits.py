"""The numpy bit conversions against torch, the oracle, bit for bit (recycler.delta.bits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recycler.delta.bits import OVERFLOW_AT, bits, narrow, round_sparse, widen


def as_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(a.copy())
    return t.view(torch.bfloat16) if dtype == "BF16" else t


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def f32_patterns() -> np.ndarray:
    """float32 values that hit every rounding case of a narrowing to bf16/fp16: all low halves of a
    spread of high halves (ties, just below/above ties), subnormals, ±0, and values near each max."""
    rng = np.random.default_rng(0)
    hi = np.concatenate(
        [
            np.arange(0, 0x7F80, 97),
            np.arange(0x8000, 0xFF80, 101),
            [0, 0x8000, 0x0001, 0x8001, 0x7F7F, 0xFF7F],
        ]
    ).astype(np.uint32)
    lo = np.concatenate([[0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], rng.integers(0, 1 << 16, 40)]).astype(
        np.uint32
    )
    words = (hi[:, None] << 16 | lo[None, :]).ravel()
    halfish = (rng.standard_normal(200_000) * np.exp(rng.uniform(-20, 11, 200_000))).astype(np.float32)
    return np.concatenate(
        [words.view(np.float32), halfish, np.float32([65504, 65519.99, -65504, 6e-8, 1e-45])]
    )


def test_widen_bf16_every_pattern_is_torch_bitwise():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = widen(every, "BF16", np.empty(1 << 16, np.float32))
    want = as_torch(every, "BF16").float().numpy()
    assert np.array_equal(bits(out), bits(want))  # NaN payloads included


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_narrow_is_round_to_nearest_even_like_torch(dtype):
    x = f32_patterns()
    x = x[np.isfinite(x) & (np.abs(x) < OVERFLOW_AT[dtype])]  # the range narrow() is specified for
    out = np.empty(len(x), np.uint16 if dtype == "BF16" else np.float16)
    narrow(x, dtype, out, np.empty(len(x), np.uint32))
    want = as_numpy(torch.from_numpy(x).to(torch.bfloat16 if dtype == "BF16" else torch.float16))
    assert np.array_equal(bits(out), bits(want))
    assert np.array_equal(bits(round_sparse(x, dtype)), bits(want))  # the sparse path agrees


@pytest.mark.parametrize(("dtype", "maxbits"), [("BF16", 0x7F7F), ("F16", 0x7BFF)])
def test_saturating_rounding_keeps_a_stored_delta_finite(dtype, maxbits):
    x = np.float32([3.4e38, -3.4e38, 1e30, 7e4, -7e4, 1.0])
    r = bits(round_sparse(x, dtype, saturate=True))
    finite = np.abs(x) >= OVERFLOW_AT[dtype]
    assert np.all(r[finite] & 0x7FFF == maxbits) and np.all((r[finite] >> 15) == (x[finite] < 0))
    assert np.array_equal(r[~finite], bits(round_sparse(x[~finite], dtype)))


def test_widen_f16_and_f64_match_torch():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    h = h[np.isfinite(h)]
    assert np.array_equal(
        bits(widen(h, "F16", np.empty(len(h), np.float32))), bits(torch.from_numpy(h).float().numpy())
    )
    d = np.random.default_rng(1).standard_normal(10_000) * 1e3
    assert np.array_equal(widen(d, "F64", np.empty(len(d), np.float32)), torch.from_numpy(d).float().numpy())


def test_nan_never_rounds_to_a_number():
    """0x7FFFFFFF + rounding would carry into the sign bit (−0): every NaN becomes 0xFFFF, as in torch."""
    nans = np.uint32([0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFFC00001]).view(np.float32)
    assert np.all(round_sparse(nans, "BF16") == 0xFFFF)
    assert np.array_equal(round_sparse(nans, "BF16"), as_numpy(torch.from_numpy(nans).to(torch.bfloat16)))
