"""Δ → LoRA adapter: the truncated SVD is optimal, the adapter loads with PEFT and reproduces it, and an
adapter moves to a new base in one command."""

from __future__ import annotations

import json

import numpy as np
import peft  # the [test] extra: a missing install fails here, never skips
import pytest
import torch
from conftest import load_state
from safetensors.torch import load_file
from test_adapters import assert_within_peft_rounding, cli, make_adapter, oracle
from transformers import LlamaForCausalLM

from recycler.delta.lora import RANDOMIZED_FROM, low_rank
from recycler.delta.math import tensor_family


def best_error(d: np.ndarray, r: int) -> float:
    """‖Δ − Δ_r‖/‖Δ‖ of the optimal rank-r approximation (Eckart–Young), from numpy's exact SVD."""
    s = np.linalg.svd(d.astype(np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2)))


def test_low_rank_exact_and_energy():
    g = np.random.default_rng(0)
    u, _ = np.linalg.qr(g.standard_normal((40, 40)))
    v, _ = np.linalg.qr(g.standard_normal((30, 30)))
    s = np.array([8.0, 4.0, 2.0, 1.0] + [0.0] * 26)
    d = ((u[:, :30] * s) @ v.T).astype(np.float32)  # rank 4, σ² = 64, 16, 4, 1 (85 in all)
    lr = low_rank(d, rank=4)
    assert lr.rank == 4 and lr.error < 1e-6
    assert low_rank(d, energy=0.75).rank == 1  # 64/85 = 0.753
    assert low_rank(d, energy=0.94).rank == 2  # 80/85 = 0.941
    assert low_rank(d, energy=0.95).rank == 3  # 84/85 = 0.988
    assert low_rank(d, energy=0.99).rank == 4
    assert low_rank(d, rank=2).error == pytest.approx(np.sqrt(5 / 85), rel=1e-5)


def test_randomized_svd_is_near_optimal():
    g = np.random.default_rng(1)
    n = RANDOMIZED_FROM + 16
    d = (g.standard_normal((n, 12)) @ g.standard_normal((12, n)) + 0.05 * g.standard_normal((n, n))).astype(
        np.float32
    )
    lr = low_rank(d, rank=8)
    assert lr.error <= best_error(d, 8) * 1.01
    recomputed = np.linalg.norm(d - lr.b @ lr.a) / np.linalg.norm(d)
    assert lr.error == pytest.approx(recomputed, rel=1e-4)


def product(factors: dict, module: str) -> torch.Tensor:
    """B·A of one module of an adapter we wrote ((B·A)ᵀ for an embedding), in float64."""
    key = f"base_model.model.{module}"
    if f"{key}.lora_embedding_A" in factors:
        return (factors[f"{key}.lora_embedding_B"].double() @ factors[f"{key}.lora_embedding_A"].double()).T
    return factors[f"{key}.lora_B.weight"].double() @ factors[f"{key}.lora_A.weight"].double()


def merged_delta(base, adapter) -> dict[str, torch.Tensor]:
    """What PEFT makes of our adapter on `base`: merge_and_unload − base."""
    model = LlamaForCausalLM.from_pretrained(base)
    pm = peft.PeftModel.from_pretrained(model, adapter)
    merged = pm.merge_and_unload().state_dict()
    b = load_state(base)
    return {k: merged[k].double() - b[k].double() for k in b}


def test_diff_as_lora_loads_with_peft_and_is_the_truncated_svd(models, tmp_path):
    out = tmp_path / "lora"
    cli("diff", models["base32"], models["tuned32"], "-o", out, "--as-lora", "--rank", "3")
    base, tuned = load_state(models["base32"]), load_state(models["tuned32"])
    factors = load_file(out / "adapter_model.safetensors")
    got = merged_delta(models["base32"], out)
    m = json.loads((out / "manifest.json").read_text())
    sums: dict[str, list[float]] = {}
    checked = 0
    for name in base:
        d = (tuned[name].double() - base[name].double()).float()
        key = "base_model.model." + name.removesuffix(".weight")
        if f"{key}.lora_A.weight" in factors:
            ba = factors[f"{key}.lora_B.weight"].double() @ factors[f"{key}.lora_A.weight"].double()
        elif f"{key}.lora_embedding_A" in factors:  # PEFT's Embedding LoRA: Δ = (B·A)ᵀ
            ba = (factors[f"{key}.lora_embedding_B"].double() @ factors[f"{key}.lora_embedding_A"].double()).T
        else:
            assert torch.equal(got[name], torch.zeros_like(got[name])), name  # left out: no change
            assert d.dim() == 1 and name in m["dropped"]["tensors"]
            continue
        assert_within_peft_rounding(ba.float(), (base[name].double() + got[name]).float(), base[name], name)
        err = float(torch.linalg.norm(d.double() - ba) / torch.linalg.norm(d.double()))
        assert err == pytest.approx(best_error(d.numpy(), 3), rel=1e-4), name
        fam = sums.setdefault(tensor_family(name), [0.0, 0.0])
        fam[0] += float(torch.sum(d.double() ** 2))
        fam[1] += float(torch.sum((d.double() - ba) ** 2))
        checked += 1
    assert checked == 2 * 7 + 2  # q k v o gate up down per layer, lm_head and the embeddings
    assert set(m["relative_error"]) == {*sums, "total"}
    for fam, (sd, se) in sums.items():
        assert m["relative_error"][fam] == pytest.approx((se / sd) ** 0.5, rel=1e-4), fam
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 3 and cfg["base_model_name_or_path"].endswith("base32")


def test_energy_picks_the_smallest_rank_per_module(models, tmp_path):
    out = tmp_path / "lora"
    cli("diff", models["base32"], models["tuned32"], "-o", out, "--as-lora", "--energy", "0.6")
    base, tuned = load_state(models["base32"]), load_state(models["tuned32"])
    ranks = json.loads((out / "lora_ranks.json").read_text())
    for module, r in ranks.items():
        d = (tuned[f"{module}.weight"].double() - base[f"{module}.weight"].double()).numpy()
        s2 = np.linalg.svd(d, compute_uv=False) ** 2
        kept = np.cumsum(s2) / s2.sum()
        assert kept[r - 1] >= 0.6 and (r == 1 or kept[r - 2] < 0.6), module
    assert len(set(ranks.values())) > 1  # ranks differ: the config's rank_pattern must carry them
    got = merged_delta(models["base32"], out)
    factors = load_file(out / "adapter_model.safetensors")
    for module in ranks:
        ba = product(factors, module)
        w = f"{module}.weight"
        assert_within_peft_rounding(ba.float(), (base[w].double() + got[w]).float(), base[w], w)


def test_upgrade_adapter_to_new_base_in_one_command(models, tmp_path):
    old, new = models["base32"], models["tuned32"]
    adapter, _ = make_adapter(
        old, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]
    )
    out = tmp_path / "upgraded"
    cli("lora-upgrade", adapter, "--from", old, "--to", new, "-o", out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["ranks"]["max"] == 4 and m["relative_error"]["total"] < 1e-6 and not m["dropped"]["tensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"].endswith("tuned32")
    got, want, b = merged_delta(new, out), oracle(adapter), load_state(new)
    for name, d in got.items():
        if name in want:
            assert float((d - want[name].double()).abs().max()) <= 1e-5 * float(want[name].abs().max()), name
        else:
            assert torch.equal(d, torch.zeros_like(d)), name
    assert set(want) == {k for k in b if any(p in k for p in ("q_proj", "v_proj", "gate_proj"))}
    # a lower rank costs what the manifest says
    cli("lora-upgrade", adapter, "--from", old, "--to", new, "-o", tmp_path / "r1", "--rank", "1")
    m1 = json.loads((tmp_path / "r1" / "manifest.json").read_text())
    assert 0.1 < m1["relative_error"]["total"] < 1


def test_lora_extract_from_a_stored_delta_checks_the_target(models, delta, tmp_path):
    from recycler.errors import IncompatibleCheckpoints
    from recycler.toy.tiny import build_tiny_model

    out = tmp_path / "lora"
    cli("lora-extract", delta, "-o", out, "--rank", "2", "--target", models["target"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["sources"]["delta"]["kind"] == "stored" and m["ranks"] == {"min": 2, "max": 2, "modules": 16}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"].endswith("target")
    model = LlamaForCausalLM.from_pretrained(models["target"])
    peft.PeftModel.from_pretrained(model, out)  # loads on the base it was written for
    wide = build_tiny_model(tmp_path / "wide", hidden=48)
    with pytest.raises(IncompatibleCheckpoints, match="would not load on"):
        cli("lora-extract", delta, "-o", tmp_path / "x", "--rank", "2", "--target", wide)
    assert not (tmp_path / "x").exists()
