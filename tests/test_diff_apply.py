"""Streaming diff/apply/recycle over real HF checkpoints, checked against independent computations."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import load_delta32, load_state
from transformers import AutoModelForCausalLM, AutoTokenizer

from recycler.delta.policy import ApplyPolicy
from recycler.errors import (
    IncompatibleCheckpoints,
    NonFiniteValues,
    OutputExists,
    UnrelatedModels,
    VerificationFailed,
)
from recycler.io.manifest import verify_folder
from recycler.stages.apply import apply_diff, recycle
from recycler.stages.extract import diff_checkpoints


def expected(target: dict, base: dict, tuned: dict, alpha: float = 1.0) -> dict:
    """bf16(float32(m_t) + α₃₂·(float32(m′_s) − float32(m_s))), α₃₂ = float32(α), every step a float32
    operation (the README's formula), computed eagerly, tensor by tensor."""
    a32 = torch.tensor(alpha, dtype=torch.float32)
    return {
        k: (t.float() + a32 * (tuned[k].float() - base[k].float())).to(t.dtype) if k in base else t
        for k, t in target.items()
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_delta_artifact_layout_and_manifest(delta, models):
    m = json.loads((delta / "manifest.json").read_text())
    assert m["kind"] == "diff" and m["dtype"] == "bfloat16" and m["roundtrip"]["exact"]  # bf16 inputs: bf16 Δ
    shards = sorted(delta.glob("model-*.safetensors"))
    assert len(shards) > 1  # bounded shards, each with its residual file
    assert m["residual"]["files"] == [f"residual/{s.name}" for s in shards]
    for side in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "tuned_config.json"):
        assert side in m["files"]
    assert 0 < m["relative_norms"]["total"] < 0.1
    base, tuned = load_state(models["base"]), load_state(models["tuned"])
    stored, d = load_state(delta), load_delta32(delta)
    exceptions = 0
    for k in base:
        exact = tuned[k].float() - base[k].float()
        assert stored[k].dtype == torch.bfloat16 and torch.equal(d[k], exact), k
        exceptions += int((stored[k].float() != exact).sum())
    assert m["residual"]["exceptions"] == exceptions > 0
    assert m["residual"]["elements"] == sum(t.numel() for t in base.values())
    assert verify_folder(delta)["tensors"] == len(base)


def test_roundtrip_identity_bit_for_bit_across_shard_layouts(delta, models, tmp_path):
    out = apply_diff(models["base"], delta, tmp_path / "out").path
    assert_same(load_state(out), load_state(models["tuned"]))


def test_apply_to_new_base_matches_independent_computation_and_generates(delta, models, tmp_path):
    res = apply_diff(models["target"], delta, tmp_path / "out")
    want = expected(load_state(models["target"]), load_state(models["base"]), load_state(models["tuned"]))
    assert_same(load_state(res.path), want)
    model = AutoModelForCausalLM.from_pretrained(res.path)
    tok = AutoTokenizer.from_pretrained(res.path)
    assert tok.chat_template  # the instruct Δ brings its chat template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "1+2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    assert verify_folder(res.path)["kind"] == "model"


def test_fused_recycle_equals_two_step(delta, models, tmp_path):
    two = apply_diff(models["target"], delta, tmp_path / "two").path
    one = recycle(models["base"], models["tuned"], models["target"], tmp_path / "one").path
    assert_same(load_state(one), load_state(two))


@pytest.mark.parametrize("alpha", [0.5, -1.0])
def test_alpha_scaling(delta, models, tmp_path, alpha):
    res = apply_diff(models["target"], delta, tmp_path / "out", policy=ApplyPolicy(alpha=alpha))
    want = expected(
        load_state(models["target"]), load_state(models["base"]), load_state(models["tuned"]), alpha
    )
    assert_same(load_state(res.path), want)
    assert res.manifest["alpha"] == alpha


def test_include_exclude(delta, models, tmp_path):
    policy = ApplyPolicy(include=("model.layers.*",), exclude=("*mlp*",))
    res = apply_diff(models["target"], delta, tmp_path / "out", policy=policy)
    got, target = load_state(res.path), load_state(models["target"])
    want = expected(target, load_state(models["base"]), load_state(models["tuned"]))
    for k in got:
        selected = k.startswith("model.layers.") and "mlp" not in k
        assert torch.equal(got[k], want[k] if selected else target[k]), k
    assert "lm_head.weight" in res.report.excluded and not any("mlp" in k for k in res.report.applied)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_storage_dtype_gives_the_same_result(delta, models, tmp_path, dtype):
    """float32 storage (the option kept from before) and any other dtype are exact: same output bytes."""
    r = diff_checkpoints(models["base"], models["tuned"], tmp_path / "d", dtype=dtype)
    assert r.manifest["dtype"] == dtype and r.manifest["roundtrip"]["exact"]
    want = apply_diff(models["target"], delta, tmp_path / "want").path
    got = apply_diff(models["target"], r.path, tmp_path / "got").path
    assert (got / "model.safetensors").read_bytes() == (want / "model.safetensors").read_bytes()
    assert_same(
        load_state(apply_diff(models["base"], r.path, tmp_path / "rt").path), load_state(models["tuned"])
    )


def test_fp32_models_roundtrip(models, tmp_path):
    r = diff_checkpoints(models["base32"], models["tuned32"], tmp_path / "d")
    assert r.manifest["dtype"] == "float32" and r.manifest["roundtrip"]["exact"]
    assert_same(
        load_state(apply_diff(models["base32"], r.path, tmp_path / "o").path), load_state(models["tuned32"])
    )


def test_tied_source_to_untied_target(models, tmp_path):
    d = diff_checkpoints(models["tied"], models["tied_tuned"], tmp_path / "d").path
    assert "lm_head.weight" not in load_state(d)
    # An untied target with the same shapes: lm_head receives the embedding Δ, and the report says so.
    res = apply_diff(models["target"], d, tmp_path / "out")
    assert any("lm_head.weight receives the Δ of model.embed_tokens.weight" in t for t in res.report.tied)
    got, tgt, dd = load_state(res.path), load_state(models["target"]), load_delta32(d)
    emb = dd["model.embed_tokens.weight"]
    assert torch.equal(got["lm_head.weight"], (tgt["lm_head.weight"].float() + emb).to(torch.bfloat16))


def test_untied_source_to_tied_target(delta, models, tmp_path):
    res = apply_diff(models["tied"], delta, tmp_path / "out")
    assert any("Δ of lm_head.weight ignored" in t for t in res.report.tied)
    assert "lm_head.weight" not in load_state(res.path)
    AutoModelForCausalLM.from_pretrained(res.path)


def test_vocabulary_growth_aligns_rows_by_token(delta, models, tmp_path):
    res = apply_diff(models["grown"], delta, tmp_path / "out")
    v = res.report.vocab
    assert v["method"] == "tokens" and v["new_in_target_zero_delta"] == 3 and v["dropped_from_delta"] == 0
    got, tgt, dd = load_state(res.path), load_state(models["grown"]), load_delta32(delta)
    n_old = dd["model.embed_tokens.weight"].shape[0]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape[0] == n_old + 3
        assert torch.equal(got[name][:n_old], (tgt[name][:n_old].float() + dd[name]).to(torch.bfloat16))
        assert torch.equal(got[name][n_old:], tgt[name][n_old:])  # new tokens: zero Δ
    # Vocabularies differ: the target's tokenizer is kept, the chat template comes from the Δ's source.
    tok = AutoTokenizer.from_pretrained(res.path)
    assert len(tok) == n_old + 3 and tok.chat_template
    AutoModelForCausalLM.from_pretrained(res.path).generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2)


def test_reordered_vocabulary_is_matched_by_string_not_position(delta, models, tmp_path):
    """Swap two tokens' ids (and rows) in the target: position matching would give each the other's Δ."""
    tgt = tmp_path / "swapped"
    shutil.copytree(models["target"], tgt)
    tj = json.loads((tgt / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = "7", "q"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tgt / "tokenizer.json").write_text(json.dumps(tj))
    res = apply_diff(tgt, delta, tmp_path / "out")
    assert res.report.vocab["method"] == "tokens"
    ia, ib = vocab[b], vocab[a]  # old ids (in Δ's tokenizer) of the swapped tokens
    dd, t, got = load_delta32(delta), load_state(tgt), load_state(res.path)
    emb = "model.embed_tokens.weight"
    assert torch.equal(got[emb][vocab[a]], (t[emb][vocab[a]].float() + dd[emb][ia]).to(torch.bfloat16))
    assert torch.equal(got[emb][vocab[b]], (t[emb][vocab[b]].float() + dd[emb][ib]).to(torch.bfloat16))


def test_vocab_mismatch_without_tokenizers_refused_unless_prefix(delta, models, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(delta, d)
    tgt = tmp_path / "grown"
    shutil.copytree(models["grown"], tgt)
    (tgt / "tokenizer.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(IncompatibleCheckpoints, match="no tokenizers to align them.*--vocab prefix"):
        apply_diff(tgt, delta, out)
    assert not out.exists()
    res = apply_diff(tgt, delta, out, policy=ApplyPolicy(vocab="prefix"))
    assert res.report.vocab["method"] == "prefix" and res.report.vocab["new_in_target_zero_delta"] == 3
    with pytest.raises(IncompatibleCheckpoints, match="--vocab error"):
        apply_diff(models["grown"], delta, tmp_path / "out2", policy=ApplyPolicy(vocab="error"))


def test_tensor_only_in_target_is_kept_and_only_in_delta_refused(delta, models, tmp_path):
    # A target lacking one layer's tensor (Δ tensor without counterpart) and with an extra tensor.
    tgt = tmp_path / "tgt"
    shutil.copytree(models["target"], tgt)
    from safetensors.torch import load_file, save_file

    state = load_file(tgt / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.extra_adapter.weight"] = torch.ones(2, 2, dtype=torch.bfloat16)
    save_file(state, str(tgt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        IncompatibleCheckpoints, match="Δ tensor model.layers.1.mlp.up_proj.weight has no counterpart"
    ):
        apply_diff(tgt, delta, tmp_path / "out")
    res = apply_diff(tgt, delta, tmp_path / "out", policy=ApplyPolicy(only_in_delta="ignore"))
    assert res.report.kept_target_only == ["model.extra_adapter.weight"]
    assert res.report.ignored_delta_only == ["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(
        load_state(res.path)["model.extra_adapter.weight"], state["model.extra_adapter.weight"]
    )


def test_shape_mismatch_is_refused(models, tmp_path):
    with pytest.raises(IncompatibleCheckpoints, match="shape"):
        diff_checkpoints(models["base"], models["grown"], tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_nan_input_names_file_and_tensor(models, delta, tmp_path):
    from safetensors.torch import load_file, save_file

    tuned = tmp_path / "tuned"
    shutil.copytree(models["tuned"], tuned)
    shard = sorted(tuned.glob("*.safetensors"))[0]
    state = load_file(shard)
    name = sorted(state)[0]
    state[name].view(-1)[3] = float("nan")
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(
        NonFiniteValues,
        match=rf"{shard.name}: tensor '{name}' has 1 NaN/Inf|{shard.name}: tensor '{name}': 1 NaN",
    ):
        diff_checkpoints(models["base"], tuned, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    with pytest.raises(NonFiniteValues, match=name):
        apply_diff(tuned, delta, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_unrelated_models_are_refused_with_the_measured_norm(models, tmp_path):
    with pytest.raises(UnrelatedModels, match=r"‖Δ‖/‖base‖ = 1\.\d+ exceeds 0\.5"):
        diff_checkpoints(models["base"], models["unrelated"], tmp_path / "d")
    assert not (tmp_path / "d").exists()
    r = diff_checkpoints(models["base"], models["unrelated"], tmp_path / "d", max_relative_norm=2.0)
    assert r.manifest["relative_norms"]["matrices"] > 1


def test_output_rules(delta, models, tmp_path):
    out = tmp_path / "out"
    apply_diff(models["target"], delta, out)
    with pytest.raises(OutputExists, match="already exists"):
        apply_diff(models["target"], delta, out)
    first = (out / "manifest.json").read_bytes()
    apply_diff(models["target"], delta, out, overwrite=True)
    assert (out / "manifest.json").read_bytes() == first  # deterministic output
    for bad in (models["target"], models["target"] / "sub", delta):
        with pytest.raises(OutputExists, match="overlaps input"):
            apply_diff(models["target"], delta, bad, overwrite=True)


def test_crash_mid_write_leaves_nothing(delta, models, tmp_path, monkeypatch):
    import recycler.stages.apply as transfer

    calls = {"n": 0}
    real = transfer.ShardedWriter.submit

    def failing(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kw)

    monkeypatch.setattr(transfer.ShardedWriter, "submit", failing)
    with pytest.raises(OSError, match="No space left"):
        apply_diff(models["target"], delta, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_verify_detects_tampering(delta, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(delta, d)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match=rf"{shard.name}: sha256 mismatch"):
        verify_folder(d)
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(VerificationFailed, match=rf"{shard.name}: size"):
        verify_folder(d)
    shutil.copytree(delta, tmp_path / "d2")
    (tmp_path / "d2" / "stray.safetensors.tmp").write_bytes(b"x")
    (tmp_path / "d2" / "tokenizer.json").unlink()
    with pytest.raises(
        VerificationFailed, match=r"missing file tokenizer.json.*unlisted file stray.safetensors.tmp"
    ):
        verify_folder(tmp_path / "d2")


def test_verify_without_manifest(models):
    with pytest.raises(VerificationFailed, match="no manifest.json"):
        verify_folder(models["base"])
