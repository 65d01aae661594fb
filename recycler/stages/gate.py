"""The release cycle's decisions, as one pure function: which fine-tune competes, which Δ the next
cycle inherits, and whether the candidate replaces the serving champion.

No I/O, no registry: scores in, a `Decision` out, so every branch (first cycle, iterative, direct,
baseline with pick_best, refused) is a unit test with numbers one can check by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Role = Literal["ft", "ft-from-base"]  # the recycled (or first) fine-tune, or FT(M_i) from the plain base


class GateSettings(Protocol):
    mode: Literal["iterative", "direct"]
    gate_margin: float
    pick_best: bool


@dataclass(frozen=True)
class Decision:
    candidate: Role  # the fine-tune that competes for champion
    delta_source: Role  # the fine-tune whose Δ becomes the family's next-diff
    diff_mode: Literal["iterative", "direct"]
    promote: bool
    reason: str
    champion_before: float | None

    @property
    def gate(self) -> str:
        """The `gate` tag: `promoted` or `refused: <reason>`."""
        return "promoted" if self.promote else f"refused: {self.reason}"


def decide(scores: dict[str, float], champion: float | None, spec: GateSettings, *, first: bool) -> Decision:
    """Decide a cycle from its evaluation scores.

    `scores` has "base" and "ft" (the fine-tune started from M_i + Δ, or from M_i on the first
    cycle) and, with a baseline, "ft_from_base" (FT(M_i)). `champion` is the serving champion's score
    before this cycle (None if there is none).

    * candidate: "ft", unless a baseline exists, `pick_best` is on and FT(M_i) scored higher.
    * Δ source: in `direct` mode with a baseline, FT(M_i) (the paper's Δ^dir); otherwise the candidate.
      The Δ is iterative (Δ^iter = M*_i − M_i) when it comes from the recycled fine-tune.
    * promote: the candidate beats its base and the champion, each by `gate_margin`.
    """
    baseline = scores.get("ft_from_base")
    candidate: Role = "ft"
    if baseline is not None and spec.pick_best and baseline > scores["ft"]:
        candidate = "ft-from-base"
    source: Role = "ft-from-base" if baseline is not None and spec.mode == "direct" else candidate
    diff_mode = "iterative" if not first and source == "ft" else "direct"
    score = scores["ft"] if candidate == "ft" else baseline
    promote, reason = _gate(float(score), scores["base"], champion, spec.gate_margin)
    return Decision(candidate, source, diff_mode, promote, reason, champion)


def _gate(score: float, base: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """Promote only a model that beats its base and the serving champion by `margin`."""
    if score < base + margin:
        return False, f"fine-tuned {score:.3f} does not beat base {base:.3f} by {margin}"
    if champion is not None and score < champion + margin:
        return False, f"fine-tuned {score:.3f} does not beat champion {champion:.3f} by {margin}"
    return True, "promoted"
