"""The sparse half of an exact Δ: which elements the stored Δ cannot give exactly, and their values.

A Δ tensor is stored in the inputs' dtype S (bf16 for a bf16 model) plus this residual. With
d32 = float32(m′) − float32(m), the float32 Δ every apply computes with:

  exc  every element where widen(stored) ≠ d32, with d32 itself (float32). For bf16 inputs these are
       the elements outside the Sterbenz region (sign flips, changes by more than 2×); decode =
       widen + scatter gives d32 bit for bit, so applying a ΔR Δ is applying today's float32 Δ.
  rt   every element where m + d32, rounded to the model's dtype, is not m′ bit for bit (bf16: values
       ≥ 17 binades apart, or a fine-tuned −0; fp32: any change by more than 2× that float32
       subtraction rounds), with m and m′ themselves. Where a target element equals m bit for bit,
       the exact m_t + (m′ − m) is m′, and apply writes m′ there: that makes apply(m, diff(m, m′)) = m′.

Indices are chunk-local here (the engine works chunk by chunk); `recycler.io.residual` stores them
tensor-global with pointer tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _i() -> np.ndarray:
    return np.zeros(0, np.int64)


def _f() -> np.ndarray:
    return np.zeros(0, np.float32)


@dataclass(frozen=True)
class ChunkResidual:
    """The residual of one chunk. Index arrays are int64, ascending, relative to the chunk start."""

    exc_idx: np.ndarray = field(default_factory=_i)
    exc_val: np.ndarray = field(default_factory=_f)  # float32 d32 at exc_idx
    rt_idx: np.ndarray = field(default_factory=_i)
    rt_base: np.ndarray = field(default_factory=_i)  # m at rt_idx, in the base's carrier dtype
    rt_tuned: np.ndarray = field(default_factory=_i)  # m′ at rt_idx, in the fine-tuned's carrier dtype

    @property
    def exceptions(self) -> int:
        return len(self.exc_idx)

    @property
    def roundtrip_fixes(self) -> int:
        return len(self.rt_idx)

    def check(self, count: int) -> None:
        """Raise ValueError unless indices are ascending, inside [0, count), and lengths agree.

        A residual read from disk has passed its sha256, but a consistent forgery must still not
        index outside the chunk.
        """
        for idx, *vals in ((self.exc_idx, self.exc_val), (self.rt_idx, self.rt_base, self.rt_tuned)):
            if any(len(v) != len(idx) for v in vals):
                raise ValueError("residual index and value counts differ")
            if len(idx) and (idx[0] < 0 or idx[-1] >= count or np.any(idx[1:] <= idx[:-1])):
                raise ValueError("residual indices out of range or not ascending")


EMPTY = ChunkResidual()
