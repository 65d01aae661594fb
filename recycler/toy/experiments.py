"""The paper's experiments on one toy family (one seed), through recycler's own service and stages.

Every fine-tune, Δ and recycled start comes from a release cycle run by the service over the family's
releases (recycler.toy.chain), and is read back from the registry and the cycle runs; the transfer
table applies those registered Δs to every other base. Every accuracy comes from
`recycler.stages.evaluate.evaluators` on the held-out task. Results are plain JSON-able dicts;
`recycler.toy.reproduce` aggregates seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

from recycler.delta.policy import ApplyPolicy
from recycler.stages.evaluate.evaluators import load_task
from recycler.stages.finetune.config import FinetuneConfig
from recycler.stages.model_folder import load_causal_lm, load_tokenizer
from recycler.stages.precheck import precheck
from recycler.toy.chain import Chain, run_chain
from recycler.toy.family import ToyFamily
from recycler.toy.lora_costs import LoraPlan, run_lora_costs

Tick = Callable[[str, int, int], None]  # (label, done, total)


class SeedExperiments:
    """Table 6 from the service's own cycles (recycler.toy.chain), then the transfer table over every
    pair of versions and the pre-check, from the Δs those cycles registered."""

    def __init__(
        self,
        family: ToyFamily,
        versions: list[str],
        work: Path,
        ft: FinetuneConfig,
        tick: Tick | None = None,
        finetune: dict | None = None,
        service: Path | None = None,
        lora: LoraPlan | None = None,
    ) -> None:
        self.family, self.versions, self.work, self.ft = family, versions, Path(work), ft
        self.service = Path(service) if service else self.work / "service"  # the chains' registry home
        self.finetune = (
            finetune or {}
        )  # overrides of the family's fine-tuning options, as in the cycle's spec
        self.tick = tick or (lambda *_: None)
        self.task = load_task(family.test, **ft.evaluation.model_dump())
        n = len(versions)
        self.total = 2 + (n - 1) ** 2 + n  # two chains, the non-adjacent transfer pairs, pre-checks
        self.lora = lora  # the LoRA section (recycler.toy.lora_costs), when asked for
        self.total += lora.steps if lora else 0
        self.done = 0
        self.timings: dict[str, float] = {}

    def step(self, label: str) -> None:
        self.tick(label, self.done, self.total)
        self.done += 1

    def accuracy(self, model_dir: Path, label: str) -> float:
        self.step(f"evaluating {label}")
        return self.task.evaluate(load_causal_lm(model_dir), load_tokenizer(model_dir)).score

    def apply(self, target: Path, delta: Path, name: str) -> Path:
        from recycler.stages.apply import apply_diff

        out = self.work / f"applied-{name}"
        apply_diff(target, delta, out, policy=ApplyPolicy(alpha=1.0), overwrite=True)
        return out

    def run(self) -> dict:
        t0 = time.monotonic()
        V = self.versions
        self.step("release cycles, mode direct (with FT(M) baselines)")
        chain = {"home": self.service, "artifacts": self.work / "artifacts"}
        direct = run_chain(
            self.family, V, chain["home"], "direct", self.finetune, artifacts=chain["artifacts"]
        )
        self.step("release cycles, mode iterative (Algorithm 1)")
        iterative = run_chain(
            self.family, V, chain["home"], "iterative", self.finetune, artifacts=chain["artifacts"]
        )
        self.timings["cycles_s"] = time.monotonic() - t0
        res = table_from_chains(V, direct, iterative) | {"n_test": len(self.task.examples)}
        deltas = {v: Path(direct.diffs[v]) for v in V}
        res["deltas"] = {
            v: str(d.relative_to(self.work)) for v, d in deltas.items()
        }  # in the seed's work folder
        for (
            src
        ) in V:  # the transfer table M_j + Δ_i, no training; adjacent forward pairs came from the cycles
            for tgt in V:
                if src != tgt and tgt not in res["transfer"][src]:
                    applied = self.apply(self.family.versions[tgt], deltas[src], f"{src}-to-{tgt}")
                    res["transfer"][src][tgt] = self.accuracy(applied, f"{tgt} + Δ {src}")
        self.timings["transfer_table_s"] = time.monotonic() - t0 - sum(self.timings.values())
        res["precheck"] = self._precheck(deltas)
        self.timings["precheck_s"] = time.monotonic() - t0 - sum(self.timings.values())
        if self.lora is not None:  # on the newest version, with the Δs of the iterative chain
            deltas = {"own": Path(iterative.diffs[V[-1]]), "recycled": Path(iterative.diffs[V[-2]])}
            res["lora"] = run_lora_costs(self, self.lora, deltas, V[-1])
            self.timings["lora_s"] = time.monotonic() - t0 - sum(self.timings.values())
        self.tick("done", self.total, self.total)
        res["timings"] = self.timings | {"total_s": time.monotonic() - t0}
        return res

    def _precheck(self, deltas: dict[str, Path]) -> dict:
        """Pre-check scores of every Δ_i for every M_j (i ≠ j), to compare with the transfer table."""
        V, M = self.versions, self.family.versions
        scores: dict = {}
        for tgt in V:
            self.step(f"pre-checking {tgt}")
            sources = [s for s in V if s != tgt]
            result = precheck(
                M[tgt],
                [deltas[s] for s in sources],
                bases=[M[s] for s in sources],
                sample=self.family.dev,
                n=64,
            )
            by_diff = {c.diff: c for c in result.candidates}
            scores[tgt] = {
                s: by_diff[str(deltas[s])].model_dump(exclude={"diff", "base", "notes"}) for s in sources
            }
            scores[tgt]["_target_loss"] = result.target_loss
        return scores


def table_from_chains(versions: list[str], direct: Chain, iterative: Chain) -> dict:
    """The per-seed results in the shape recycler.toy.findings reads, from the two chains:
    FT(M_i) (the direct chain's first fine-tune and baselines), FT(M_i + Δ^dir_{i−1}) (its
    fine-tunes), FT(M_i + Δ^iter_{i−1}) (the iterative chain's, from the third release on, where the
    two chains start to differ), and the no-training starts."""
    first = versions[0]
    res: dict = {"versions": versions, "base": dict(direct.base), "transfer": {v: {} for v in versions},
                 "recycled_ft": {}, "recycled_curve": {}, "iter_start": {}, "iter_ft": {}, "iter_curve": {},
                 "service": {"direct": direct.run_ids, "iterative": iterative.run_ids}}  # fmt: skip
    res["ft"] = {v: direct.ft[v] if v == first else direct.baseline[v] for v in versions}
    res["ft_curve"] = {v: direct.ft_curve[v] if v == first else direct.baseline_curve[v] for v in versions}
    for prev, v in pairwise(versions):
        res["transfer"][prev][v] = direct.start[v]
        res["recycled_ft"][v], res["recycled_curve"][v] = direct.ft[v], direct.ft_curve[v]
        if prev != first:
            res["iter_start"][v] = iterative.start[v]
            res["iter_ft"][v], res["iter_curve"][v] = iterative.ft[v], iterative.ft_curve[v]
    return res
