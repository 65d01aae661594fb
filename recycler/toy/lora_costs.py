"""What the adapter form costs on the toy family: the LoRA section of `recycler reproduce --lora`.

The two questions a team that ships LoRA adapters asks, answered on the newest version M_i of each
seed's family with the Δs the iterative chain (Algorithm 1) registered:

(a) Does the paper's finding hold when fine-tuning is LoRA? LoRA fine-tuning (`finetune.method: lora`,
    the cycle's budget and seed) from M_i against from M_i + Δ^iter_{i−1}.
(b) What rank is enough to ship a Δ as an adapter? M_i + (Δ as a rank-r adapter, written by
    `delta_to_lora` and applied as its B·A by `apply_diff`) against M_i + Δ, per rank, with the
    relative reconstruction error ‖Δ − BA‖/‖Δ‖, for M_i's own fine-tune (Δ^iter_i) and for the
    recycled Δ^iter_{i−1}. "full" is every matrix at its full rank: what is left is what an adapter
    cannot carry (norm vectors), reported with its share of ‖Δ‖².

Everything goes through the same stages as the rest of the report (apply, evaluate, fine-tune), in
the seed's process and work folder (`SeedExperiments`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from recycler.stages.finetune.config import FinetuneConfig

if TYPE_CHECKING:
    from recycler.toy.experiments import SeedExperiments

DEFAULT_RANKS = (1, 2, 4, 8, 16)
FULL = "full"
FULL_RANK = 1 << 30  # capped per matrix at min(rows, cols) by the truncated SVD


@dataclass(frozen=True)
class LoraPlan:
    """The LoRA section's settings (picklable: it crosses into the seed's process).

    LoRA fine-tuning trains r·(rows + cols) numbers per matrix instead of rows·cols, so it moves the
    weights less per step at the full fine-tune's learning rate; `lr_scale` multiplies the family's
    learning rate, as LoRA recipes usually run at several times a full fine-tune's rate (5x: a
    conventional choice, not tuned on the toy world); r 8 with alpha 16 (scale 2) is a common setting."""

    ranks: tuple[int, ...] = DEFAULT_RANKS
    r: int = 8
    alpha: float = 16.0
    lr_scale: float = 5.0

    @property
    def steps(self) -> int:
        """Progress steps: for two Δs, the exact score and each rank's; two LoRA fine-tunes and their scores."""
        return 2 * (1 + len(rank_labels(self))) + 4

    def finetune_config(self, ft: FinetuneConfig) -> FinetuneConfig:
        return ft.updated(
            method="lora",
            lora_r=self.r,
            lora_alpha=self.alpha,
            learning_rate=ft.learning_rate * self.lr_scale,
        )


def rank_labels(plan: LoraPlan) -> list[str]:
    """Row keys of the rank table, lowest rank first: '1', '2', …, 'full'."""
    return [str(r) for r in sorted(set(plan.ranks))] + [FULL]


def run_lora_costs(exp: SeedExperiments, plan: LoraPlan, deltas: dict[str, Path], target: str) -> dict:
    """Both measurements on M_target, JSON-able, accuracies as fractions. `deltas`: "own", the cycle's
    Δ^iter of `target` itself (M_target + Δ is its fine-tuned model: can the fine-tune ship as an
    adapter?), and "recycled", the Δ^iter of the previous version (M_target + Δ is the recycled start:
    can a recycled Δ ship as an adapter for the new base?)."""
    base = exp.family.versions[target]
    res: dict = {"target": target, "cases": {}}
    exact = {}
    for case, delta in deltas.items():
        exact[case] = exp.apply(base, delta, f"lora-{case}-exact")
        res["cases"][case] = _rank_table(exp, plan, case, delta, base, exact[case])
    res["ft"], res["ft_curve"] = {}, {}
    config = plan.finetune_config(exp.ft)
    res["finetune_config"] = {"r": plan.r, "alpha": plan.alpha, "learning_rate": config.learning_rate}
    for key, model in (("base", base), ("recycled", exact["recycled"])):
        res["ft"][key], res["ft_curve"][key] = _lora_finetune(exp, config, model, f"lora-ft-{key}")
    return res


def _rank_table(
    exp: SeedExperiments, plan: LoraPlan, case: str, delta: Path, base: Path, exact: Path
) -> dict:
    """base + Δ, and base + (Δ as a rank-r adapter) for each rank, with what each truncation lost."""
    from recycler.stages.sources import stored_delta
    from recycler.stages.to_lora import delta_to_lora

    res: dict = {"delta": str(delta), "exact": exp.accuracy(exact, f"{case}: M + Δ"), "ranks": {}}
    for label in rank_labels(plan):
        adapter = exp.work / f"adapter-{case}-r{label}"
        rank = FULL_RANK if label == FULL else int(label)
        m = delta_to_lora(
            stored_delta(delta), adapter, rank=rank, base_name=str(base), overwrite=True
        ).manifest
        applied = exp.apply(base, adapter, f"lora-{case}-r{label}")
        res["ranks"][label] = {
            "accuracy": exp.accuracy(applied, f"{case}: M + rank-{label} adapter"),
            "max_rank": m["ranks"]["max"],
            "error_matrices": m["relative_error"].get("total", 0.0),  # over the adapted matrices
            "error_all": m["relative_error_all"],  # over all of Δ, the tensors left out included
            "dropped_share": m["dropped"]["share_of_delta_sumsq"],
        }
    return res


def _lora_finetune(exp: SeedExperiments, config: FinetuneConfig, start: Path, name: str) -> tuple:
    """(final accuracy of the merged model, curve [[step, accuracy], …]) of one LoRA fine-tune."""
    from recycler.stages.finetune.recipe import finetune

    exp.step(f"LoRA fine-tuning ({name})")
    out = exp.work / name
    record = finetune(start, exp.family.train, out, config, eval_path=exp.family.test, overwrite=True)
    return exp.accuracy(out, name), [[float(s), float(a)] for s, a in record["curve"]]
