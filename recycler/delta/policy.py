"""Named policies for every way a Δ and a target can disagree, and the report that records each decision.

Nothing is skipped, truncated or re-mapped without a line in the CompatibilityReport: it is written
into the output folder (compatibility.json), printed as a summary, and can fail the run.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

VocabPolicy = Literal["auto", "tokens", "prefix", "error"]
TokenizerPolicy = Literal["auto", "source", "target"]


class ApplyPolicy(BaseModel):
    """How to combine a target base with a Δ.

    alpha: scale of Δ (1.0 = the paper's recycling).
    include/exclude: fnmatch patterns on target tensor names; excluded tensors are copied unchanged.
    only_in_delta: a Δ tensor with no target counterpart is an error (default) or ignored (reported).
    vocab: how embedding/lm_head rows are matched when vocabularies differ: 'auto' aligns by token
      string when both tokenizers exist and refuses otherwise; 'tokens' requires tokenizers; 'prefix'
      matches row i to row i (only right when one vocabulary extends the other); 'error' refuses any
      difference.
    tokenizer_from: where the output's tokenizer, chat template and generation config come from:
      'auto' takes the fine-tuned source's when vocabularies match (an instruct Δ needs its chat
      template), else the target's plus the source's chat template; 'source' or 'target' force it.
    """

    model_config = ConfigDict(frozen=True)

    alpha: float = 1.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    only_in_delta: Literal["error", "ignore"] = "error"
    vocab: VocabPolicy = "auto"
    tokenizer_from: TokenizerPolicy = "auto"

    def selects(self, name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


class CompatibilityReport(BaseModel):
    """Every decision taken while matching Δ tensors to target tensors."""

    applied: list[str] = Field(default_factory=list)
    kept_target_only: list[str] = Field(default_factory=list)
    ignored_delta_only: list[str] = Field(default_factory=list)
    excluded: list[str] = Field(default_factory=list)
    non_float_kept: list[str] = Field(default_factory=list)
    tied: list[str] = Field(default_factory=list)
    dtype_casts: dict[str, int] = Field(default_factory=dict)
    vocab: dict | None = None
    tokenizer: str = ""
    notes: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)

    def count_cast(self, delta_dtype: str, target_dtype: str) -> None:
        key = f"{delta_dtype}->{target_dtype}"
        self.dtype_casts = dict(Counter(self.dtype_casts) + Counter({key: 1}))

    def summary_lines(self) -> list[str]:
        lines = [f"applied Δ to {len(self.applied)} tensors"]
        for label, items in (
            ("kept unchanged (only in target)", self.kept_target_only),
            ("excluded by --include/--exclude", self.excluded),
            ("non-float tensors kept", self.non_float_kept),
            ("Δ tensors ignored (no target)", self.ignored_delta_only),
        ):
            if items:
                lines.append(
                    f"{label}: {len(items)} ({', '.join(items[:3])}{', …' if len(items) > 3 else ''})"
                )
        lines += [f"tied embeddings: {t}" for t in self.tied]
        if self.dtype_casts:
            lines.append("dtype: " + ", ".join(f"{k} ×{v}" for k, v in sorted(self.dtype_casts.items())))
        if self.vocab:
            v = self.vocab
            lines.append(
                f"vocabulary: {v['method']}, {v['matched']} rows matched, {v['new_in_target_zero_delta']} target rows "
                f"with zero Δ, {v['dropped_from_delta']} Δ rows dropped"
            )
        if self.tokenizer:
            lines.append(f"tokenizer: {self.tokenizer}")
        lines += self.notes
        return lines
