"""Δ arithmetic on whole tensors (flat numpy arrays in their carrier dtype: bf16 as uint16 bits).

The exactness contract, with d32 = float32(m′) − float32(m) (every operation rounded to float32):
  diff(m, m′)          = (stored, residual): d32 rounded to the store dtype, plus the sparse residual
                         that restores d32 exactly (`recycler.delta.residual`)
  apply(m_t, Δ, α)     = round_T(float32(m_t) ⊕ (α₃₂ ⊗ d32)), α₃₂ = float32(α), ⊗ ⊕ IEEE float32
                         multiply and add (no FMA), the float32 sum rounded to the target dtype T;
                         except that where m_t equals m bit for bit (α = 1, one dtype throughout) and
                         that formula would not give m′, the result is m′ = m_t + (m′ − m) exactly
  ⇒ apply(m, diff(m, m′)) == m′ bit for bit, for bf16, fp16 and fp32 checkpoints, always;
    apply(m_t, diff(m, m′)) is today's float32 formula everywhere else, whatever the store dtype.
These functions are the streaming engine's chunk kernels (`recycler.delta.kernels`) applied to a
whole tensor, so tests of this module test the engine's arithmetic.
"""

from __future__ import annotations

import re

import numpy as np

from recycler.delta.bits import carrier
from recycler.delta.kernels import DenseBlocks, PairBlocks, Scratch, StoredBlocks, apply_chunk, diff_chunk
from recycler.delta.residual import EMPTY, ChunkResidual

# The head before the embedding: GPT-NeoX's output projection is `embed_out`, which the embedding's
# pattern would claim (no tied-embedding treatment, its norm booked under the embedding).
_FAMILIES = (
    ("lm_head", re.compile(r"lm_head|embed_out|output\.weight$")),
    ("embed", re.compile(r"embed|wte|wpe|word_embeddings")),
    ("attention", re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj")),
    ("mlp", re.compile(r"mlp|ffn|feed_forward|gate_proj|up_proj|down_proj|experts")),
    ("norm", re.compile(r"norm|ln_")),
)


def tensor_family(name: str) -> str:
    """Coarse family of a tensor name, for per-family relative norms in manifests and reports."""
    for family, pattern in _FAMILIES:
        if pattern.search(name):
            return family
    return "other"


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {what} {a.shape} vs {b.shape}")


def diff(
    base: np.ndarray, base_dtype: str, tuned: np.ndarray, tuned_dtype: str, store: str
) -> tuple[np.ndarray, ChunkResidual]:
    """Δ of flat arrays: (stored values in `store`'s carrier, residual with indices into the array)."""
    _same_shape(base, tuned, "base vs tuned")
    out = np.empty(len(base), carrier(store))
    dc = diff_chunk(base, base_dtype, tuned, tuned_dtype, out, store, Scratch())
    return out, dc.residual


def decode(stored: np.ndarray, store: str, residual: ChunkResidual = EMPTY) -> np.ndarray:
    """d32, the exact float32 Δ, from its stored form."""
    out = np.empty(len(stored), np.float32)
    sc = Scratch()
    blocks = StoredBlocks(stored, store, residual)
    for s in range(0, len(out), sc.block):
        e = min(s + sc.block, len(out))
        np.copyto(out[s:e], blocks.fill(s, e, sc.d[: e - s], sc))
    return out


def apply(
    target: np.ndarray,
    dtype: str,
    stored: np.ndarray,
    store: str,
    residual: ChunkResidual = EMPTY,
    alpha: float = 1.0,
) -> np.ndarray:
    """m_t + α·Δ in the target's dtype (carrier), from a stored Δ and its residual."""
    _same_shape(target, stored, "target vs Δ")
    out = np.empty_like(target)
    sc = Scratch()
    apply_chunk(
        target, dtype, out, StoredBlocks(stored, store, residual), alpha, sc, exact_roundtrip=alpha == 1.0
    )
    return out


def apply_f32(target: np.ndarray, dtype: str, d32: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """m_t + α·Δ from a float32 Δ without residual (a Δ written before the residual existed)."""
    _same_shape(target, d32, "target vs Δ")
    out = np.empty_like(target)
    apply_chunk(target, dtype, out, DenseBlocks(d32), alpha, Scratch(), exact_roundtrip=False)
    return out


def recycle(
    base: np.ndarray,
    base_dtype: str,
    tuned: np.ndarray,
    tuned_dtype: str,
    target: np.ndarray,
    dtype: str,
    alpha: float = 1.0,
) -> np.ndarray:
    """m_t + α·(m′ − m) in one pass, Δ never stored: the same bits as apply(m_t, diff(m, m′), α)."""
    _same_shape(base, tuned, "base vs tuned")
    _same_shape(target, base, "target vs base")
    out = np.empty_like(target)
    blocks = PairBlocks(base, base_dtype, tuned, tuned_dtype)
    apply_chunk(target, dtype, out, blocks, alpha, Scratch(), exact_roundtrip=alpha == 1.0)
    return out
