"""Every malformed or unsafe input is refused before any computation, with the file named, and no output."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from recycler.errors import InvalidCheckpoint
from recycler.io.checkpoint import open_checkpoint
from recycler.io.safetensors import read_header
from recycler.stages.extract import diff_checkpoints


def _file(tmp: Path, name: str = "model.safetensors") -> Path:
    path = tmp / name
    save_file(
        {"a": torch.ones(4, 2), "b": torch.zeros(3, dtype=torch.bfloat16)},
        str(path),
        metadata={"format": "pt"},
    )
    return path


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    new = json.dumps(edit(header)).encode() if callable(edit) else edit
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_valid_file_parses(tmp_path):
    entries, meta = read_header(_file(tmp_path))
    assert meta == {"format": "pt"}
    assert entries["a"].shape == (4, 2) and entries["a"].dtype == "F32" and entries["b"].dtype == "BF16"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-3]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes() + b"PK\x03\x04" + b"\x00" * 20), "trailing bytes"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10**6) + p.read_bytes()[8:]), "invalid header length"),
        (lambda p: p.write_bytes(struct.pack("<Q", 2 * 10**8) + p.read_bytes()[8:]), "invalid header length"),
        (lambda p: p.write_bytes(b"\x01\x02"), "shorter than 8 bytes"),
    ],
    ids=["truncated", "polyglot", "header-1e6", "header-2e8", "tiny"],
)
def test_structural_corruption_is_rejected(tmp_path, mutate, message):
    path = _file(tmp_path)
    mutate(path)
    with pytest.raises(InvalidCheckpoint, match=message) as e:
        read_header(path)
    assert str(path) in str(e.value)


def _set(key, field, value):
    def edit(h):
        h[key][field] = value
        return h

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("b", "data_offsets", [0, 6]), "overlapping"),
        (_set("a", "dtype", "OBJ"), "unsupported dtype"),
        (_set("a", "shape", [4]), "needs 16 bytes"),
        (_set("a", "shape", [-1, 2]), "invalid shape"),
        (lambda h: {**h, "__metadata__": {"format": 3}}, "__metadata__"),
        (
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            "duplicate key",
        ),
        (b"[1, 2, 3]", "not a JSON object"),
        (b"{not json", "malformed"),
    ],
    ids=[
        "overlap",
        "dtype",
        "shape-size",
        "negative-shape",
        "metadata",
        "duplicate-key",
        "array",
        "bad-json",
    ],
)
def test_header_content_is_validated(tmp_path, edit, message):
    path = _file(tmp_path)
    _rewrite_header(path, edit)
    with pytest.raises(InvalidCheckpoint, match=message):
        read_header(path)


def _copy(models, tmp_path, key="base") -> Path:
    dst = tmp_path / key
    shutil.copytree(models[key], dst)
    return dst


def _edit_index(folder: Path, edit) -> None:
    p = folder / "model.safetensors.index.json"
    p.write_text(json.dumps(edit(json.loads(p.read_text()))))


def test_missing_shard(models, tmp_path):
    folder = _copy(models, tmp_path)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        InvalidCheckpoint, match=r"missing shard\(s\): \['model-00002-of-00003.safetensors'\]"
    ):
        open_checkpoint(folder)


@pytest.mark.parametrize("kind", ["absent", "unlisted", "wrong-shard"])
def test_index_and_shards_must_agree(models, tmp_path, kind):
    folder = _copy(models, tmp_path)

    def edit(index):
        wm = index["weight_map"]
        name = sorted(wm)[0]
        if kind == "absent":
            wm["model.ghost.weight"] = wm[name]
        elif kind == "unlisted":
            del wm[name]
        else:
            others = sorted(set(wm.values()) - {wm[name]})
            wm[name] = others[0]
        return index

    _edit_index(folder, edit)
    with pytest.raises(InvalidCheckpoint, match="index/shard key mismatch") as e:
        open_checkpoint(folder)
    assert {"absent": "listed but absent", "unlisted": "stored but not listed", "wrong-shard": "wrong shard"}[
        kind
    ] in str(e.value)


@pytest.mark.parametrize(
    "shard",
    [
        "../x.safetensors",
        "/tmp/x.safetensors",
        "C:x.safetensors",
        "\\\\srv\\s\\x.safetensors",
        "..\\x.safetensors",
        "sub/x.safetensors",
        "model-00001.bin",
    ],
)
def test_shard_names_are_confined(models, tmp_path, shard, monkeypatch):
    folder = _copy(models, tmp_path)
    _edit_index(folder, lambda i: {**i, "weight_map": {k: shard for k in i["weight_map"]}})
    opened: list[str] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    with pytest.raises(InvalidCheckpoint, match="refusing shard names"):
        open_checkpoint(folder)
    assert not any("x.safetensors" in f or f.endswith(".bin") for f in opened)


def test_pickle_only_folder_is_refused_with_conversion_hint(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(
        InvalidCheckpoint, match="only pickle weights found.*pytorch_model.bin.*save_pretrained"
    ):
        open_checkpoint(folder)


def test_pickle_beside_safetensors_is_never_opened(models, tmp_path):
    folder = _copy(models, tmp_path)
    (folder / "training_args.bin").write_bytes(b"\x80\x04 evil")
    ck = open_checkpoint(folder)
    assert any("training_args.bin" in n for n in ck.notes)


@pytest.mark.parametrize("problem", ["missing", "invalid"])
def test_config_is_required(models, tmp_path, problem):
    folder = _copy(models, tmp_path)
    if problem == "missing":
        (folder / "config.json").unlink()
        match = "config.json is missing"
    else:
        (folder / "config.json").write_text("{oops")
        match = "invalid JSON"
    with pytest.raises(InvalidCheckpoint, match=match):
        open_checkpoint(folder)


def test_several_files_without_index(models, tmp_path):
    folder = _copy(models, tmp_path)
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(InvalidCheckpoint, match="no model.safetensors.index.json"):
        open_checkpoint(folder)


def test_bad_input_leaves_no_output(models, tmp_path):
    folder = _copy(models, tmp_path, "tuned")
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-5])
    out = tmp_path / "delta"
    with pytest.raises(InvalidCheckpoint, match=shard.name):
        diff_checkpoints(models["base"], folder, out)
    assert not out.exists()
    assert not list(tmp_path.glob(".delta*"))
