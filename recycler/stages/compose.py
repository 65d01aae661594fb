"""Δs compose: m_t + Σ_i α_i·Δ_i, with α per Δ and per tensor family or layer range, rounded once.

The formula generalises the one-Δ apply (`recycler.delta.math`), with d_i the exact float32 Δs:
    out = round_T(float32(m_t) + acc),  acc = float32(α_1·d_1) ⊕ float32(α_2·d_2) ⊕ …   (⊕: float32 +, in order)
A Δ whose α is 0 for a tensor is left out of that tensor's sum, and a tensor no Δ reaches is copied
bit for bit (so "embeddings not at all" means the target's embeddings, exactly). The sum is built in
float32 chunk by chunk and handed to the existing apply kernel as one Δ with α = 1: one rounding to
the target dtype. Each Δ is matched to the target by its own plan (`plan_transfer`: vocabulary
re-alignment, tied embeddings, selection globs), and every decision goes into the one report.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recycler.delta.compat import Job, Side, plan_transfer
from recycler.delta.math import tensor_family
from recycler.delta.policy import ApplyPolicy, CompatibilityReport
from recycler.errors import IncompatibleCheckpoints
from recycler.io.manifest import fail_if, listed_file_problems
from recycler.io.reader import ChunkReader, DeltaSource, RowMapped
from recycler.io.safetensors import TensorEntry
from recycler.stages.apply import TransferResult, transfer
from recycler.stages.sources import DeltaInputs

FAMILIES = ("embed", "lm_head", "attention", "mlp", "norm", "other")
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_RULE = re.compile(r"^(?:(?P<delta>\d+):)?(?P<selector>[^=]+)=(?P<alpha>[^=]+)$")


@dataclass(frozen=True)
class AlphaRule:
    """`[N:]SELECTOR=α`: α for the tensors SELECTOR picks, of Δ number N (1-based) or of every Δ.

    SELECTOR: a tensor family (embed, lm_head, attention, mlp, norm, other), `layers:A-B` (inclusive)
    or `layers:A`, or an fnmatch glob on tensor names; `+` joins selectors that must all match.
    """

    delta: int | None
    selector: str
    alpha: float

    def matches(self, name: str) -> bool:
        return all(_selects(part.strip(), name) for part in self.selector.split("+"))

    @property
    def text(self) -> str:
        return (
            f"{self.delta}:{self.selector}={self.alpha:g}"
            if self.delta
            else f"{self.selector}={self.alpha:g}"
        )


def _selects(part: str, name: str) -> bool:
    if part in FAMILIES:
        return tensor_family(name) == part
    if part.startswith("layers:"):
        lo, _, hi = part.removeprefix("layers:").partition("-")
        m = _LAYER.search(name)
        return m is not None and int(lo) <= int(m[1]) <= int(hi or lo)
    return fnmatch.fnmatchcase(name, part)


def parse_rule(text: str, deltas: int) -> AlphaRule:
    """Parse `[N:]SELECTOR=α`; ValueError says what was expected."""
    m = _RULE.match(text.strip())
    hint = "expected [N:]SELECTOR=ALPHA, e.g. 'mlp=0.5', '2:embed=0', 'layers:0-3=0.8', 'attention+layers:8-15=1.2'"
    if not m:
        raise ValueError(f"alpha rule {text!r}: {hint}")
    try:
        alpha = float(m["alpha"])
    except ValueError:
        raise ValueError(f"alpha rule {text!r}: {m['alpha']!r} is not a number; {hint}") from None
    n = int(m["delta"]) if m["delta"] else None
    if n is not None and not 1 <= n <= deltas:
        raise ValueError(f"alpha rule {text!r}: Δ number {n}, but {deltas} Δ(s) given (numbered from 1)")
    sel = m["selector"].strip()
    for part in sel.split("+"):
        part = part.strip()
        if part.startswith("layers:") and not re.fullmatch(r"layers:\d+(-\d+)?", part):
            raise ValueError(f"alpha rule {text!r}: layer range {part!r} must be layers:A or layers:A-B")
    return AlphaRule(n, sel, alpha)


def alpha_for(i: int, name: str, default: float, rules: Sequence[AlphaRule]) -> float:
    """α of Δ number i+1 on tensor `name`: the last matching rule's, else the Δ's own."""
    alpha = default
    for rule in rules:
        if (rule.delta is None or rule.delta == i + 1) and rule.matches(name):
            alpha = rule.alpha
    return alpha


class ComposedDelta:
    """Σ α_i·Δ_i of one tensor in float32, in the order given (a DeltaSource for the apply kernels)."""

    def __init__(self, parts: list[tuple[DeltaSource, float]], chunks: ChunkReader, numel: int):
        self.parts, self.chunks, self.numel = parts, chunks, numel

    def blocks(self, start: int, count: int):
        from recycler.delta.kernels import DenseBlocks

        out = self.chunks.scratch("composed", count)
        self.read_f32(start, count, out)
        return DenseBlocks(out)

    def read_f32(self, start: int, count: int, out: np.ndarray) -> None:
        tmp = self.chunks.scratch("composed-part", count)
        for k, (source, alpha) in enumerate(self.parts):
            source.read_f32(start, count, tmp)
            a32 = np.float32(alpha)
            if k == 0:
                np.multiply(tmp, a32, out=out)
            else:
                np.multiply(tmp, a32, out=tmp)
                np.add(out, tmp, out=out)


@dataclass(frozen=True)
class _Part:
    index: int
    delta_name: str
    rowmap: object
    alpha: float


def compose(
    target_path: Path,
    deltas: Sequence[DeltaInputs],
    alphas: Sequence[float],
    rules: Sequence[AlphaRule],
    out: Path,
    *,
    policy: ApplyPolicy = ApplyPolicy(),
    inputs: Sequence[Path] = (),
    **kw,
) -> TransferResult:
    """Write target + Σ α_i·Δ_i (see the module docstring). `policy.alpha` is ignored: α comes from
    `alphas` (one per Δ) and `rules`. Stored Δs' residual files are re-hashed before any write."""
    if len(alphas) != len(deltas):
        raise ValueError(f"{len(alphas)} α for {len(deltas)} Δs: give one --alpha per Δ, or one for all")
    for d in deltas:
        fail_if(listed_file_problems(d.side_folder, d.must_match), f"{d.side_folder}: Δ altered")
    plans: dict[str, list[_Part]] = {}
    entries: dict[str, TensorEntry] = {}

    def planner(side: Side[TensorEntry]) -> tuple[list[Job[TensorEntry]], CompatibilityReport]:
        report = CompatibilityReport()
        order: list[TensorEntry] = list(side.tensors.values())
        for i, d in enumerate(deltas):
            one = policy.model_copy(update={"alpha": alphas[i]})
            jobs, rep = plan_transfer(side, d.side, one)
            report.notes += [f"Δ{i + 1}: {line}" for line in rep.summary_lines()]
            report.vocab = rep.vocab or report.vocab
            for job in jobs:
                entries[job.entry.name] = job.entry
                if job.delta_name is None:
                    continue
                a = alpha_for(i, job.entry.name, alphas[i], rules)
                if a != 0.0:
                    plans.setdefault(job.entry.name, []).append(_Part(i, job.delta_name, job.rowmap, a))
        jobs = [Job(e, e.name if e.name in plans else None) for e in order]
        report.applied = [e.name for e in order if e.name in plans]
        report.kept_target_only = [e.name for e in order if e.is_float and e.name not in plans]
        report.non_float_kept = [e.name for e in order if not e.is_float]
        return jobs, report

    def opener(chunks: ChunkReader):
        makers = [d.open(chunks) for d in deltas]

        def make(name: str) -> DeltaSource:
            entry, parts = entries[name], plans[name]
            cols = int(np.prod(entry.shape[1:])) if len(entry.shape) > 1 else 1
            sources = []
            for p in parts:
                src = makers[p.index](p.delta_name)
                if p.rowmap is not None:
                    src = RowMapped(src, p.rowmap, cols, chunks)
                sources.append((src, p.alpha))
            return ComposedDelta(sources, chunks, entry.numel)

        return make

    listing = [
        {
            "delta": i + 1,
            "alpha": alphas[i],
            "rules": [r.text for r in rules if r.delta in (None, i + 1)],
            "source": d.provenance,
        }
        for i, d in enumerate(deltas)
    ]
    composite = DeltaInputs(
        side=deltas[0].side,
        side_folder=deltas[0].side_folder,
        provenance={"kind": "composition", "deltas": listing},
        open=opener,
    )
    extra = {
        "alpha": list(alphas),
        "alpha_rules": [r.text for r in rules],
        "composition": {
            "formula": "round_T(float32(m_t) + Σ_i float32(α_i·Δ_i)), the sum in float32 in the order listed",
            "deltas": listing,
        },
    }
    return transfer(
        target_path,
        composite,
        out,
        inputs=list(inputs),
        policy=policy.model_copy(update={"alpha": 1.0}),  # the α's are in the composed Δ already
        planner=planner,
        manifest_extra=extra,
        **kw,
    )


def check_alphas(alphas: Sequence[float], n: int) -> list[float]:
    """One α for all Δs or one per Δ."""
    if len(alphas) == 1:
        return list(alphas) * n
    if len(alphas) != n:
        raise IncompatibleCheckpoints(
            f"{len(alphas)} --alpha values for {n} Δs: give one for all, or one per Δ"
        )
    return list(alphas)
