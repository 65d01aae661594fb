"""`recycler demo`: the Δ workflow end to end on tiny models built locally (no hub, CPU, seconds).

Base v1 and its fine-tune give Δ₁; Δ₁ is recycled onto base v2, a newer release whose tokenizer
grew, and backported onto v1 itself; every output is verified against its manifest and loaded with
`AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from recycler.io.atomic import atomic_folder
from recycler.io.manifest import verify_folder
from recycler.stages.apply import apply_diff
from recycler.stages.extract import diff_checkpoints
from recycler.toy.tiny import build_tiny_model, perturb_model

Say = Callable[[str], None]


def _grown_release(v1: Path, out: Path) -> Path:
    """Base v2: v1 after more 'pretraining' (perturbed) with three tokens added to the vocabulary."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, tok = LlamaForCausalLM.from_pretrained(v1), AutoTokenizer.from_pretrained(v1)
    tok.add_tokens(["<tool>", "<think>", "§"])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    staging = out.parent / f"{out.name}-staging"
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    return perturb_model(staging, out, scale=0.05, seed=11)


def run_demo(output: Path, *, overwrite: bool = False, say: Say = print) -> dict:
    """Build the tiny family, run diff → recycle → backport → verify; return a summary dict."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with atomic_folder(output, overwrite=overwrite) as root:
        say("building tiny base v1 and its fine-tune (bf16, sharded)")
        v1 = build_tiny_model(
            root / "base-v1", dtype=torch.bfloat16, hidden=64, layers=2, max_shard_size="60KB"
        )
        ft1 = perturb_model(v1, root / "ft-v1", scale=0.02, seed=1, max_shard_size="80KB")
        say("building base v2: a newer release with a grown vocabulary")
        v2 = _grown_release(v1, root / "base-v2")
        say("Δ₁ = ft-v1 − base-v1")
        d = diff_checkpoints(v1, ft1, root / "delta-v1", max_shard_bytes=100_000)
        say("recycling: base-v2 + Δ₁")
        rec = apply_diff(v2, d.path, root / "recycled-v2")
        for line in rec.report.summary_lines():
            say(f"  {line}")
        say("backporting onto base-v1 (must reproduce ft-v1 bit for bit)")
        back = apply_diff(v1, d.path, root / "backported-v1")
        checks = {p.name: verify_folder(p) for p in (d.path, rec.path, back.path)}
        summary = {
            "relative_norm": d.manifest["relative_norms"]["matrices"],
            "roundtrip_exact": d.manifest["roundtrip"]["exact"],
            "vocab": rec.report.vocab,
            "verified": {k: v["files"] for k, v in checks.items()},
            "backport_equals_finetune": _same_tensors(back.path, ft1),
            "generation": _generate(rec.path),
        }
        (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _same_tensors(a: Path, b: Path) -> bool:
    from transformers import AutoModelForCausalLM

    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _generate(model_dir: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "12+30?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :])
