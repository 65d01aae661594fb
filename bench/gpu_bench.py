"""GPU benchmark: fine-tuning throughput (tokens/s/GPU, MFU) and Δ diff/apply throughput (GB/s).

    python bench/gpu_bench.py --model /scratch/llama-3.1-8b --config ft.yaml --steps 20   # on a GPU node
    python bench/gpu_bench.py --model M --gpus 8 --config ft.yaml                          # 8 GPUs (FSDP)
    python bench/gpu_bench.py --smoke                                                      # tiny model, CPU

The fine-tune runs the real recipe (`recycler.stages.finetune.recipe`) on synthetic SFT data of ~`--seq` tokens per
example, without evaluation or checkpoints. One process: tokens/s is measured after `--warmup` steps
(allocator and kernel warm-up excluded). Several GPUs: the run goes through `recycler.stages.finetune.launcher` and
tokens/s is the training record's average over all steps. MFU = 6·params·(tokens/s/GPU) / peak, the
usual model-FLOPs convention (attention FLOPs and activation recomputation are not counted); the peak
defaults to an A100's dense bf16 312 TFLOP/s, so on CPU the MFU column is only a formality.
Then Δ = fine-tuned − base is extracted (`recycler.stages.extract.diff_checkpoints`) and applied to
`--target` (default: the base) with `recycler.stages.apply.apply_diff`; GB/s = checkpoint bytes / wall time.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import yaml
from transformers.utils import logging as hf_logging

from recycler.io.checkpoint import open_checkpoint
from recycler.stages.apply import apply_diff
from recycler.stages.extract import diff_checkpoints
from recycler.stages.finetune.config import FinetuneConfig
from recycler.stages.finetune.launcher import detect_gpus, run_finetune
from recycler.stages.finetune.recipe import finetune
from recycler.stages.finetune.run import StepReport
from recycler.toy.tiny import build_tiny_model, perturb_model

A100_BF16_TFLOPS = 312.0


def synthetic_data(path: Path, n: int, seq: int, seed: int = 0) -> Path:
    """n prompt/response pairs of ~seq characters of words (≈ seq tokens for a character tokenizer)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "model", "release", "recycle", "update", "tensor", "shard"]

    def text(chars: int) -> str:
        out: list[str] = []
        while sum(len(w) + 1 for w in out) < chars:
            out.append(rng.choice(words))
        return " ".join(out)

    lines = [json.dumps({"prompt": text(seq // 2), "response": text(seq // 2 - 8)}) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def checkpoint_stats(folder: Path) -> tuple[int, int]:
    """(parameter count, bytes of weight shards), from safetensors headers only (a Δ has no config)."""
    ck = open_checkpoint(folder, require_config=False)
    return sum(e.numel for e in ck.tensors.values()), sum(f.stat().st_size for f in ck.shard_files)


def bench_finetune(
    model: Path, data: Path, out: Path, cfg: FinetuneConfig, gpus: int, warmup: int
) -> tuple[float, int]:
    """(tokens/s over all processes, number of processes) of a fine-tuning run into `out`."""
    if gpus > 1:
        cfg_file = out.parent / "bench-ft.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg.model_dump()), encoding="utf-8")
        run_finetune(
            [str(model), "--data", str(data), "-o", str(out), "--config", str(cfg_file)], gpus_per_node=gpus
        )
        record = json.loads((out / "training_record.json").read_text(encoding="utf-8"))
        return record["tokens_per_s"], gpus
    ends: list[float] = []

    def on_step(report: StepReport) -> None:
        if report.loss is not None:
            ends.append(time.perf_counter())

    record = finetune(model, data, out, cfg, progress=on_step)
    steps = len(ends)
    skip = min(warmup, steps - 1)
    tokens_per_step = record["tokens_seen"] / steps  # synthetic examples all have about the same length
    if skip < 1 or ends[-1] <= ends[skip - 1]:
        return record["tokens_per_s"], 1
    return tokens_per_step * (steps - skip) / (ends[-1] - ends[skip - 1]), 1


def timed(fn, *args, **kw) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="HF model folder to fine-tune (the base)")
    p.add_argument("--target", type=Path, help="model to apply Δ to (default: the base)")
    p.add_argument(
        "--config", type=Path, help="FinetuneConfig YAML (dtype, micro_batch_size, checkpointing, ...)"
    )
    p.add_argument("--gpus", type=int, help="processes/GPUs (default: all visible GPUs, 1 on CPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from tokens/s (one process)")
    p.add_argument("--seq", type=int, default=1024, help="approximate tokens per example")
    p.add_argument(
        "--peak-tflops", type=float, default=A100_BF16_TFLOPS, help="peak per GPU (A100 bf16: 312)"
    )
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one under TMPDIR)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny random model on CPU, a few steps: checks the pipeline"
    )
    args = p.parse_args(argv)
    hf_logging.disable_progress_bar()
    if args.smoke:
        args.steps, args.warmup, args.seq, args.gpus = 3, 1, 48, 1
    elif args.model is None:
        p.error("--model is required (or --smoke)")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        model = args.model or build_tiny_model(root / "base")
        target = args.target or (perturb_model(model, root / "target", scale=0.05) if args.smoke else model)
        cfg = FinetuneConfig.from_yaml(args.config) if args.config else FinetuneConfig()
        overrides: dict = {
            "max_steps": args.steps,
            "eval_every": None,
            "save_every": None,
            "warmup_ratio": 0.0,
        }
        if args.smoke:
            overrides |= {"learning_rate": 1e-3, "batch_size": 4, "micro_batch_size": 4, "max_length": 128}
        cfg = cfg.updated(**overrides)
        gpus = args.gpus if args.gpus is not None else max(detect_gpus(), 1)
        examples = max(cfg.batch_size * args.steps, 8)
        data = synthetic_data(root / "train.jsonl", examples, args.seq)

        tokens_s, procs = bench_finetune(model, data, root / "tuned", cfg, gpus, args.warmup)
        params, model_bytes = checkpoint_stats(model)
        per_gpu = tokens_s / procs
        mfu = 6 * params * per_gpu / (args.peak_tflops * 1e12)
        t_diff = timed(diff_checkpoints, model, root / "tuned", root / "delta")
        t_apply = timed(apply_diff, target, root / "delta", root / "applied")
        _, delta_bytes = checkpoint_stats(root / "delta")

    rows = [
        (
            "fine-tune",
            f"{per_gpu:,.0f} tokens/s/GPU",
            f"MFU {mfu:.2%} ({procs} proc, {params / 1e6:,.2f}M params)",
        ),
        (
            "diff",
            f"{model_bytes / t_diff / 1e9:.3f} GB/s",
            f"{t_diff:.2f} s, Δ {delta_bytes / 1e6:,.1f} MB (fp32)",
        ),
        (
            "apply",
            f"{model_bytes / t_apply / 1e9:.3f} GB/s",
            f"{t_apply:.2f} s, model {model_bytes / 1e6:,.1f} MB",
        ),
    ]
    print(f"{'stage':<10} {'throughput':>24}  detail")
    for stage, value, detail in rows:
        print(f"{stage:<10} {value:>24}  {detail}")


if __name__ == "__main__":
    main()
