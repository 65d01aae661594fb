"""Regression tests for the corners a review found silent (issue 19): each input that was partly used,
a default that was guessed or a check skipped for one kind of input is now exact or refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_state
from safetensors.torch import load_file, save_file

from recycler.delta.bits import narrow, widen
from recycler.delta.math import tensor_family
from recycler.delta.policy import ApplyPolicy
from recycler.errors import IncompatibleCheckpoints, NonFiniteValues, UnrelatedModels
from recycler.io.checkpoint import open_checkpoint
from recycler.stages.apply import apply_diff, recycle
from recycler.stages.extract import diff_checkpoints


def edit_state(folder: Path, change) -> None:
    """Rewrite every shard of `folder` with `change(state)` applied."""
    for shard in sorted(folder.glob("*.safetensors")):
        state = load_file(shard)
        change(state)
        save_file(state, str(shard), metadata={"format": "pt"})


# ---- item 1: recycle checks relatedness as diff does ---------------------------------------------------------


def test_recycle_refuses_unrelated_models_like_diff(models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UnrelatedModels, match=r"‖Δ‖/‖base‖ = 1\.\d+ exceeds 0\.5"):
        recycle(models["base"], models["unrelated"], models["target"], out)
    assert not out.exists()  # nothing published
    r = recycle(models["base"], models["unrelated"], models["target"], out, max_relative_norm=2.0)
    assert r.path.is_dir()


def test_recycle_cli_exits_5_with_the_same_option(models, tmp_path):
    import subprocess
    import sys

    args = [
        sys.executable,
        "-m",
        "recycler.cli",
        "recycle",
        models["base"],
        models["unrelated"],
        models["target"],
    ]

    def run(*extra: str) -> subprocess.CompletedProcess:
        cmd = [*map(str, args), "-o", str(tmp_path / "o"), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    r = run()
    assert r.returncode == 5 and "exceeds 0.5" in r.stdout + r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "o").exists()
    r = run("--max-relative-norm", "2")
    assert r.returncode == 0, r.stdout + r.stderr


def test_recycle_measures_tensors_it_does_not_stream(models, tmp_path):
    """Excluding the changed tensors from the transfer must not hide an unrelated pair."""
    with pytest.raises(UnrelatedModels):
        recycle(models["base"], models["unrelated"], models["target"], tmp_path / "o",
                policy=ApplyPolicy(exclude=("*mlp*", "*attn*")))  # fmt: skip


# ---- item 2: non-float tensors: FP8 diffed, changed integer tensors refused ----------------------------------


def test_fp8_weights_are_diffed_and_applied_per_the_formula(models, tmp_path):
    """FP8 was skipped: after apply the base's values stayed, and the manifest said 'exact'."""
    fp8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    shutil.copytree(models["base32"], base)
    shutil.copytree(models["tuned32"], tuned)
    names = sorted(load_state(base))[:2]
    for folder in (base, tuned):
        edit_state(
            folder,
            lambda s: s.update({n: s[n].to(t) for n, t in zip(names, fp8.values(), strict=True) if n in s}),
        )
    d = diff_checkpoints(base, tuned, tmp_path / "d")
    m = d.manifest
    assert m["skipped_non_float"] == [] and sorted(m["roundtrip"]["unchecked_tensors"]) == names
    assert m["roundtrip"]["exact"] is False  # FP8 follows the formula; its round trip is not claimed
    out = load_state(apply_diff(base, d.path, tmp_path / "o").path)
    b, t = load_state(base), load_state(tuned)
    for n in names:
        want = (b[n].float() + (t[n].float() - b[n].float())).to(b[n].dtype)  # in range: torch rounds RNE
        assert out[n].dtype == b[n].dtype and torch.equal(out[n].view(torch.uint8), want.view(torch.uint8))
        assert not torch.equal(out[n].view(torch.uint8), b[n].view(torch.uint8))  # the Δ was applied


@pytest.mark.parametrize(("dtype", "largest", "first_over"), [("F8_E4M3", 448.0, 464.0), ("F8_E5M2", 57344.0, 59392.0)])  # fmt: skip
def test_fp8_narrowing_is_nearest_even_and_refuses_overflow(dtype, largest, first_over):
    codes = np.arange(256, dtype=np.uint8)
    values = widen(codes, dtype, np.empty(256, np.float32))
    finite = codes[np.isfinite(values)]
    out = np.empty(len(finite), np.uint8)
    narrow(values[finite], dtype, out, None)
    assert (out == finite).all()  # every value narrows back to its own code (−0 included)
    out = np.empty(1, np.uint8)
    narrow(np.array([largest + (first_over - largest) * 0.99], np.float32), dtype, out, None)
    assert widen(out, dtype, np.empty(1, np.float32))[0] == largest
    from recycler.delta.fp8 import NarrowOverflow

    over = np.nextafter(np.float32(first_over), np.float32(np.inf)) if dtype == "F8_E4M3" else first_over
    with pytest.raises(NarrowOverflow):
        narrow(np.array([over], np.float32), dtype, out, None)


def test_fp8_target_overflow_names_the_tensor(models, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(models["base32"], target)
    name = "model.layers.0.mlp.up_proj.weight"

    def big(s):
        if name in s:
            s[name] = torch.full_like(s[name], 440.0).to(torch.float8_e4m3fn)

    edit_state(target, big)
    d = diff_checkpoints(models["base32"], models["tuned32"], tmp_path / "d")
    with pytest.raises(NonFiniteValues, match=f"tensor '{name}': target \\+ α·Δ overflows F8_E4M3"):
        apply_diff(target, d.path, tmp_path / "o", policy=ApplyPolicy(alpha=1e6))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["diff", "recycle"])
def test_a_changed_integer_tensor_is_refused_naming_it(models, tmp_path, command):
    """int8-quantised weights and integer buffers were skipped: apply kept the base's values."""
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    shutil.copytree(models["base"], base)
    shutil.copytree(models["tuned"], tuned)
    q = torch.arange(-64, 64, dtype=torch.int8).reshape(8, 16)
    for folder, value in ((base, q), (tuned, q + 1)):
        edit_state(
            folder, lambda s, v=value: s.update({"model.q.qweight": v}) if "lm_head.weight" in s else None
        )
        index = folder / "model.safetensors.index.json"
        if index.exists():
            idx = json.loads(index.read_text())
            shard = idx["weight_map"]["lm_head.weight"]
            idx["weight_map"]["model.q.qweight"] = shard
            index.write_text(json.dumps(idx))
    with pytest.raises(
        IncompatibleCheckpoints, match=r"non-float tensor\(s\) \(I8\) differ.*'model.q.qweight'"
    ):
        if command == "diff":
            diff_checkpoints(base, tuned, tmp_path / "d")
        else:
            recycle(base, tuned, models["target"], tmp_path / "d")
    assert not (tmp_path / "d").exists()
    edit_state(tuned, lambda s: s.update({"model.q.qweight": q}) if "model.q.qweight" in s else None)
    d = diff_checkpoints(
        base, tuned, tmp_path / "d"
    )  # unchanged: nothing is dropped, the round trip is exact
    assert d.manifest["skipped_non_float"] == ["model.q.qweight"] and d.manifest["roundtrip"]["exact"]


# ---- items 3 and 4: tied embeddings by default, GPT-NeoX's head ----------------------------------------------


@pytest.mark.parametrize("style", ["omitted", "explicit", "text_config"])
def test_tied_embeddings_resolved_when_the_config_omits_the_key(models, tmp_path, style):
    """A GPT-2/Gemma-style config (tied by the class default, key dropped) gave an untied target's
    lm_head no update, reported as 'kept unchanged'."""
    tied, tuned = tmp_path / "tied", tmp_path / "tied_tuned"
    for src, dst in ((models["tied"], tied), (models["tied_tuned"], tuned)):
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "config.json").read_text())
        flag = cfg.pop("tie_word_embeddings")
        if style == "explicit":
            cfg["tie_word_embeddings"] = flag
        elif style == "text_config":
            cfg["text_config"] = {"tie_word_embeddings": flag}
        (dst / "config.json").write_text(json.dumps(cfg))
    assert open_checkpoint(tied).tied_embeddings and not open_checkpoint(models["target"]).tied_embeddings
    d = diff_checkpoints(tied, tuned, tmp_path / "d")
    assert d.manifest["tied_embeddings"] is True
    res = apply_diff(models["target"], d.path, tmp_path / "o")
    assert "lm_head.weight" in res.report.applied and "lm_head.weight" not in res.report.kept_target_only
    got, tgt = load_state(res.path), load_state(models["target"])
    assert not torch.equal(got["lm_head.weight"], tgt["lm_head.weight"])
    # A Δ written before this fix recorded `tied_embeddings: false`: its source config decides again.
    manifest = json.loads((d.path / "manifest.json").read_text())
    (d.path / "manifest.json").write_text(json.dumps({**manifest, "tied_embeddings": False}))
    again = apply_diff(models["target"], d.path, tmp_path / "o2")
    assert torch.equal(load_state(again.path)["lm_head.weight"], got["lm_head.weight"])


def test_a_stored_head_means_untied_when_the_config_is_silent(models, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(models["base"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("tie_word_embeddings")
    (folder / "config.json").write_text(json.dumps(cfg))
    assert open_checkpoint(folder).tied_embeddings is False  # lm_head.weight is stored


@pytest.mark.parametrize(
    ("name", "family"),
    [("embed_out.weight", "lm_head"), ("gpt_neox.embed_in.weight", "embed"), ("lm_head.weight", "lm_head"),
     ("model.embed_tokens.weight", "embed"), ("transformer.wte.weight", "embed"), ("output.weight", "lm_head")],
)  # fmt: skip
def test_gpt_neox_embed_out_is_the_head(name, family):
    assert tensor_family(name) == family


# ---- item 6: precheck --base checks Δs recorded by manifest --------------------------------------------------


def test_precheck_refuses_a_wrong_base_for_a_delta_recorded_by_manifest(models, tmp_path):
    """The cycle's Δs record their base by manifest digest; the check ran only for sha256/structure."""
    from recycler.stages.precheck import precheck
    from recycler.store import ensure_manifest

    base, tuned, wrong = tmp_path / "base", tmp_path / "tuned", tmp_path / "wrong"
    for src, dst in ((models["base"], base), (models["tuned"], tuned), (models["target"], wrong)):
        shutil.copytree(src, dst)
        ensure_manifest(dst, kind="model")
    d = diff_checkpoints(base, tuned, tmp_path / "d").path
    assert (
        json.loads((d / "manifest.json").read_text())["sources"]["base"]["fingerprint"]["kind"] == "manifest"
    )
    with pytest.raises(IncompatibleCheckpoints, match="is not the base .* manifest fingerprint"):
        precheck(models["target"], [d], bases=[wrong])
    with pytest.raises(IncompatibleCheckpoints, match="sha256 of its weight files differ"):
        precheck(models["target"], [d], bases=[models["target"]])  # a plain folder: its weights decide
    result = precheck(models["target"], [d], bases=[base])
    assert result.candidates[0].relative_distance is not None
    plain = precheck(models["target"], [d], bases=[models["base"]])  # the release folder itself
    assert plain.candidates[0].notes == ["base matched to the Δ's manifest by the sha256 of its weight files"]
    assert plain.candidates[0].relative_distance == result.candidates[0].relative_distance
    for own in (base, models["base"]):
        assert precheck(own, [d]).candidates[0].notes == ["the target is the Δ's own base"]
    manifest = json.loads((d / "manifest.json").read_text())  # a Δ recording the digest only
    del manifest["sources"]["base"]["weights"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IncompatibleCheckpoints, match="cannot be checked"):
        precheck(models["target"], [d], bases=[models["base"]])
