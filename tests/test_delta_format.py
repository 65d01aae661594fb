"""The Δ artifact on disk: stored Δ + residual, round trips, refusals, old artifacts, content addresses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_delta32, load_state
from safetensors.torch import load_file

from recycler.errors import InvalidCheckpoint, VerificationFailed
from recycler.io.safetensors import read_header
from recycler.stages.apply import apply_diff, recycle
from recycler.stages.extract import diff_checkpoints

LEGACY = Path(__file__).parent / "data" / "legacy"
PAIRS = [  # every fixture model pair: (base, fine-tuned)
    ("base", "tuned"),
    ("base32", "tuned32"),
    ("tied", "tied_tuned"),
    ("base", "tuned64"),
    ("base32", "tuned32_64"),
    ("base16", "tuned16_64"),
]


def bits_equal(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return all(
        a[k].dtype == b[k].dtype
        and torch.equal(a[k].view(view[a[k].element_size()]), b[k].view(view[b[k].element_size()]))
        for k in a
    )


@pytest.mark.parametrize(("base", "tuned"), PAIRS)
def test_roundtrip_identity_on_every_fixture_model(models, tmp_path, base, tuned):
    d = diff_checkpoints(models[base], models[tuned], tmp_path / "d", max_shard_bytes=30_000)
    back = apply_diff(models[base], d.path, tmp_path / "back").path
    assert bits_equal(load_state(back), load_state(models[tuned]))  # −0 included
    assert d.manifest["roundtrip"]["exact"]
    if tuned.endswith("_64") or tuned == "tuned64":  # rounded once: the float32 Δ alone misses some
        assert d.manifest["roundtrip"]["fixed_elements"] > 0


def test_fp32_finetune_needs_the_residual_that_old_code_lacked(models, tmp_path):
    """The README's old promise (fp32 round trip 'for any fine-tune') failed on real training data."""
    base, tuned = load_state(models["base32"]), load_state(models["tuned32_64"])
    missed = sum(int(((b.float() + (tuned[k] - b)) != tuned[k]).sum()) for k, b in base.items())
    d = diff_checkpoints(models["base32"], models["tuned32_64"], tmp_path / "d")
    assert missed > 0 and d.manifest["residual"]["roundtrip_fixes"] >= missed
    assert d.manifest["dtype"] == "float32" and d.manifest["residual"]["exceptions"] == 0


def test_residual_layout_pointer_tables_and_plain_loaders(models, tmp_path):
    d = diff_checkpoints(models["base"], models["tuned64"], tmp_path / "d").path
    m = json.loads((d / "manifest.json").read_text())
    assert m["residual"]["files"] == ["residual/model.safetensors"]
    res = load_file(d / "residual" / "model.safetensors")
    stored = load_state(d)  # HF loaders see the nearest-bf16 Δ under the model's own names only
    assert all(v.dtype == torch.bfloat16 for v in stored.values()) and set(stored) == set(
        load_state(models["base"])
    )
    exc = sum(len(v) for k, v in res.items() if k.endswith(".__exc_idx"))
    rt = sum(len(v) for k, v in res.items() if k.endswith(".__rt_idx"))
    assert (exc, rt) == (m["residual"]["exceptions"], m["residual"]["roundtrip_fixes"]) and rt > 0
    for key, idx in res.items():
        if key.endswith("_idx"):
            name, kind = key.removesuffix("_idx").rsplit(".__", 1)
            ptr = res[f"{name}.__{kind}_ptr"]
            numel = stored[name].numel()
            assert idx.dtype == torch.int32 and torch.all(idx[1:] > idx[:-1]) and idx[-1] < numel
            assert ptr[0] == 0 and ptr[-1] == len(idx) and len(ptr) == -(-numel // (1 << 20)) + 1
    d32 = load_delta32(d)
    base, tuned = load_state(models["base"]), load_state(models["tuned64"])
    assert all(torch.equal(d32[k], tuned[k].float() - base[k].float()) for k in base)


def test_missing_residual_is_refused_before_anything_is_written(delta, models, tmp_path):
    d = shutil.copytree(delta, tmp_path / "d")
    victim = sorted((d / "residual").glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(InvalidCheckpoint, match=rf"residual/{victim.name} missing"):
        apply_diff(models["target"], d, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    m = json.loads((d / "manifest.json").read_text())  # the listing dropped too: still refused
    del m["files"][f"residual/{victim.name}"]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InvalidCheckpoint, match="not listed"):
        apply_diff(models["target"], d, tmp_path / "out")


def test_altered_residual_is_refused_and_the_previous_output_kept(models, tmp_path):
    d = diff_checkpoints(models["base"], models["tuned64"], tmp_path / "d").path
    out = apply_diff(models["target"], d, tmp_path / "out").path
    before = (out / "manifest.json").read_bytes()
    res = d / "residual" / "model.safetensors"
    entries, _ = read_header(res)
    val = next(e for n, e in entries.items() if n.endswith(".__exc_val"))
    ptr = next(e for n, e in entries.items() if n.endswith(".__rt_ptr"))
    pristine = res.read_bytes()
    for entry, error, message in (
        (val, VerificationFailed, "output not published.*sha256 mismatch"),  # a value: caught by its hash
        (ptr, InvalidCheckpoint, "malformed rt pointer table"),  # structure: caught before use
    ):
        data = bytearray(pristine)
        data[entry.start + 1] ^= 0x40  # same size, different content
        res.write_bytes(bytes(data))
        with pytest.raises(error, match=message):
            apply_diff(models["target"], d, out, overwrite=True)
    assert (out / "manifest.json").read_bytes() == before
    assert not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("kind", ["f32", "bf16"])
def test_delta_written_before_the_residual_still_applies(tmp_path, kind):
    """tests/data/legacy: a float32 Δ and the old lossy bf16 Δ, no residual, written by the old engine."""
    out = apply_diff(LEGACY / "target", LEGACY / f"delta-{kind}", tmp_path / "out", target_id="target").path
    want = LEGACY / f"applied-{kind}"
    assert (out / "model.safetensors").read_bytes() != b""
    assert bits_equal(load_state(out), load_state(want))  # the same bits as the old engine
    if kind == "f32":
        back = apply_diff(LEGACY / "base", LEGACY / "delta-f32", tmp_path / "back").path
        assert bits_equal(load_state(back), load_state(LEGACY / "tuned"))


def test_content_addresses_do_not_depend_on_folders(models, tmp_path):
    """The same inputs from two folders give byte-identical manifests: one address, one registry version."""
    manifests = []
    for home in ("worker-a/home", "other/place/deep"):
        root = tmp_path / home
        src = {
            k: shutil.copytree(models[k], root / f"{k}-{home.replace('/', '_')}")
            for k in ("base", "tuned", "target")
        }
        d = diff_checkpoints(src["base"], src["tuned"], root / "delta").path
        a = apply_diff(src["target"], d, root / "applied").path
        r = recycle(src["base"], src["tuned"], src["target"], root / "recycled").path
        manifests.append([(p / "manifest.json").read_bytes() for p in (d, a, r)])
        for text in manifests[-1]:
            assert str(tmp_path).encode() not in text and b"worker" not in text and b"deep" not in text
    assert manifests[0] == manifests[1]


def test_lanes_and_cores_do_not_change_a_byte(models, tmp_path, monkeypatch):
    """Shards hashed on 1 or 2 lanes, chunks computed on 1 or 2 workers: the same files and manifest."""
    import recycler.io.reader as reader

    outs = []
    for n in (1, 2):
        monkeypatch.setattr(reader, "cores", lambda n=n: n)
        d = diff_checkpoints(
            models["base"], models["tuned64"], tmp_path / f"d{n}", max_shard_bytes=20_000
        ).path
        outs.append({p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()})
    assert len([p for p in outs[0] if str(p).startswith("residual/")]) > 1
    assert outs[0] == outs[1]


def test_recycle_is_diff_then_apply_where_the_target_equals_the_base(models, tmp_path):
    """A target sharing weights with the old base (the round-trip rule applies there): same bytes."""
    two = apply_diff(
        models["base"],
        diff_checkpoints(models["base"], models["tuned64"], tmp_path / "d").path,
        tmp_path / "two",
    )
    one = recycle(models["base"], models["tuned64"], models["base"], tmp_path / "one")
    assert bits_equal(load_state(one.path), load_state(two.path))
    assert bits_equal(load_state(one.path), load_state(models["tuned64"]))
    assert np.all(
        [not k.startswith("/") for k in json.loads((one.path / "manifest.json").read_text())["files"]]
    )
