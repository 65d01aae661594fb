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


# ---- differential: never laxer than the reference parser -----------------------------------------------
# Headers are built as JSON *text*, so that what Python's json module tolerates and Rust's serde_json
# does not (unpaired surrogate escapes, NaN, "-0", 2**64, a list as __metadata__) can appear.

string_literal = st.one_of(
    st.text(max_size=6).map(json.dumps),
    st.sampled_from(['"\\ud800"', '"a\\udc00"', '"\\ud83d\\ude00"', '"\\u0000"', '"\\ud800\\ud800"', '"é"']),
)
number_literal = st.one_of(
    st.integers(-3, 2**65).map(str),
    st.sampled_from(["-0", "1.0", "1e400", "NaN", "Infinity", "-Infinity", "0", "4", "18446744073709551616"]),
)
value_literal = st.one_of(
    string_literal, number_literal, st.sampled_from(["null", "true", "[]", "{}", '{"a":"b"}'])
)
metadata_literal = st.one_of(
    st.just(None),
    value_literal,
    st.lists(st.tuples(string_literal, value_literal), max_size=3).map(
        lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"
    ),
)
DIFF_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8, "U16": 2, "F8_E4M3": 1}


@st.composite
def header_text(draw):
    """A header close to valid (consecutive offsets, a matching data region), then mutated."""
    parts, offset = [], 0
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.one_of(st.sampled_from(['"w"', '"x.y"', '"z"']), string_literal))
        dtype = draw(st.sampled_from(list(DIFF_DTYPES)))
        n = draw(st.integers(0, 4))
        shape = draw(
            st.one_of(
                st.just(f"[{n}]"),
                st.sampled_from(["[0,18446744073709551616]", "[-0]", "[4294967296,4294967296,0]"]),
            )
        )
        size = n * DIFF_DTYPES[dtype]
        ends = draw(
            st.one_of(st.just(f"[{offset},{offset + size}]"), st.sampled_from(["[-0,0]", "[0,0,0]", "[0]"]))
        )
        extra = draw(st.one_of(st.just(""), value_literal.map(lambda v: f',"extra":{v}')))
        parts.append(f'{name}:{{"dtype":"{dtype}","shape":{shape},"data_offsets":{ends}{extra}}}')
        offset += size
    meta = draw(metadata_literal)
    if meta is not None:
        parts.insert(draw(st.integers(0, len(parts))), f'"__metadata__":{meta}')
    text = (
        draw(st.sampled_from(["", " ", "\n"]))
        + "{"
        + ",".join(parts)
        + "}"
        + draw(st.sampled_from(["", "  "]))
    )
    return text, offset


def _reference_accepts(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            f.keys()
        return True
    except Exception:  # the reference raises SafetensorError, and other exceptions for some inputs
        return False


@FUZZ
@given(header_text(), st.integers(-1, 1))
def test_never_laxer_than_the_reference_parser(header, skew):
    text, data_len = header
    raw = text.encode("utf-8", "surrogatepass")
    path = _write(struct.pack("<Q", len(raw)) + raw + bytes(max(0, data_len + skew)))
    try:
        try:
            read_header(path)
        except InvalidCheckpoint:
            return
        assert _reference_accepts(path), f"accepted by recycler, refused by safetensors: {text!r}"
    finally:
        path.unlink()


@pytest.mark.parametrize(
    "text",
    [
        '{"__metadata__":[],"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        '{"__metadata__":{"a":"\\ud800"},"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        '{"\\udc00":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        '{"t":{"dtype":"F32","shape":[1],"data_offsets":[-0,4]}}',
        '{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":NaN}}',
        '{"t":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,4]}}',
        '{"__metadata__":' + "[" * 5000 + "]" * 5000 + "}",
    ],
)
def test_header_cases_the_reference_refuses_are_refused(text):
    raw = text.encode("utf-8", "surrogatepass")
    path = _write(struct.pack("<Q", len(raw)) + raw + bytes(4))
    try:
        assert not _reference_accepts(path)
        with pytest.raises(InvalidCheckpoint, match=str(path)):
            read_header(path)
    finally:
        path.unlink()
