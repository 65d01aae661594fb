"""What rank to pick: in the toy world, the accuracy of M_2 + (Δ → LoRA at rank r) against M_2 + Δ.

Per seed: the toy family (v1…v5), a full fine-tune of v1 on the family's task (its own budget), Δ =
FT − v1; then v2 + Δ, and v2 + (Δ as an adapter of rank r) for each rank (`recycler.stages.to_lora`,
the same code as `recycler lora-extract`; the adapter is applied as its scale·B·A). Also LoRA
fine-tuning (`finetune.method: lora`) from v2 and from v2 + Δ: the paper's finding with adapters.
Every accuracy is the held-out task's (recycler.stages.evaluate); the noise floor is the spread of v2 + Δ
across seeds. Not a timed benchmark: a table for the README.

    python bench/lora_rank_table.py                       # full toy world, seeds 0,1,2 (~minutes per seed)
    python bench/lora_rank_table.py --fast --seeds 0      # the small world (smoke run)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from recycler.delta.policy import ApplyPolicy
from recycler.stages.apply import apply_diff
from recycler.stages.evaluate.evaluators import load_task
from recycler.stages.extract import diff_checkpoints
from recycler.stages.finetune.recipe import finetune
from recycler.stages.model_folder import load_causal_lm, load_tokenizer
from recycler.stages.sources import stored_delta
from recycler.stages.to_lora import delta_to_lora
from recycler.toy import build_toy_family


def run_seed(seed: int, args) -> dict:
    fam = build_toy_family(args.cache, fast=args.fast, seed=seed)
    ft_cfg = fam.finetune_config
    task = load_task(
        fam.test,
        batch_size=ft_cfg.eval_batch_size,
        max_new_tokens=ft_cfg.eval_max_new_tokens,
        extract=ft_cfg.eval_extract,
    )
    work = args.work / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)

    def acc(folder: Path) -> float:
        return task.evaluate(load_causal_lm(folder), load_tokenizer(folder)).score

    v1, v2 = fam.versions["v1"], fam.versions["v2"]
    ft = work / "ft-v1"
    if not (ft / "config.json").exists():
        finetune(v1, fam.train, ft, ft_cfg, overwrite=True)
    delta = work / "delta"
    if not (delta / "manifest.json").exists():
        diff_checkpoints(v1, ft, delta, max_relative_norm=100.0, overwrite=True)
    row: dict = {"seed": seed, "M1+FT": acc(ft), "M2": acc(v2)}
    full = work / "v2+delta"
    apply_diff(v2, delta, full, policy=ApplyPolicy(), overwrite=True)
    row["M2+Δ"] = acc(full)
    for r in args.ranks:
        lora = work / f"lora-r{r}"
        m = delta_to_lora(stored_delta(delta), lora, rank=r, base_name=str(v2), overwrite=True).manifest
        out = work / f"v2+lora-r{r}"
        apply_diff(v2, lora, out, overwrite=True)
        row[f"r{r}"] = acc(out)
        row[f"r{r}_error"] = m["relative_error_all"]
    if args.lora_ft:
        lora_cfg = ft_cfg.updated(method="lora", lora_r=args.lora_ft, lora_alpha=2.0 * args.lora_ft)
        for name, start in (("LoRA-FT from M2", v2), ("LoRA-FT from M2+Δ", full)):
            out = work / name.replace(" ", "_").replace("+", "p")
            finetune(start, fam.train, out, lora_cfg, overwrite=True)
            row[name] = acc(out)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ranks", default="1,2,4,8,16,32")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--lora-ft", type=int, default=8, help="rank of the LoRA fine-tunes (0: skip them)")
    ap.add_argument("--cache", type=Path, default=Path("bench/out/toy-cache"))
    ap.add_argument("--work", type=Path, default=Path("bench/out/lora-rank"))
    args = ap.parse_args()
    args.ranks = [int(r) for r in args.ranks.split(",")]
    rows = [run_seed(int(s), args) for s in args.seeds.split(",")]
    cols = ["M2", "M2+Δ", *[f"r{r}" for r in args.ranks]]
    cols += ["LoRA-FT from M2", "LoRA-FT from M2+Δ"] if args.lora_ft else []
    print("\n| seed | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for row in rows:
        print(f"| {row['seed']} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    mean = {c: statistics.mean(r[c] for r in rows) for c in cols}
    print("| mean | " + " | ".join(f"{mean[c]:.3f}" for c in cols) + " |")
    if len(rows) > 1:
        spread = statistics.stdev(r["M2+Δ"] for r in rows)
        print(f"noise floor (sd of M2+Δ over seeds): {spread:.3f}")
    errs = " ".join(f"r{r}: {statistics.mean(x[f'r{r}_error'] for x in rows):.3f}" for r in args.ranks)
    print(f"‖Δ − adapter‖/‖Δ‖ (all tensors, mean over seeds): {errs}")
    (args.work / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
