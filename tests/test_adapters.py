"""LoRA adapters in: an adapter made with PEFT is a fine-tune for `diff`, `recycle` and `apply`.

The oracle for Δ is the adapter's own factors in float64 (scale·B·A rounded once to float32), and
PEFT's `merge_and_unload` (its Δ computed in float32, then added): ours must equal the first bit for
bit and the second within the rounding stated in `recycler.delta.lora`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import peft  # the [test] extra: a missing install fails here, never skips
import pytest
import torch
from conftest import load_state
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM
from typer.testing import CliRunner

from recycler.cli.app import app
from recycler.errors import IncompatibleCheckpoints, InvalidCheckpoint
from recycler.io.adapter import open_adapter
from recycler.stages.apply import recycle
from recycler.stages.extract import diff_checkpoints
from recycler.stages.sources import adapter_delta
from recycler.toy.tiny import build_tiny_model


def cli(*args) -> None:
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None:
        raise r.exception
    assert r.exit_code == 0, r.output


def make_adapter(
    base: Path, out: Path, *, seed: int = 0, model_cls=LlamaForCausalLM, b_scale: float = 0.05, **lora
) -> tuple[Path, Path]:
    """A PEFT adapter with random non-zero B (as after training) and PEFT's own merged model."""
    torch.manual_seed(seed)
    model = model_cls.from_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(b_scale)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.01)
    pm.save_pretrained(out / "adapter")
    merged = pm.merge_and_unload()
    merged.save_pretrained(out / "merged")
    return out / "adapter", out / "merged"


def oracle(adapter: Path) -> dict[str, torch.Tensor]:
    """float32(scale·B·A) per adapted weight, from the adapter's files with torch in float64."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    state = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in state.items():
        if "lora_A" not in key and "lora_embedding_A" not in key:
            continue
        emb = "lora_embedding_A" in key
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        b = state[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        r = a.shape[0]
        alpha = cfg.get("alpha_pattern", {}).get(module.rsplit(".", 1)[-1], cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        d = (b.double() @ a.double()) * scale
        if emb or cfg.get("fan_in_fan_out"):
            d = d.T
        out[f"{module}.weight"] = d.float()
    return out


def assert_within_peft_rounding(ours: torch.Tensor, merged: torch.Tensor, base: torch.Tensor, what: str):
    """merged = fl(base + δ_peft): |ours − (merged − base)| ≤ ½ulp(merged) + PEFT's float32 matmul error."""
    exact = merged.double() - base.double()
    ulp = torch.finfo(torch.float32).eps * merged.double().abs().clamp_min(torch.finfo(torch.float32).tiny)
    tol = ulp + 1e-6 * ours.double().abs().max()
    assert ((ours.double() - exact).abs() <= tol).all(), what


@pytest.fixture(scope="module")
def llama_adapter(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    adapter, merged = make_adapter(
        models["base32"],
        root,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    return adapter, merged


def test_adapter_delta_equals_factors_and_peft_merge(models, llama_adapter, tmp_path):
    adapter, merged_dir = llama_adapter
    cli("diff", models["base32"], adapter, "-o", tmp_path / "d")
    delta, base, merged = load_state(tmp_path / "d"), load_state(models["base32"]), load_state(merged_dir)
    want = oracle(adapter)
    assert set(delta) == set(want) | {"lm_head.weight"}  # only what the adapter changes
    for name, d in want.items():
        assert torch.equal(delta[name], d), name  # bit for bit: the float64 product rounded once
        assert_within_peft_rounding(delta[name], merged[name], base[name], name)
    # modules_to_save: Δ = saved − base, and base + Δ gives PEFT's merged lm_head
    saved = load_file(adapter / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
    assert torch.equal(delta["lm_head.weight"], saved - base["lm_head.weight"])
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["sources"]["adapter"]["ranks"] == [4] and m["sources"]["adapter"]["scales"] == [2.0]
    assert not (tmp_path / "d" / "adapter_config.json").exists()  # a Δ folder is not an adapter
    # the Δ applies like any Δ: base + Δ is PEFT's merged model up to that rounding
    cli("apply", models["base32"], tmp_path / "d", "-o", tmp_path / "applied")
    applied = load_state(tmp_path / "applied")
    assert applied.keys() == merged.keys()
    for k in applied:
        assert_within_peft_rounding(applied[k] - base[k], merged[k], base[k], k)
    assert torch.equal(applied["lm_head.weight"], merged["lm_head.weight"])


def test_recycle_with_adapter_is_apply_of_its_delta(models, llama_adapter, tmp_path):
    adapter, _ = llama_adapter
    target = models["tuned32"]  # another version of base32
    diff_checkpoints(models["base32"], adapter, tmp_path / "d")
    cli("apply", target, tmp_path / "d", "-o", tmp_path / "via-delta")
    cli("recycle", models["base32"], adapter, target, "-o", tmp_path / "one-pass")
    a, b = load_state(tmp_path / "via-delta"), load_state(tmp_path / "one-pass")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    t = load_state(target)
    assert torch.equal(a["model.norm.weight"], t["model.norm.weight"])  # untouched by the adapter
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.q_proj.weight"]
    )


def test_adapter_as_delta_without_base(models, tmp_path):
    """Pure LoRA factors need no base: `apply TARGET ADAPTER` adds scale·B·A."""
    adapter, _ = make_adapter(models["base32"], tmp_path, r=2, lora_alpha=4, target_modules=["o_proj"])
    cli("apply", models["tuned32"], adapter, "-o", tmp_path / "out")
    out, t, want = load_state(tmp_path / "out"), load_state(models["tuned32"]), oracle(adapter)
    for k in out:
        expect = (t[k] + want[k]) if k in want else t[k]
        assert torch.equal(out[k], expect), k


def test_rslora_and_patterns(models, tmp_path):
    adapter, merged = make_adapter(
        models["base32"],
        tmp_path,
        r=4,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "up_proj"],
        rank_pattern={"up_proj": 2},
        alpha_pattern={"up_proj": 3},
    )
    ad = open_adapter(adapter)
    up = ad.modules["model.layers.0.mlp.up_proj.weight"]
    q = ad.modules["model.layers.0.self_attn.q_proj.weight"]
    assert (up.rank, up.scale) == (2, 3 / math.sqrt(2)) and (q.rank, q.scale) == (4, 16 / 2)
    diff_checkpoints(models["base32"], adapter, tmp_path / "d")
    delta, base, m = load_state(tmp_path / "d"), load_state(models["base32"]), load_state(merged)
    for name, d in oracle(adapter).items():
        assert torch.equal(delta[name], d), name
        assert_within_peft_rounding(delta[name], m[name], base[name], name)


def test_fan_in_fan_out_gpt2(tmp_path):
    """GPT-2's Conv1D stores weights (in, out): PEFT's fan_in_fan_out, Δ = (scale·B·A)ᵀ."""
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    adapter, merged = make_adapter(
        tmp_path / "gpt2",
        tmp_path,
        model_cls=GPT2LMHeadModel,
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
    )
    diff_checkpoints(tmp_path / "gpt2", adapter, tmp_path / "d")
    delta, base, m = load_state(tmp_path / "d"), load_state(tmp_path / "gpt2"), load_state(merged)
    want = oracle(adapter)
    assert want and all(want[k].shape == base[k].shape for k in want)
    for name, d in want.items():
        assert torch.equal(delta[name], d), name
        assert_within_peft_rounding(delta[name], m[name], base[name], name)


def _edit_config(adapter: Path, out: Path, **changes) -> Path:
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_unsupported_variants_are_refused_by_name(models, llama_adapter, tmp_path):
    adapter, _ = llama_adapter
    with pytest.raises(InvalidCheckpoint, match="DoRA"):
        open_adapter(_edit_config(adapter, tmp_path / "dora", use_dora=True))
    with pytest.raises(InvalidCheckpoint, match="LoKr"):
        open_adapter(_edit_config(adapter, tmp_path / "lokr", peft_type="LOKR"))
    model = LlamaForCausalLM.from_pretrained(models["base32"])
    loha = peft.get_peft_model(model, peft.LoHaConfig(r=2, target_modules=["q_proj"]))
    loha.save_pretrained(tmp_path / "loha")
    with pytest.raises(InvalidCheckpoint, match="LoHa"):
        diff_checkpoints(models["base32"], tmp_path / "loha", tmp_path / "x")
    # a DoRA magnitude vector in the weights is refused even if the config does not say DoRA
    bad = _edit_config(adapter, tmp_path / "magnitude")
    state = load_file(bad / "adapter_model.safetensors")
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    save_file(state, bad / "adapter_model.safetensors")
    with pytest.raises(InvalidCheckpoint, match="DoRA"):
        open_adapter(bad)
    with pytest.raises(InvalidCheckpoint, match="says r = 8"):
        open_adapter(_edit_config(adapter, tmp_path / "r", r=8))
    assert not (tmp_path / "x").exists()


def test_adapter_base_is_checked(models, llama_adapter, tmp_path):
    adapter, _ = llama_adapter
    other = build_tiny_model(tmp_path / "wide", hidden=48, seed=3)
    with pytest.raises(
        IncompatibleCheckpoints,
        match=r"q_proj.weight: adapter's Δ has shape \[32, 32\], base tensor \[48, 48\]",
    ):
        adapter_delta(adapter, other)
    renamed = shutil.copytree(models["base32"], tmp_path / "some-other-model")
    with pytest.raises(IncompatibleCheckpoints, match="records base .*base32.*allow-other-base"):
        recycle(renamed, adapter, models["tuned32"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    recycle(renamed, adapter, models["tuned32"], tmp_path / "out", allow_other_base=True)
    assert (tmp_path / "out" / "manifest.json").exists()


def test_precheck_scores_an_adapter_as_its_delta(tiny_releases, tmp_path):
    """An adapter candidate gets the very numbers its extracted Δ gets (same Δ, never written)."""
    from recycler.stages.precheck import precheck

    v1, v2 = tiny_releases["v1"], tiny_releases["v2"]
    adapter, _ = make_adapter(v1, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    diff_checkpoints(v1, adapter, tmp_path / "d")
    kw = {"bases": [v1], "alphas": (0.5, 1.0), "sample": tiny_releases["sample"], "n": 4}
    as_delta = precheck(v2, [tmp_path / "d"], **kw).candidates[0]
    as_adapter = precheck(v2, [adapter], **kw).candidates[0]
    for key in ("relative_distance", "base_distance", "cosine", "probe_loss", "score"):
        assert getattr(as_adapter, key) == getattr(as_delta, key), key
    assert as_adapter.relative_distance is not None and as_adapter.probe_loss
    with pytest.raises(IncompatibleCheckpoints, match="shape"):
        precheck(
            v2,
            [adapter],
            bases=[build_tiny_model(tmp_path / "wide", hidden=48)],
            sample=tiny_releases["sample"],
        )
