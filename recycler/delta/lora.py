"""LoRA arithmetic, no I/O: an adapter's Δ (scale·B·A) row by row, and a Δ's low-rank factors.

Definitions (PEFT's, for the `LORA` type):
  scale            lora_alpha / r, or lora_alpha / √r with rsLoRA (`use_rslora`)
  Δ (Linear)       scale · B @ A, shape (out, in); A is (r, in), B is (out, r)
  Δ (transposed)   (scale · B @ A)ᵀ, shape (in, out): Conv1D layers (`fan_in_fan_out`) and Embedding
                   layers (`lora_embedding_A` (r, vocab), `lora_embedding_B` (dim, r))
We compute B @ A and the scaling in float64 and round once to float32, so Δ is the correctly rounded
product (a sum of r float32×float32 products is exact in float64 up to r ≈ 30 terms of the same
magnitude). PEFT's own merge computes B @ A in float32 (and, for 16-bit weights, rounds Δ to the
weight dtype before adding it): the two differ by that rounding, never by more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scaling rule (`LoraLayer.update_layer`)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_rows(a: np.ndarray, b: np.ndarray, scale: float, transposed: bool, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of the adapter's Δ as float32 (see the module docstring).

    a: (r, in) and b: (out, r) for a plain layer, in any float dtype; for a transposed layer only
    a[:, r0:r1] is used, so callers may pass exactly that slice with r0 = 0.
    """
    a64, b64 = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
    rows = (a64[:, r0:r1].T @ b64.T) if transposed else (b64[r0:r1] @ a64)
    rows *= scale
    out = rows.astype(np.float32)
    out += np.float32(0.0)  # −0 → +0: a zero product carries no sign worth keeping
    return out


# ---- Δ → low rank ---------------------------------------------------------------------------------

RANDOMIZED_FROM = 1024  # min(m, n) from which the truncated SVD is randomized (exact below)
OVERSAMPLE, POWER_ITERS = 16, 3


@dataclass(frozen=True)
class LowRank:
    """Δ ≈ b @ a with b (out, r) and a (r, in), float32; `error` = ‖Δ − b a‖_F / ‖Δ‖_F."""

    a: np.ndarray
    b: np.ndarray
    error: float
    sumsq_delta: float
    sumsq_error: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def low_rank(
    delta: np.ndarray, *, rank: int | None = None, energy: float | None = None, seed: int = 0
) -> LowRank:
    """Truncated SVD of a 2-D float32 Δ, at a fixed `rank` or the smallest rank whose singular values
    keep `energy` of ‖Δ‖²_F (capped at min(m, n)). Randomized (Halko et al., 2011) for large
    matrices, with a fixed seed so the same Δ always gives the same bytes.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    m = np.asarray(delta, dtype=np.float32)
    full = min(m.shape)
    total = sumsq(m)
    if total == 0.0:
        r = 1 if rank is None else min(rank, full)
        return LowRank(
            np.zeros((r, m.shape[1]), np.float32), np.zeros((m.shape[0], r), np.float32), 0.0, 0.0, 0.0
        )
    want = min(rank, full) if rank is not None else None
    u, s, vt = _svd(m, want, energy, total, seed)
    r = want if want is not None else _rank_for_energy(s, total, energy, full)
    root = np.sqrt(s[:r])
    b = (u[:, :r] * root).astype(np.float32)  # (out, r)
    a = (root[:, None] * vt[:r]).astype(np.float32)  # (r, in)
    err_sq = residual_sumsq(m, b, a)
    return LowRank(a, b, math.sqrt(err_sq / total), total, err_sq)


SUM_ROWS = 1 << 16  # elements per float64 block of the sums below (no copy of a whole matrix)


def sumsq(x: np.ndarray) -> float:
    """Σx² accumulated in float64, block by block."""
    flat = x.reshape(-1)
    total = 0.0
    for s in range(0, len(flat), SUM_ROWS):
        block = flat[s : s + SUM_ROWS].astype(np.float64)
        total += float(np.dot(block, block))
    return total


def residual_sumsq(m: np.ndarray, b: np.ndarray, a: np.ndarray) -> float:
    """‖m − b·a‖²_F in float64, a few rows at a time."""
    step = max(1, SUM_ROWS // m.shape[1])
    total = 0.0
    for r in range(0, m.shape[0], step):
        total += sumsq(m[r : r + step] - b[r : r + step] @ a)
    return total


def _rank_for_energy(s: np.ndarray, total: float, energy: float, full: int) -> int:
    kept = np.cumsum(s.astype(np.float64) ** 2) / total
    hit = np.flatnonzero(kept >= energy * (1 - 1e-12))
    return int(hit[0]) + 1 if len(hit) else min(len(s), full)


def _svd(
    m: np.ndarray, rank: int | None, energy: float | None, total: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U, S, Vᵀ with at least the columns needed: exact below RANDOMIZED_FROM, else randomized with a
    sketch that grows (×2) until it holds the requested rank or energy."""
    full = min(m.shape)
    if full < RANDOMIZED_FROM:
        return np.linalg.svd(m.astype(np.float64), full_matrices=False)
    k = rank if rank is not None else 64
    while True:
        q = min(full, k + OVERSAMPLE)
        if q >= full // 2:  # a sketch this wide costs what the exact SVD costs
            return np.linalg.svd(m.astype(np.float64), full_matrices=False)
        u, s, vt = _randomized(m, q, seed)
        if rank is not None or np.sum(s.astype(np.float64) ** 2) >= energy * total:
            return u, s, vt
        k *= 2


def _randomized(m: np.ndarray, q: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Randomized range finder with power iterations (re-orthonormalised), then an exact small SVD."""
    g = np.random.default_rng(seed)
    y = m @ g.standard_normal((m.shape[1], q), dtype=np.float32)  # (out, q)
    basis, _ = np.linalg.qr(y)
    for _ in range(POWER_ITERS):
        z, _ = np.linalg.qr(m.T @ basis)  # (in, q)
        basis, _ = np.linalg.qr(m @ z)
    small = (basis.T @ m).astype(np.float64)  # (q, in)
    uh, s, vt = np.linalg.svd(small, full_matrices=False)
    return basis.astype(np.float64) @ uh, s, vt
