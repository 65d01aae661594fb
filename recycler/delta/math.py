"""Pure Δ arithmetic: tensors in, tensors out, no I/O.

Exactness contract (tested bit for bit):
  diff(base, tuned)          = float32(tuned) - float32(base)                       (rounded once, in float32)
  apply(target, delta, α)    = cast_to_target_dtype(float32(target) + α·float32(delta))  (one more rounding)
  apply(base, diff(base, tuned)) == tuned   for bf16/fp16 models, always; for fp32 models whenever
  tuned and base are within a factor 2 of each other (Sterbenz), i.e. for any fine-tune; `roundtrip_mismatches`
  counts the exceptions so the writer can report them.
Storing Δ in bf16 instead rounds it once more: |error| <= |Δ|·2⁻⁸ per element before the final cast
(and none at all where tuned and base are within a factor 2 of each other).

The `*_into` kernels take preallocated float32 buffers so the streaming engine runs at memory speed:
on CPU, `x.float()` allocates and page-faults (~1 GB/s) while `buf.copy_(x)` into a warm buffer
runs at ~6 GB/s.
"""

from __future__ import annotations

import re

import torch

_FAMILIES = (
    ("embed", re.compile(r"embed|wte|wpe|word_embeddings")),
    ("lm_head", re.compile(r"lm_head|embed_out|output\.weight$")),
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


def diff(base: torch.Tensor, tuned: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Δ = tuned − base computed in float32, stored as `dtype`."""
    if base.shape != tuned.shape:
        raise ValueError(f"shape mismatch: base {tuple(base.shape)} vs tuned {tuple(tuned.shape)}")
    return (tuned.to(torch.float32) - base.to(torch.float32)).to(dtype)


def apply(target: torch.Tensor, delta: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """target + α·Δ computed in float32, cast back to the target's dtype."""
    if target.shape != delta.shape:
        raise ValueError(f"shape mismatch: target {tuple(target.shape)} vs delta {tuple(delta.shape)}")
    # torch.add(..., alpha=) is the same kernel `apply_into` uses, so streaming and eager results agree bitwise.
    return torch.add(target.to(torch.float32), delta.to(torch.float32), alpha=alpha).to(target.dtype)


def diff_into(
    base: torch.Tensor, tuned: torch.Tensor, base32: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Streaming `diff` of one flat chunk: `out` (float32) receives tuned − base, `base32` float32(base).

    Bit-identical to `diff`; `base32` is returned filled because the caller needs it for norms and the
    round-trip check, and widening it twice would cost a second pass over memory.
    """
    base32.copy_(base)
    out.copy_(tuned)
    return out.sub_(base32)


def apply_into(
    target: torch.Tensor, delta32: torch.Tensor | None, alpha: float, acc: torch.Tensor
) -> torch.Tensor:
    """Streaming `apply` of one flat chunk: `acc` (float32) receives float32(target) + α·Δ.

    The caller rounds `acc` once into the target's dtype (`out.copy_(acc)`), after checking it is
    finite; a chunk without Δ (`delta32` None) is the widened target. Bit-identical to `apply`.
    """
    acc.copy_(target)
    if delta32 is not None:
        acc.add_(delta32, alpha=alpha)
    return acc


def roundtrip_mismatches(base32: torch.Tensor, tuned: torch.Tensor, stored: torch.Tensor) -> int:
    """Elements where apply(base, stored Δ) would not give back `tuned` exactly.

    `base32` is float32(base); `stored` is the Δ chunk as written (float32 or a narrower dtype).
    0 for bf16/fp16 checkpoints with a float32 Δ (see the module docstring).
    """
    back = torch.add(base32, stored.to(torch.float32)).to(tuned.dtype)
    return int((back != tuned).sum())


def squared_norm(x32: torch.Tensor) -> float:
    """Σx² of a float32 chunk as a Python float (float64). Non-finite if any element is NaN/Inf."""
    return float(torch.dot(x32, x32))


def count_nonfinite(x: torch.Tensor) -> int:
    return int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0
