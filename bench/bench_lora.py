"""Benchmark the adapter paths on the bench's synthetic bf16 Llama-shaped checkpoints (1 and 2 GB).

Side by side, each method a fresh subprocess (wall, CPU and peak RSS from wait4, as bench_delta.py):

  Δ → adapter at equal rank (the fine-tune m′_s − m_s written as a LoRA adapter for m_s)
    recycler         `recycler diff m_s m′_s --as-lora --rank R`
    mergekit         `mergekit-extract-lora` (mergekit 0.1.5 in its own venv, CPU), --max-rank R
    accuracy         ‖Δ − scale·B·A‖/‖Δ‖ over the same weight matrices, and the optimum (exact SVD)
  adapter → Δ → new base (an adapter trained on m_s, merged into m_t)
    recycler         `recycler recycle m_s ADAPTER m_t` (one streaming pass)
    peft             load m_t (bf16), PeftModel.from_pretrained, merge_and_unload, save_pretrained

The fine-tune here has structure an adapter can hold: m′_s = m_s + a rank-64 Δ per weight matrix with
decaying singular values (σ_k ∝ 0.9^k) + 5 % noise, drawn in float32 and rounded once to bf16. (The
pure-noise fine-tune of bench_delta.py has a flat spectrum: no rank is good for it.)

    python bench/bench_lora.py                       # 1 and 2 GB, rank 16, 1 repetition
Set MERGEKIT_EXTRACT_LORA to the tool (default: /work/bench-env/bin/mergekit-extract-lora or PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from bench_data import build
from bench_delta import run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PEFT_ROUTE = r"""
import sys, torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM
mt, adapter, out = sys.argv[1:4]
cfg = AutoConfig.from_pretrained(mt)
cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads  # the synthetic config's head_dim is the tiny one's
model = AutoModelForCausalLM.from_pretrained(mt, config=cfg, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out)
"""


def lowrank_finetune(ms: Path, out: Path, rank: int = 64, noise: float = 0.05, seed: int = 1) -> Path:
    """m_s + a structured, low-rank-dominated Δ (see the module docstring), shard by shard."""
    if (out / "config.json").exists():
        return out
    shutil.copytree(ms, out, ignore=shutil.ignore_patterns("*.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for shard in sorted(ms.glob("*.safetensors")):
        state = load_file(shard)
        for name, w in state.items():
            x = w.float()
            if x.dim() == 2 and "embed" not in name:
                m, n = x.shape
                k = min(rank, m, n)
                s = 0.9 ** torch.arange(k, dtype=torch.float32)
                d = (torch.randn(m, k, generator=g) * s) @ torch.randn(k, n, generator=g)
                d += noise * torch.randn(m, n, generator=g) * d.std()
                x += d * (0.1 * x.std() / d.std())  # ‖Δ‖/‖m‖ ≈ 0.1 per matrix
            state[name] = x.to(w.dtype)
        save_file(state, str(out / shard.name), metadata={"format": "pt"})
    return out


def tool() -> str | None:
    default = Path("/work/bench-env/bin/mergekit-extract-lora")
    return os.environ.get("MERGEKIT_EXTRACT_LORA") or (
        str(default) if default.exists() else shutil.which("mergekit-extract-lora")
    )


def tensors(folder: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out |= dict.fromkeys(h.keys(), f)
    return out


def get(ix: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(ix[name], "pt") as h:
        return h.get_tensor(name)


OPTIMUM: dict[tuple[str, str, int], float] = {}  # (fine-tune, tensor, rank) → Σσ² beyond the rank


def lora_modules(adapter: Path) -> set[str]:
    """The modules an adapter factors as B·A (not those it saves whole as modules_to_save)."""
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        return {
            k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            for k in f.keys()  # noqa: SIM118
            if k.endswith("lora_A.weight")
        }


def adapter_errors(
    adapter: Path, ms: Path, ft: Path, rank: int, optimum: bool = False, only: set[str] | None = None
) -> dict[str, float]:
    """‖Δ − scale·B·A‖/‖Δ‖ over the weight matrices the adapter covers (or the `only` ones: the same
    matrices for both tools), and the optimum at `rank` (Eckart–Young, from the exact singular values;
    computed once per tensor)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    state = load_file(adapter / "adapter_model.safetensors")
    ib, it = tensors(ms), tensors(ft)
    sums = {"delta": 0.0, "err": 0.0, "best": 0.0, "modules": 0}
    for key in state:
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        if only is not None and module not in only:
            continue
        name = f"{module}.weight"
        d = get(it, name).double() - get(ib, name).double()
        a, b = state[key].double(), state[key.replace("lora_A", "lora_B")].double()
        r = a.shape[0]
        alpha = cfg.get("alpha_pattern", {}).get(module, cfg.get("lora_alpha", r))
        r_cfg = cfg.get("rank_pattern", {}).get(module, cfg.get("r", r))
        scale = alpha / r_cfg
        key_opt = (str(ft), name, rank)
        if optimum and key_opt not in OPTIMUM:  # a full SVD: ~0.1 TFLOP per 2048×5632 matrix
            OPTIMUM[key_opt] = float((torch.linalg.svdvals(d.float()).double()[rank:] ** 2).sum())
        sums["delta"] += float((d**2).sum())
        sums["err"] += float(((d - scale * (b @ a)) ** 2).sum())
        sums["best"] += OPTIMUM.get(key_opt, float("nan"))
        sums["modules"] += 1
    return {
        "relative_error": (sums["err"] / sums["delta"]) ** 0.5,
        "optimum": (sums["best"] / sums["delta"]) ** 0.5,
        "modules": sums["modules"],
    }


def compare(a: Path, b: Path) -> tuple[int, int, float]:
    """Elements that differ between two model folders, and the largest |difference|."""
    ia, ib = tensors(a), tensors(b)
    differ = total = 0
    worst = 0.0
    for name in ia:
        x, y = get(ia, name), get(ib, name)
        differ += int((x != y).sum())
        total += x.numel()
        worst = max(worst, float((x.float() - y.float()).abs().max()))
    return differ, total, worst


def bench_size(size: float, args) -> list[dict]:
    paths = build(args.workdir, size)
    ms, mt = paths["ms"], paths["mt"]
    ft = lowrank_finetune(ms, paths["ms"].parent / "ft-lowrank")
    work = ms.parent / "lora-runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recycler = str(Path(sys.executable).parent / "recycler")
    rows = []
    ours = work / "recycler-lora"
    cmd = [recycler, "diff", str(ms), str(ft), "-o", str(ours), "--as-lora", "--rank", str(args.rank)]
    rows.append({"task": "Δ → adapter", "method": "recycler", **run(cmd)})
    print(json.dumps(rows[-1]), flush=True)
    exe = tool()
    if exe:
        theirs = work / "mergekit-lora"
        cmd = [exe, "--model", str(ft), "--base-model", str(ms), "--out-path", str(theirs)]
        cmd += ["--max-rank", str(args.rank), "--no-cuda", "--skip-undecomposable", "--quiet"]
        rows.append(
            {
                "task": "Δ → adapter",
                "method": "mergekit-extract-lora",
                **run(["env", "HF_HUB_OFFLINE=1", *cmd]),
            }
        )
        common = lora_modules(ours) & lora_modules(theirs)  # the same matrices for both tools
        for row, folder in ((rows[-2], ours), (rows[-1], theirs)):
            row |= adapter_errors(folder, ms, ft, args.rank, args.optimum, only=common)
            row["own_modules"] = len(lora_modules(folder))
            print(json.dumps(row), flush=True)
    else:
        rows[-1] |= adapter_errors(ours, ms, ft, args.rank, args.optimum)
    if args.only_extract:
        return _finish(rows, size, work, args)
    out_r, out_p = work / "recycled", work / "peft-merged"
    cmd = [recycler, "recycle", str(ms), str(ours), str(mt), "-o", str(out_r), "--quiet"]
    rows.append({"task": "adapter → new base", "method": "recycler recycle", **run(cmd)})
    print(json.dumps(rows[-1]), flush=True)
    rows.append(
        {
            "task": "adapter → new base",
            "method": "peft merge_and_unload",
            **run([sys.executable, "-c", PEFT_ROUTE, str(mt), str(ours), str(out_p)]),
        }
    )
    differ, total, worst = compare(out_r, out_p)
    rows[-1] |= {"elements_differing_from_recycler": differ, "elements": total, "max_abs_difference": worst}
    return _finish(rows, size, work, args)


def _finish(rows: list[dict], size: float, work: Path, args) -> list[dict]:
    for r in rows:
        r["size_gb"] = size
        print(json.dumps(r), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def report(rows: list[dict]) -> None:
    print("\n| size | task | method | wall s | CPU s | peak RSS GB | × other | ‖Δ−BA‖/‖Δ‖ (optimum) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        other = [x for x in rows if x["size_gb"] == r["size_gb"] and x["task"] == r["task"] and x is not r]
        ratio = f"{other[0]['wall_s'] / r['wall_s']:.1f}×" if other else "–"
        acc = (
            f"{r['relative_error']:.5f} over {r['modules']} matrices (optimum {r['optimum']:.5f})"
            if "relative_error" in r
            else "–"
        )
        print(
            f"| {r['size_gb']:g} GB | {r['task']} | {r['method']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['peak_rss_gb']:.2f} | {ratio} | {acc} |"
        )
    for r in rows:
        if "elements_differing_from_recycler" in r:
            n, t = r["elements_differing_from_recycler"], r["elements"]
            print(
                f"{r['size_gb']:g} GB: PEFT's merged model differs from recycler's in {n:,} of {t:,} elements "
                f"({100 * n / t:.2f}%), at most {r['max_abs_difference']:.3g} (PEFT rounds Δ to bf16 before adding)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2", help="checkpoint sizes in GB")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--optimum", action="store_true", help="also the Eckart–Young optimum (full SVDs: slow)")
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--only-extract", action="store_true", help="only the Δ → adapter rows")
    ap.add_argument("--keep", action="store_true", help="keep the adapters and merged models")
    args = ap.parse_args()
    np.seterr(all="ignore")
    rows = []
    for size in (float(s) for s in args.sizes.split(",")):
        rows += bench_size(size, args)
    report(rows)
    (args.workdir / "lora-results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
