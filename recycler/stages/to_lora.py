"""A Δ becomes a PEFT LoRA adapter: a truncated SVD per weight matrix, and what the low rank cost.

Each 2-D weight Δ (embedding tables through PEFT's Embedding LoRA, Δ = (B·A)ᵀ) becomes B·A with
B = U√S and A = √S Vᵀ at a fixed rank or at the smallest rank keeping a share of ‖Δ‖²; the adapter's
config gives every module lora_alpha = r, so PEFT's scale is exactly 1 and its merge is B·A. What an
adapter cannot carry (vectors such as norms and biases) is left out *and reported* with
its share of ‖Δ‖², next to the relative reconstruction error ‖Δ − BA‖/‖Δ‖ per tensor family of the adapted matrices: the
manifest and the CLI say what the adapter form cost. One Δ matrix is in memory at a time.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recycler.delta.lora import low_rank, sumsq
from recycler.delta.math import tensor_family
from recycler.errors import IncompatibleCheckpoints
from recycler.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from recycler.io.atomic import atomic_folder
from recycler.io.checkpoint import Checkpoint
from recycler.io.manifest import write_manifest
from recycler.io.reader import ChunkReader, chunk_ranges
from recycler.stages.sources import DeltaInputs


@dataclass(frozen=True)
class LoraResult:
    path: Path
    manifest: dict


def adaptable(name: str, shape: tuple[int, ...]) -> bool:
    """A weight PEFT adapts with a LoRA layer: a 2-D `.weight` (Linear, or an Embedding: see `_is_embedding`)."""
    return len(shape) == 2 and name.endswith(".weight")


def _is_embedding(name: str) -> bool:
    """PEFT adapts nn.Embedding with lora_embedding_A (r, vocab) / lora_embedding_B (dim, r): Δ = (B·A)ᵀ."""
    return tensor_family(name) == "embed"


def delta_to_lora(
    delta: DeltaInputs,
    out: Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    base_name: str | None = None,
    target: Checkpoint | None = None,
    inputs: list[Path] = (),
    provenance: dict | None = None,
    overwrite: bool = False,
    scale: float = 1.0,
) -> LoraResult:
    """Write the adapter of `delta` to `out` (atomically). `target`: the base it will load on, whose
    shapes are checked first (IncompatibleCheckpoints). Exactly one of `rank` and `energy`. `scale`: the
    adapter of scale·Δ (a transfer at α ≠ 1); its errors are relative to scale·Δ."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of --rank and --energy")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be at least 1, got {rank}")
    specs = delta.side.tensors
    if target is not None:
        _check_target(specs, target)
    tensors, ranks, sums, dropped = {}, {}, defaultdict(lambda: [0.0, 0.0]), {}
    chunks = ChunkReader()
    try:
        make = delta.open(chunks)
        for name, spec in specs.items():
            d = _read(make(name), tuple(spec.shape), chunks)
            if scale != 1.0:
                d = d * np.float32(scale)
            sq = sumsq(d)
            if not adaptable(name, tuple(spec.shape)):
                if sq > 0:
                    dropped[name] = sq
                continue
            if sq == 0:
                continue  # nothing to adapt
            module = name.removesuffix(".weight")
            if _is_embedding(name):  # factor Δᵀ (dim, vocab) = B·A
                lr = low_rank(d.reshape(spec.shape).T, rank=rank, energy=energy)
                tensors[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = lr.a
                tensors[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = lr.b
            else:
                lr = low_rank(d.reshape(spec.shape), rank=rank, energy=energy)
                tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = lr.a
                tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = lr.b
            ranks[module] = lr.rank
            _add(sums, name, lr.sumsq_delta, lr.sumsq_error)
    finally:
        chunks.close()
    if not ranks:
        raise IncompatibleCheckpoints(
            f"{delta.side.label}: no non-zero weight matrix to turn into an adapter"
        )
    kept_sq, err_sq, lost = sums["total"][0], sums["total"][1], sum(dropped.values())
    body = {
        "kind": "adapter",
        "method": ({"rank": rank} if rank is not None else {"energy": energy})
        | ({"scale": scale} if scale != 1.0 else {}),
        "base_model_name_or_path": base_name,
        "ranks": {"min": min(ranks.values()), "max": max(ranks.values()), "modules": len(ranks)},
        "relative_error": {fam: math.sqrt(e / d) if d else 0.0 for fam, (d, e) in sorted(sums.items())},
        "dropped": {
            "tensors": sorted(dropped),
            "share_of_delta_sumsq": lost / (kept_sq + lost) if kept_sq + lost else 0.0,
        },
        # ‖Δ − adapter‖/‖Δ‖ over every tensor of Δ, the ones left out included
        "relative_error_all": math.sqrt((err_sq + lost) / (kept_sq + lost)) if kept_sq + lost else 0.0,
        "sources": {"delta": provenance or delta.provenance},
    }
    with atomic_folder(out, inputs, overwrite=overwrite) as tmp:
        from safetensors.numpy import save_file

        save_file(dict(sorted(tensors.items())), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(
            json.dumps(_config(ranks, base_name), indent=2, sort_keys=True) + "\n"
        )
        (tmp / "lora_ranks.json").write_text(json.dumps(ranks, indent=2) + "\n")
        manifest = write_manifest(tmp, body, {})
    return LoraResult(Path(out), manifest)


def _add(sums: dict, name: str, sq_delta: float, sq_error: float) -> None:
    """Per family and in total, over the adapted matrices: Σ‖Δ‖² and Σ‖Δ − BA‖²."""
    for key in (tensor_family(name), "total"):
        sums[key][0] += sq_delta
        sums[key][1] += sq_error


def _read(source, shape: tuple[int, ...], chunks: ChunkReader) -> np.ndarray:
    """The float32 Δ of one tensor, assembled chunk by chunk (one tensor in memory at a time)."""
    out = np.empty(math.prod(shape), np.float32)
    for start, count in chunk_ranges(len(out)):
        source.read_f32(start, count, out[start : start + count])
    return out


def _check_target(specs, target: Checkpoint) -> None:
    problems = []
    for name, spec in specs.items():
        if not adaptable(name, tuple(spec.shape)):
            continue
        t = target.tensors.get(name)
        if t is None:
            problems.append(f"{name}: not in the target base")
        elif tuple(t.shape) != tuple(spec.shape):
            problems.append(f"{name}: Δ shape {list(spec.shape)}, target {list(t.shape)}")
    if problems:
        raise IncompatibleCheckpoints(
            f"the adapter would not load on {target.path}: " + "; ".join(problems[:10])
        )


def _config(ranks: dict[str, int], base_name: str | None) -> dict:
    """PEFT's adapter_config.json: every module at lora_alpha = r (scale 1); ranks that differ from
    the most common one go in rank_pattern/alpha_pattern, keyed by the full module name."""
    common = max(set(ranks.values()), key=lambda r: (list(ranks.values()).count(r), -r))
    pattern = {m: r for m, r in ranks.items() if r != common}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "revision": None,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
