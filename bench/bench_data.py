"""Checkpoints for bench_delta.py and the exactness check of every output (not timed).

Synthetic bf16 Llama-shaped checkpoints: m_s ~ N(0, 0.02) (norms 1.0), m′_s = m_s + N(0, 2e-3) and
m_t = m_s + N(0, 5e-3), each drawn in float32 and rounded once to bf16 (‖Δ‖/‖m‖ ≈ 0.1, a large
fine-tune: 5.4% of Δ's elements are not bf16 numbers). Sizes: 1 and 2 GB use hidden 2048 and as many
layers as fit; "scale" is Llama-7B-shaped (hidden 4096, intermediate 11008, 32 layers, 32 KV heads,
vocabulary 32000: 6.74 G parameters, 13.5 GB).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from recycler.toy.tiny import build_synthetic_checkpoint, llama_shapes, tiny_llama_config

SMALL = {"hidden": 2048, "intermediate": 5632, "heads": 16, "kv_ratio": 4}
SCALE = {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_ratio": 1, "layers": 32}
VOCAB = 32000


def shape_for(size_gb: float) -> dict:
    if size_gb >= 10:
        return SCALE
    h, i = SMALL["hidden"], SMALL["intermediate"]
    per_layer = (2 * h * h + 2 * h * h // SMALL["kv_ratio"] + 3 * h * i) * 2
    return SMALL | {"layers": max(1, round((size_gb * 1e9 - 2 * VOCAB * h * 2) / per_layer))}


def build(root: Path, size_gb: float, ft_noise: float = 2e-3) -> dict[str, Path]:
    """Three checkpoints (m_s, m′_s, m_t) of ≈ size_gb each, cached across runs. `ft_noise` sets
    the size of the fine-tune (2e-3: ‖Δ‖/‖m‖ ≈ 0.1, the default; 2e-4 ≈ 0.01, a gentler one)."""
    s = shape_for(size_gb)
    shapes = llama_shapes(s["hidden"], s["intermediate"], s["layers"], VOCAB, kv_heads_ratio=s["kv_ratio"])
    config = tiny_llama_config(VOCAB, hidden=s["hidden"], layers=s["layers"]).to_dict() | {
        "architectures": ["LlamaForCausalLM"],
        "intermediate_size": s["intermediate"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["heads"] // s["kv_ratio"],
        "torch_dtype": "bfloat16",
    }
    folder = root / (f"{size_gb:g}gb" if ft_noise == 2e-3 else f"{size_gb:g}gb-ft{ft_noise:g}")
    paths = {k: folder / k for k in ("ms", "ft", "mt")}
    if not all((p / "config.json").exists() for p in paths.values()):
        shutil.rmtree(folder, ignore_errors=True)
        print(f"building three {size_gb:g} GB checkpoints ({s['layers']} layers) in {folder} …", flush=True)
        build_synthetic_checkpoint(paths["ms"], shapes, seed=0, config=config)
        build_synthetic_checkpoint(
            paths["ft"],
            shapes,
            seed=1,
            like=paths["ms"],
            noise=ft_noise,
            config=config,
            max_shard_bytes=384 << 20,
        )
        build_synthetic_checkpoint(
            paths["mt"],
            shapes,
            seed=2,
            like=paths["ms"],
            noise=5e-3,
            config=config,
            max_shard_bytes=640 << 20,
        )
    for p in paths.values():  # configs are cheap to refresh; the weights are cached
        (p / "config.json").write_text(json.dumps(config, indent=1))
    return paths


def _index(d: Path) -> dict[str, Path]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        return {k: d / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out |= dict.fromkeys(h.keys(), d / f.name)
    return out


def _get(ix: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(ix[name]), "pt") as h:
        return h.get_tensor(name)


def mismatches(out: Path, paths: dict[str, Path], alpha: float = 1.0) -> tuple[int, int, int]:
    """(elements ≠ the exact result, ≠ the plain float32 formula, total), tensor by tensor. The exact
    result is the README's bf16(fp32(m_t) + α₃₂·(fp32(m′_s) − fp32(m_s))), α₃₂ = float32(α), every
    step a float32 operation, and (α = 1) m′_s where m_t equals m_s bit for bit (there
    m_t + (m′_s − m_s) is m′_s exactly; it differs from the float32 formula only where that formula's
    rounding loses the round trip)."""
    ims, ift, imt, iout = (_index(paths["ms"]), _index(paths["ft"]), _index(paths["mt"]), _index(out))
    bad = plain_bad = total = 0
    a32 = torch.tensor(alpha, dtype=torch.float32)
    for name in imt:
        t, m, mp = _get(imt, name), _get(ims, name), _get(ift, name)
        plain = (t.float() + a32 * (mp.float() - m.float())).to(t.dtype)
        want = plain.clone()
        if alpha == 1.0:
            same = t.view(torch.int16) == m.view(torch.int16)
            want[same] = mp[same]
        got = _get(iout, name).view(torch.int16)
        bad += int((got != want.view(torch.int16)).sum())
        plain_bad += int((got != plain.view(torch.int16)).sum())
        total += want.numel()
    return bad, plain_bad, total


def bytes_of(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def summary(values: list[float]) -> float:
    return float(np.median(values))
