"""The paper's experiments on one toy family (one seed), through recycler's own stages.

Every model is an HF folder written by `finetune`, `diff_checkpoints` or `apply_diff`, and every
accuracy comes from `recycler.stages.evaluate.evaluators` on the held-out task, so the toy exercises the same code paths
as a real release cycle. Results are plain JSON-able dicts; `recycler.toy.reproduce` aggregates seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

from recycler.delta.policy import ApplyPolicy
from recycler.stages.evaluate.evaluators import load_task
from recycler.stages.extract import diff_checkpoints
from recycler.stages.finetune.config import FinetuneConfig
from recycler.stages.finetune.recipe import finetune
from recycler.stages.model_folder import load_causal_lm, load_tokenizer
from recycler.stages.precheck import precheck
from recycler.toy.family import TOY_MAX_RELATIVE_NORM, ToyFamily

Tick = Callable[[str, int, int], None]  # (label, done, total)


class SeedExperiments:
    """Base/FT table, the transfer table, recycling-then-FT curves, Algorithm 1 and the pre-check."""

    def __init__(
        self, family: ToyFamily, versions: list[str], work: Path, ft: FinetuneConfig, tick: Tick | None = None
    ) -> None:
        self.family, self.versions, self.work, self.ft = family, versions, Path(work), ft
        self.tick = tick or (lambda *_: None)
        self.task = load_task(
            family.test,
            batch_size=ft.eval_batch_size,
            max_new_tokens=ft.eval_max_new_tokens,
            extract=ft.eval_extract,
        )
        n = len(versions)
        # evals (base, transfer, iterative starts) + fine-tunes + Δs + pre-checks
        self.total = n + n * (n - 1) + max(0, n - 2) + n + (n - 1) + max(0, n - 2) + n + max(0, n - 2) + n
        self.done = 0
        self.timings: dict[str, float] = {}

    # ---- one stage each -------------------------------------------------------------------------------

    def _step(self, label: str) -> None:
        self.tick(label, self.done, self.total)
        self.done += 1

    def accuracy(self, model_dir: Path, label: str) -> float:
        self._step(f"evaluating {label}")
        return self.task.evaluate(load_causal_lm(model_dir), load_tokenizer(model_dir)).score

    def fine_tune(self, start: Path, name: str) -> tuple[Path, list[list[float]]]:
        """FT `start` with the family's settings; returns the model and its accuracy curve [[step, acc]]."""
        self._step(f"fine-tuning {name}")
        out = self.work / f"ft-{name}"
        record = finetune(start, self.family.train, out, self.ft, eval_path=self.family.test, overwrite=True)
        return out, record["curve"]

    def diff(self, base: Path, tuned: Path, name: str) -> Path:
        self._step(f"extracting Δ {name}")
        out = self.work / f"delta-{name}"
        diff_checkpoints(base, tuned, out, overwrite=True, max_relative_norm=TOY_MAX_RELATIVE_NORM)
        return out

    def apply(self, target: Path, delta: Path, name: str) -> Path:
        from recycler.stages.apply import apply_diff

        out = self.work / f"applied-{name}"
        apply_diff(target, delta, out, policy=ApplyPolicy(alpha=1.0), overwrite=True)
        return out

    # ---- the experiments ------------------------------------------------------------------------------

    def run(self) -> dict:
        t0 = time.monotonic()
        V, M = self.versions, self.family.versions
        res: dict = {
            "versions": V,
            "n_test": len(self.task.examples),
            "base": {},
            "ft": {},
            "ft_curve": {},
            "transfer": {v: {} for v in V},
        }
        deltas, tuned = {}, {}
        for v in V:  # 1. base and fine-tuned accuracy; Δ_v = FT(M_v) − M_v
            res["base"][v] = self.accuracy(M[v], f"base {v}")
            tuned[v], res["ft_curve"][v] = self.fine_tune(M[v], v)
            res["ft"][v] = res["ft_curve"][v][-1][1]
            deltas[v] = self.diff(M[v], tuned[v], v)
        self.timings["base_and_ft_s"] = time.monotonic() - t0
        for src in V:  # 2. the transfer table M_j + Δ_i, no training (diagonal: M_j + Δ_j = FT(M_j))
            for tgt in V:
                if src != tgt:
                    applied = self.apply(M[tgt], deltas[src], f"{src}-to-{tgt}")
                    res["transfer"][src][tgt] = self.accuracy(applied, f"{tgt} + Δ {src}")
        self.timings["transfer_table_s"] = time.monotonic() - t0 - sum(self.timings.values())
        res |= self._recycling_then_finetuning(deltas)
        self.timings["recycling_s"] = time.monotonic() - t0 - sum(self.timings.values())
        res["precheck"] = self._precheck(deltas)
        self.timings["precheck_s"] = time.monotonic() - t0 - sum(self.timings.values())
        self.tick("done", self.total, self.total)
        res["timings"] = self.timings | {"total_s": time.monotonic() - t0}
        return res

    def _recycling_then_finetuning(self, deltas: dict[str, Path]) -> dict:
        """FT from M_k + Δ^dir_{k−1} (curves), and Algorithm 1: M*_k = FT(M_k + (M*_{k−1} − M_{k−1}))."""
        V, M = self.versions, self.family.versions
        out: dict = {
            "recycled_ft": {},
            "recycled_curve": {},
            "iter_start": {},
            "iter_ft": {},
            "iter_curve": {},
        }
        star: dict[str, Path] = {}
        for prev, v in pairwise(V):
            start = self.work / f"applied-{prev}-to-{v}"  # written by the transfer table
            star_dir, out["recycled_curve"][v] = self.fine_tune(start, f"{v}-from-{prev}")
            out["recycled_ft"][v] = out["recycled_curve"][v][-1][1]
            if prev == V[0]:  # M*_1 = FT(M_1), so Δ^iter_1 = Δ^dir_1 and M*_2 is the recycled FT
                star[v] = star_dir
                continue
            d_iter = self.diff(M[prev], star[prev], f"iter-{prev}")
            start = self.apply(M[v], d_iter, f"iter-{prev}-to-{v}")
            out["iter_start"][v] = self.accuracy(start, f"{v} + Δiter {prev}")
            star[v], out["iter_curve"][v] = self.fine_tune(start, f"{v}-iterative")
            out["iter_ft"][v] = out["iter_curve"][v][-1][1]
        return out

    def _precheck(self, deltas: dict[str, Path]) -> dict:
        """Pre-check scores of every Δ_i for every M_j (i ≠ j), to compare with the transfer table."""
        V, M = self.versions, self.family.versions
        scores: dict = {}
        for tgt in V:
            self._step(f"pre-checking {tgt}")
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
