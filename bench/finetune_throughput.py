"""Fine-tuning throughput (tokens/s) of the real recipe on tiny models, on whatever device this runs on.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/finetune_throughput.py [--steps 30] [--seq 200]

Each case builds a random tiny Llama (recycler.toy.tiny), writes synthetic SFT data of ~`--seq` tokens per
example, runs `recycler.stages.finetune.recipe.finetune` (batch 8, no eval, no checkpoints) and reports the training
record's tokens_per_s = tokens seen / time inside optimizer steps (model loading and publishing excluded).
The first step (allocator warm-up) is included; use more steps for steadier numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from recycler.stages.finetune.config import FinetuneConfig
from recycler.stages.finetune.recipe import finetune
from recycler.toy.tiny import build_tiny_model

CASES = [
    {"hidden": 32, "layers": 2, "micro": 8},
    {"hidden": 128, "layers": 4, "micro": 8},
    {"hidden": 128, "layers": 4, "micro": 2},
]


def synthetic_data(path: Path, n: int, seq: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    rows = []
    for _ in range(n):
        prompt = "".join(rng.choice(letters) for _ in range(seq // 2))
        response = "".join(rng.choice(letters) for _ in range(seq // 2 - 8))
        rows.append(json.dumps({"prompt": prompt, "response": response}))
    path.write_text("\n".join(rows) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq", type=int, default=200, help="approximate tokens per example (tiny max: 256)")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = synthetic_data(root / "data.jsonl", 64, args.seq)
        for case in CASES:
            model = build_tiny_model(
                root / f"m{case['hidden']}x{case['layers']}", hidden=case["hidden"], layers=case["layers"]
            )
            cfg = FinetuneConfig(
                learning_rate=1e-3,
                batch_size=8,
                micro_batch_size=case["micro"],
                max_steps=args.steps,
                eval_every=None,
                save_every=None,
            )
            out = root / f"out-{case['hidden']}-{case['layers']}-{case['micro']}"
            record = finetune(model, data, out, cfg)
            params = sum(t.numel() for t in load_file(model / "model.safetensors").values())
            print(
                f"hidden {case['hidden']:>4} layers {case['layers']} ({params / 1e3:.0f}k params) "
                f"micro-batch {case['micro']}: "
                f"{record['tokens_per_s']:>9,.0f} tokens/s "
                f"({record['tokens_seen']} tokens in {record['train_time_s']:.2f} s, {args.steps} steps)"
            )


if __name__ == "__main__":
    main()
