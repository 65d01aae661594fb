"""E1: fuzz the safetensors header parser and the index/folder validator (hypothesis).

Property: whatever bytes a file holds, validation either accepts it or raises InvalidCheckpoint naming
the file; never another exception, never a hang. CI runs a few hundred examples per target; a longer
run: `RECYCLER_FUZZ_EXAMPLES=200000 .venv/bin/pytest tests/test_fuzz_validator.py -q` (≈ 10 minutes).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import case

from recycler.errors import InvalidCheckpoint
from recycler.io.checkpoint import open_checkpoint
from recycler.io.safetensors import read_header

EXAMPLES = int(os.environ.get("RECYCLER_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow], database=None
)

DTYPES = ["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64", "OBJ", "", "f32"]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8))
entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(DTYPES),
        "shape": st.lists(st.integers(-2, 9), max_size=4),
        "data_offsets": st.lists(st.integers(-4, 300), min_size=0, max_size=3),
    }
)
header = st.dictionaries(st.text(min_size=0, max_size=12), st.one_of(entry, json_leaf), max_size=6)


@pytest.fixture(scope="module", autouse=True)
def _ledger(request):
    """The fuzz family counts once in the reliability figures, confirmed if every target passed."""
    c = case("E1 header/index fuzz", "bad_input")
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        c.ok()


def _write(blob: bytes) -> Path:
    fd, name = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    return Path(name)


def _accepts_or_refuses(path: Path) -> None:
    try:
        read_header(path)
    except InvalidCheckpoint as e:
        assert str(path) in str(e)
    finally:
        path.unlink()


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(blob):
    _accepts_or_refuses(_write(blob))


@FUZZ
@given(header, st.binary(max_size=256), st.integers(0, 3))
def test_structured_headers(h, payload, length_skew):
    raw = json.dumps(h).encode()
    _accepts_or_refuses(_write(struct.pack("<Q", len(raw) + length_skew) + raw + payload))


index_entry = st.one_of(
    st.sampled_from(
        [
            "model.safetensors",
            "../x.safetensors",
            "/tmp/x.safetensors",
            "C:x.safetensors",
            "..\\x",
            "a.bin",
            "",
        ]
    ),
    json_leaf,
)


@FUZZ
@given(st.dictionaries(st.text(max_size=10), index_entry, max_size=5), st.booleans())
def test_index_files(weight_map, with_metadata):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "config.json").write_text('{"model_type": "llama"}')
        body = {"weight_map": weight_map, **({"metadata": {"total_size": 1}} if with_metadata else {})}
        (folder / "model.safetensors.index.json").write_text(json.dumps(body))
        try:
            ckpt = open_checkpoint(folder)
        except InvalidCheckpoint as e:
            assert str(folder) in str(e)  # refused, naming the folder (and no other exception type)
        else:  # accepted: only possible when every listed shard is a real file inside the folder
            assert all(e.file.parent == folder for e in ckpt.tensors.values())
            assert set(ckpt.tensors) == set(weight_map)
