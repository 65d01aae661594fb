"""The release cycle's decisions, as one pure function: which fine-tune competes, which Δ the next
cycle inherits, and whether the candidate replaces the serving champion.

No I/O, no registry: evidence in, a `Decision` out, so every branch (first cycle, iterative, direct,
baseline with pick_best, refused) is a unit test with numbers one can check by hand.

The gate reads noise. With per-example results (1 = correct) of two models on the same examples, it
takes the paired difference d_i = a_i − b_i and its confidence interval mean(d) ± z·sd(d)/√n (normal
approximation; z for `gate_confidence`). `superiority` promotes when the interval's lower bound
exceeds `gate_margin` against the base and against the champion: a tie, or a 0.1-point "gain" on 600
problems, never promotes. `non-inferiority` promotes a candidate that beats its base and is no worse
than the champion by more than `gate_margin` (a new base whose other qualities you want). Without
per-example results the interval is the point difference (strict comparison). Scores of different
provenance (task file content, evaluation settings) are never compared: `decide` refuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Literal, Protocol

Role = Literal["ft", "ft-from-base"]  # the recycled (or first) fine-tune, or FT(M_i) from the plain base
Rule = Literal["superiority", "non-inferiority"]


class GateSettings(Protocol):
    mode: Literal["iterative", "direct"]
    gate_margin: float
    gate_rule: Rule
    gate_confidence: float
    pick_best: bool


@dataclass(frozen=True)
class Evidence:
    """A model's score, and how it was measured: per-example outcomes (task order) and provenance
    (digest of the task file's content and the evaluation settings)."""

    score: float
    outcomes: tuple[int, ...] | None = None
    provenance: str = ""


@dataclass(frozen=True)
class Comparison:
    """Paired difference of the candidate against `against`, with its confidence interval."""

    against: str
    diff: float
    low: float
    high: float
    n: int | None  # examples paired (None: scores compared without per-example results)

    def text(self) -> str:
        if self.n is None:
            return f"{self.diff:+.4f} vs {self.against} (no per-example results: point comparison)"
        return f"{self.diff:+.4f} vs {self.against}, interval {self.low:+.4f} to {self.high:+.4f} on {self.n} examples"


@dataclass(frozen=True)
class Decision:
    candidate: Role  # the fine-tune that competes for champion
    delta_source: Role  # the fine-tune whose Δ becomes the family's next-diff
    diff_mode: Literal["iterative", "direct"]
    promote: bool
    reason: str
    champion_before: float | None
    comparisons: tuple[Comparison, ...] = field(default=())
    rule: str = ""

    @property
    def gate(self) -> str:
        """The `gate` tag: `promoted` or `refused: <reason>`."""
        return "promoted" if self.promote else f"refused: {self.reason}"


def as_evidence(value: Evidence | float) -> Evidence:
    return value if isinstance(value, Evidence) else Evidence(float(value))


def paired(a: Evidence, b: Evidence, against: str, confidence: float) -> Comparison:
    """a − b, paired per example when both have outcomes on the same examples."""
    if a.provenance != b.provenance:
        raise ValueError(
            f"refusing to compare scores of different provenance ({a.provenance or '?'} vs "
            f"{b.provenance or '?'} against {against}): re-score both under the same settings"
        )
    if a.outcomes is None or b.outcomes is None or len(a.outcomes) != len(b.outcomes) or len(a.outcomes) < 2:
        diff = a.score - b.score
        return Comparison(against, diff, diff, diff, None)
    d = [x - y for x, y in zip(a.outcomes, b.outcomes, strict=True)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * sd / math.sqrt(n)
    return Comparison(against, mean, mean - half, mean + half, n)


def decide(
    scores: dict[str, Evidence | float], champion: Evidence | float | None, spec: GateSettings, *, first: bool
) -> Decision:
    """Decide a cycle from its evaluation evidence.

    `scores` has "base" and "ft" (the fine-tune started from M_i + Δ, or from M_i on the first
    cycle) and, with a baseline, "ft_from_base" (FT(M_i)). `champion` is the serving champion's
    evidence before this cycle (None if there is none), measured like the others.

    * candidate: "ft", unless a baseline exists, `pick_best` is on and FT(M_i) scored higher.
    * Δ source: in `direct` mode with a baseline, FT(M_i) (the paper's Δ^dir); otherwise the candidate.
      The Δ is iterative (Δ^iter = M*_i − M_i) when it comes from the recycled fine-tune.
    * promote: per `gate_rule` (module docstring), against the base and the champion.
    """
    ev = {k: as_evidence(v) for k, v in scores.items()}
    champ = None if champion is None else as_evidence(champion)
    baseline = ev.get("ft_from_base")
    candidate: Role = "ft"
    if baseline is not None and spec.pick_best and baseline.score > ev["ft"].score:
        candidate = "ft-from-base"
    source: Role = "ft-from-base" if baseline is not None and spec.mode == "direct" else candidate
    diff_mode = "iterative" if not first and source == "ft" else "direct"
    cand = ev["ft"] if candidate == "ft" else baseline
    assert cand is not None
    comparisons = [paired(cand, ev["base"], "base", spec.gate_confidence)]
    if champ is not None:
        comparisons.append(paired(cand, champ, "champion", spec.gate_confidence))
    promote, reason = _gate(comparisons, spec.gate_rule, spec.gate_margin)
    measured = cand.provenance or "unrecorded provenance"  # all compared scores share it (`paired`)
    rule = f"{spec.gate_rule}, margin {spec.gate_margin}, {100 * spec.gate_confidence:g}% interval, scores of {measured}"
    return Decision(
        candidate,
        source,
        diff_mode,
        promote,
        reason,
        None if champ is None else champ.score,
        tuple(comparisons),
        rule,
    )


def _gate(comparisons: list[Comparison], rule: Rule, margin: float) -> tuple[bool, str]:
    for c in comparisons:
        # non-inferiority: better than its own base, no worse than the champion by `margin`
        bound = margin if rule == "superiority" else -margin if c.against == "champion" else 0.0
        if not c.low > bound:
            how = "is not above" if c.n is None else "has its lower bound not above"
            return False, f"{c.text()}: {how} {bound:+g} ({rule})"
    return True, "promoted"
