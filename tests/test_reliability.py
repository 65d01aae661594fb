"""The fault catalogue (../shared/RELIABILITY.md §b) as tests: bad inputs (A, E2/E4), storage faults (B),
crashes at named points (C1–C4, C7), concurrency (D4). Each case ends with the global invariant check
and is counted in the figures printed at the end of the run (tests/reliability.py). C5, C6, C8, D1,
D3, E6 and E7 live beside the code they exercise (test_finetune, test_flows, test_registry_store).

The data path under test is the service's: validate and stage a release, publish it to the artifact
store (manifest last), register it in MLflow; Δ extraction and apply for the pair cases.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from reliability import case, check_invariants, tree_digest
from safetensors.torch import load_file, save_file

from recycler.delta.policy import ApplyPolicy
from recycler.errors import (
    ArtifactNotFound,
    IncompatibleCheckpoints,
    InvalidCheckpoint,
    NonFiniteValues,
    RecyclerError,
    RegistryUnavailable,
    VerificationFailed,
)
from recycler.io.manifest import write_manifest
from recycler.registry.client import Registry
from recycler.service.steps import stage_base
from recycler.stages.apply import apply_diff
from recycler.stages.extract import diff_checkpoints
from recycler.store import prepare
from recycler.store.local import LocalStore
from recycler.store.releases import LocalFolderSource, Release
from recycler.store.s3 import S3Store

MB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def local(tmp_path):
    """The embedded deployment: a local artifact store and a SQLite registry."""
    return LocalStore(tmp_path / "store"), Registry(
        f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=60", backoff=0.1
    )


@pytest.fixture
def s3store(moto_s3):
    return S3Store(
        moto_s3.bucket, f"rel/{uuid.uuid4().hex[:8]}", endpoint_url=moto_s3.endpoint, multipart_chunk_mb=5
    )


def copy_model(models, key: str, dest: Path) -> Path:
    shutil.copytree(models[key], dest)
    return dest


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


def rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = edit(json.loads(raw[8 : 8 + n]))
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def edit_index(folder: Path, edit) -> None:
    p = folder / "model.safetensors.index.json"
    p.write_text(json.dumps(edit(json.loads(p.read_text()))))


def overlap(h):
    names = [k for k in h if k != "__metadata__"]
    h[names[1]]["data_offsets"] = h[names[0]]["data_offsets"]
    return h


def bad_dtype(h):
    h[next(k for k in h if k != "__metadata__")]["dtype"] = "OBJ"
    return h


def bomb(h):
    meta = h.get("__metadata__", {})
    return {
        "__metadata__": meta,
        **{f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(200_000)},
    }


def drop_first_key(ix):
    ix["weight_map"].pop(next(iter(ix["weight_map"])))
    return ix


def escape_shard(ix):
    k = next(iter(ix["weight_map"]))
    ix["weight_map"][k] = "../outside.safetensors"
    return ix


def bin_shard(ix):
    k = next(iter(ix["weight_map"]))
    ix["weight_map"][k] = "pytorch_model-00001.bin"
    return ix


BAD_RELEASES = {
    "A1 shard truncated by 3 bytes": lambda f: first_shard(f).write_bytes(first_shard(f).read_bytes()[:-3]),
    "A2 polyglot (zip appended)": lambda f: first_shard(f).write_bytes(
        first_shard(f).read_bytes() + b"PK\x03\x04" + bytes(30)
    ),
    "A3 header length 10^6 and 2·10^8": lambda f: first_shard(f).write_bytes(
        struct.pack("<Q", 2 * 10**8) + first_shard(f).read_bytes()[8:]
    ),
    "A4 overlapping data_offsets": lambda f: rewrite_header(first_shard(f), overlap),
    "A5 dtype OBJ": lambda f: rewrite_header(first_shard(f), bad_dtype),
    "A6 header bomb (200k entries)": lambda f: rewrite_header(first_shard(f), bomb),
    "A8 index lists a missing shard": lambda f: first_shard(f).unlink(),
    "A9 index keys differ from shard keys": lambda f: edit_index(f, drop_first_key),
    "A10 shard name escapes the folder": lambda f: edit_index(f, escape_shard),
    "A11 index points at a .bin": lambda f: edit_index(f, bin_shard),
}


@pytest.mark.parametrize("name", list(BAD_RELEASES))
def test_bad_release_is_rejected_before_anything_is_written(models, local, tmp_path, name):
    """A release with a malformed checkpoint never reaches the store or the registry."""
    c = case(name, "bad_input")
    store, reg = local
    folder = copy_model(models, "base", tmp_path / "release")
    BAD_RELEASES[name](folder)
    release = Release("fam", "v2", str(folder), "f" * 64)
    started = time.perf_counter()
    with pytest.raises(InvalidCheckpoint) as e:
        staged = stage_base(
            LocalFolderSource(folder.parent, "fam"), release, tmp_path / "dl", tmp_path / "work" / "base"
        )
        reg.register("base", "fam", None, store.publish(staged, "base"), base_version="v2")
    assert time.perf_counter() - started < 5, "validation must be cheap, even for a header bomb"
    assert str(folder) in str(e.value) or "index" in str(e.value), e.value  # names the file
    assert not (tmp_path / "work" / "base").exists() and store.list("base") == [] and reg.models() == []
    c.ok(check_invariants(store, reg, final_dirs=(tmp_path / "work",)))


def _nan_tuned(models, dest: Path) -> Path:
    folder = copy_model(models, "tuned", dest)
    shard = first_shard(folder)
    tensors = load_file(shard)
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    return folder


def _shape_changed(models, dest: Path) -> Path:
    folder = copy_model(models, "tuned", dest)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        for k, t in tensors.items():
            if t.dim() == 2 and "embed" not in k and "lm_head" not in k:
                tensors[k] = torch.zeros(t.shape[0] + 1, t.shape[1], dtype=t.dtype)
                save_file(tensors, shard, metadata={"format": "pt"})
                return folder
    raise AssertionError("no matrix to resize")


@pytest.mark.parametrize(
    ("name", "make", "error"),
    [
        ("A7 NaN in the fine-tuned weights", _nan_tuned, NonFiniteValues),
        ("A12 base vs fine-tune shape change", _shape_changed, IncompatibleCheckpoints),
    ],
)
def test_bad_pair_is_rejected_and_no_delta_appears(models, local, tmp_path, name, make, error):
    c = case(name, "bad_input")
    store, _ = local
    tuned = make(models, tmp_path / "tuned")
    with pytest.raises(error) as e:
        diff_checkpoints(models["base"], tuned, tmp_path / "delta")
    assert "model" in str(e.value) and not (tmp_path / "delta").exists()
    assert not list(tmp_path.glob(".delta*"))  # the temporary folder is gone too
    c.ok(check_invariants(store, final_dirs=(tmp_path,)))


def _with_names(models, root: Path, names: list[str]) -> dict[str, Path]:
    """Base and fine-tune with extra tensors under `names`, listed in the index."""
    pair = {}
    for key in ("base", "tuned"):
        folder = copy_model(models, key, root / key)
        shard = first_shard(folder)
        tensors = load_file(shard)
        for i, n in enumerate(names):
            tensors[n] = torch.full((2,), float(i) + (0.5 if key == "tuned" else 0.0))
        save_file(tensors, shard, metadata={"format": "pt"})
        edit_index(
            folder,
            lambda ix, s=shard.name: {**ix, "weight_map": {**ix["weight_map"], **dict.fromkeys(names, s)}},
        )
        pair[key] = folder
    return pair


def test_e2_tensor_names_with_path_syntax_stay_data(models, local, tmp_path):
    """Tensor names never become paths: Δ shards are named by us, artifacts by their digest."""
    c = case("E2 tensor names with path syntax", "bad_input")
    store, reg = local
    evil = ["../../etc/passwd", "a/../../b", "%2e%2e/x", "/abs/name"]
    pair = _with_names(models, tmp_path, evil)
    long = _with_names(models, tmp_path / "long", ["x" * 10_000])
    with pytest.raises(InvalidCheckpoint, match="invalid tensor name"):  # a 10 kB name is refused
        diff_checkpoints(long["base"], long["tuned"], tmp_path / "long-delta")
    r = diff_checkpoints(pair["base"], pair["tuned"], tmp_path / "delta")
    ref = store.publish(r.path, "diff")
    reg.register("diff", "fam", "v", ref, base_version="v1")
    written = {p.resolve() for p in tmp_path.rglob("*")}
    assert all(str(p).startswith(str(tmp_path.resolve())) for p in written)
    assert not (tmp_path.parent / "etc").exists() and not (tmp_path / "b").exists()
    keys = set()
    for shard in r.path.glob("*.safetensors"):
        keys |= set(load_file(shard))
    assert set(evil) <= keys  # kept as data, under their own names
    c.ok(check_invariants(store, reg, final_dirs=(r.path,)))


class _Canary:
    """Unpickling this writes a file: proof that nothing was deserialized if the file is absent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "training_args.bin", "rng_state.pth"])
def test_e4_pickle_payloads_are_never_deserialized(models, local, tmp_path, filename):
    c = case(f"E4 pickle payload {filename}", "bad_input")
    store, reg = local
    canary = tmp_path / "canary.txt"
    folder = tmp_path / "release"
    if filename == "pytorch_model.bin":  # the only weights: refused with a conversion hint
        folder.mkdir()
        shutil.copy(models["base"] / "config.json", folder / "config.json")
    else:  # beside valid safetensors: ignored, never opened
        copy_model(models, "base", folder)
    (folder / filename).write_bytes(pickle.dumps(_Canary(str(canary))))
    release = Release("fam", "v1", str(folder), "f" * 64)
    if filename == "pytorch_model.bin":
        with pytest.raises(InvalidCheckpoint, match="pickle"):
            stage_base(
                LocalFolderSource(folder.parent, "fam"), release, tmp_path / "dl", tmp_path / "work" / "base"
            )
        assert not (tmp_path / "work" / "base").exists()
    else:
        staged = stage_base(
            LocalFolderSource(folder.parent, "fam"), release, tmp_path / "dl", tmp_path / "work" / "base"
        )
        ref = store.publish(staged, "base")
        assert not (staged / filename).exists() and filename not in json.dumps(store.manifest(ref))
    assert not canary.exists()
    c.ok(check_invariants(store, reg))


# ---------------------------------------------------------------------------------------------- B: storage


def make_artifact(path: Path, *, seed: int, big: int = 0, kind: str = "diff") -> Path:
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    for i in (1, 2):
        (path / f"model-0000{i}-of-00002.safetensors").write_bytes(
            torch.randint(0, 255, (40_000 + i,), generator=gen, dtype=torch.uint8).numpy().tobytes()
        )
    if big:
        (path / "big.safetensors").write_bytes(
            torch.randint(0, 255, (big,), generator=gen, dtype=torch.uint8).numpy().tobytes()
        )
    write_manifest(path, {"kind": kind}, {})
    return path


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_):
        yield self.body


def _error_response(request, status: int, code: str):
    from botocore.awsrequest import AWSResponse

    body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
    return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Raw(body))


class Inject:
    """A botocore before-send hook that answers the n-th (or every) call of one operation with an error."""

    def __init__(self, store: S3Store, op: str, status: int, code: str, *, on: set[int] | None = None):
        self.store, self.op, self.status, self.code, self.on, self.calls = store, op, status, code, on, 0

    def __call__(self, request, **_):
        self.calls += 1
        if self.on is None or self.calls in self.on:
            return _error_response(request, self.status, self.code)
        return None

    def __enter__(self):
        self.store.client.meta.events.register(f"before-send.s3.{self.op}", self)
        return self

    def __exit__(self, *exc):
        self.store.client.meta.events.unregister(f"before-send.s3.{self.op}", self)


def no_uploads(store: S3Store) -> bool:
    return not store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads")


def test_b1_transient_500_on_one_part_is_retried(s3store, tmp_path):
    c = case("B1 HTTP 500 on UploadPart #2", "fault")
    src = make_artifact(tmp_path / "src", seed=1, big=12 * MB)
    with Inject(s3store, "UploadPart", 500, "InternalError", on={2}) as hook:
        ref = s3store.publish(src, "diff")
    assert hook.calls >= 4  # 3 parts + the retried one
    s3store.verify(ref)
    c.ok(check_invariants(s3store))


def test_b2_persistent_part_failure_aborts_and_rerun_converges(s3store, tmp_path):
    c = case("B2 UploadPart fails on every attempt", "fault")
    src = make_artifact(tmp_path / "src", seed=2, big=12 * MB)
    with (
        Inject(s3store, "UploadPart", 500, "InternalError"),
        pytest.raises(Exception, match="InternalError|500"),
    ):
        s3store.publish(src, "diff")
    assert s3store.list("diff") == [] and no_uploads(s3store)
    ref = s3store.publish(src, "diff")
    assert ref.digest == prepare(src, "diff", verify=False).digest
    c.ok(check_invariants(s3store))


def test_b3_failed_read_is_retried_and_verified(s3store, tmp_path):
    c = case("B3 GetObject fails mid-download", "fault")
    ref = s3store.publish(make_artifact(tmp_path / "src", seed=3), "diff")
    with Inject(s3store, "GetObject", 503, "SlowDown", on={2}) as hook:
        out = s3store.fetch(ref, tmp_path / "out")
    assert hook.calls >= 3
    assert tree_digest(out) == tree_digest(tmp_path / "src")
    c.ok(check_invariants(s3store, final_dirs=(out,)))


@pytest.mark.parametrize("target", ["model-00001-of-00002.safetensors", "big.safetensors"])
def test_b4_corruption_at_rest_is_caught_on_read(s3store, tmp_path, target):
    c = case(f"B4 object corrupted at rest ({'multipart' if 'big' in target else 'single-part'})", "fault")
    src = make_artifact(tmp_path / "src", seed=4, big=6 * MB)
    ref = s3store.publish(src, "diff")
    key = f"{s3store.prefix}/diff/{ref.digest}/{target}"
    original = s3store.client.get_object(Bucket=s3store.bucket, Key=key)["Body"].read()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    s3store.client.put_object(Bucket=s3store.bucket, Key=key, Body=bytes(flipped))
    with pytest.raises(VerificationFailed, match=target):
        s3store.fetch(ref, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    s3store.client.put_object(Bucket=s3store.bucket, Key=key, Body=original)  # the operator restores it
    c.ok(check_invariants(s3store))


def test_b5_missing_shard_is_reported_before_download(s3store, tmp_path):
    c = case("B5 manifest present, one shard deleted", "fault")
    src = make_artifact(tmp_path / "src", seed=5)
    ref = s3store.publish(src, "diff")
    key = f"{s3store.prefix}/diff/{ref.digest}/model-00002-of-00002.safetensors"
    s3store.client.delete_object(Bucket=s3store.bucket, Key=key)
    with pytest.raises((VerificationFailed, ArtifactNotFound), match="model-00002"):
        s3store.fetch(ref, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    s3store.client.upload_file(str(src / "model-00002-of-00002.safetensors"), s3store.bucket, key)
    c.ok(check_invariants(s3store))


def test_b6_disk_full_during_apply_keeps_the_previous_output(models, delta, tmp_path, monkeypatch):
    c = case("B6 disk full while writing the applied model", "fault")
    out = tmp_path / "applied"
    apply_diff(models["target"], delta, out, policy=ApplyPolicy())
    before = tree_digest(out)
    from recycler.io.direct import DirectWriter

    def full(self, data):  # every byte of an output goes to the disk through here
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DirectWriter, "_write_all", full)
    with pytest.raises(OSError, match="No space left") as e:
        apply_diff(models["target"], delta, out, policy=ApplyPolicy(alpha=0.5), overwrite=True)
    assert "safetensors" in str(e.value)  # names the file
    assert tree_digest(out) == before  # the previous output is intact
    assert not list(tmp_path.glob(".applied*"))  # no temporary folder left behind
    c.ok(check_invariants(final_dirs=(out,)))


def test_b7_two_publishers_race_for_the_manifest(s3store, tmp_path):
    c = case("B7 manifest PUT races another writer", "fault")
    src = make_artifact(tmp_path / "src", seed=7, big=6 * MB)
    refs, errors, barrier = [], [], threading.Barrier(2)

    def publish():
        try:
            store = S3Store(
                s3store.bucket,
                s3store.prefix,
                endpoint_url=s3store.client.meta.endpoint_url,
                multipart_chunk_mb=5,
            )
            barrier.wait()
            refs.append(store.publish(src, "diff"))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=publish) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(refs) == 2 and refs[0] == refs[1]
    c.ok(check_invariants(s3store))


def test_b8_access_denied_fails_fast_without_leaking(s3store, tmp_path, caplog, aws_env):
    c = case("B8 AccessDenied mid-upload", "fault")
    src = make_artifact(tmp_path / "src", seed=8, big=12 * MB)
    caplog.set_level(logging.DEBUG)
    started = time.perf_counter()
    with (
        Inject(s3store, "UploadPart", 403, "AccessDenied") as hook,
        pytest.raises(Exception, match="AccessDenied") as e,
    ):
        s3store.publish(src, "diff")
    assert time.perf_counter() - started < 10 and hook.calls <= 3  # not retried (one per part at most)
    assert s3store.list("diff") == [] and no_uploads(s3store)
    secrets = tuple(v for k, v in aws_env.items() if "SECRET" in k or "TOKEN" in k or "PASSWORD" in k)
    c.ok(check_invariants(s3store, logs=caplog.text + str(e.value), secrets=secrets))


def test_b9_registry_down_leaves_artifact_unregistered_then_registers_once(mlflow_server, s3store, tmp_path):
    c = case("B9 MLflow down during registration", "fault")
    ref = s3store.publish(make_artifact(tmp_path / "src", seed=9), "diff")
    dead = Registry("http://127.0.0.1:9", attempts=2, backoff=0.05)
    with pytest.raises(RegistryUnavailable):
        dead.register("diff", "fam-b9", "v", ref, base_version="v1")
    reg = Registry(mlflow_server.uri, backoff=0.1)
    assert reg.versions("diff", "fam-b9", "v") == []
    reg.register("diff", "fam-b9", "v", ref, base_version="v1")
    reg.register("diff", "fam-b9", "v", ref, base_version="v1")  # the rerun of the rerun
    assert len(reg.versions("diff", "fam-b9", "v")) == 1
    c.ok(check_invariants(s3store, reg))


# ---------------------------------------------------------------------------------------------- C: crashes


def run_killed(code: str, point: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a child that SIGKILLs itself at crash point `point`."""
    full = {**os.environ, "RECYCLER_CRASH_AT": point, **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -9, f"expected SIGKILL at {point}: rc={done.returncode}\n{done.stderr[-2000:]}"
    return done


def test_c1_crash_during_diff_then_rerun_is_byte_identical(models, tmp_path):
    c = case("C1 killed during Δ computation", "fault")
    d = case("C1 rerun byte-identical", "determinism")
    ref = diff_checkpoints(
        models["base"], models["tuned"], tmp_path / "reference", max_shard_bytes=40_000
    ).path
    out = tmp_path / "delta"
    run_killed(
        f"""
        from recycler.stages.extract import diff_checkpoints
        diff_checkpoints({str(models["base"])!r}, {str(models["tuned"])!r}, {str(out)!r}, max_shard_bytes=40_000)
    """,
        "write:shard-closed=1",
    )
    assert not out.exists()
    diff_checkpoints(models["base"], models["tuned"], out, max_shard_bytes=40_000)
    assert tree_digest(out) == tree_digest(ref)
    inv = check_invariants(final_dirs=(out,))
    c.ok(inv)
    d.ok()


def test_c2_c3_crash_mid_upload_and_before_manifest(s3store, moto_s3, tmp_path):
    src = make_artifact(tmp_path / "src", seed=11, big=12 * MB)
    env = {"S3_ENDPOINT": moto_s3.endpoint}
    code = f"""
        from recycler.store.s3 import S3Store
        store = S3Store({s3store.bucket!r}, {s3store.prefix!r}, endpoint_url={moto_s3.endpoint!r}, multipart_chunk_mb=5, max_concurrency=1)
        store.publish(__import__("pathlib").Path({str(src)!r}), "diff")
    """
    for cid, point in (
        ("C2 killed mid-upload", "publish:uploaded=1"),
        ("C3 killed before the manifest", "publish:before-manifest"),
    ):
        c = case(cid, "fault")
        run_killed(code, point, env)
        assert s3store.list("diff") == []  # nothing visible to readers
        inv = check_invariants(s3store)
        assert inv.orphans  # the uploaded shards are there, without a manifest: invisible
        s3store.abort_stale_uploads(timedelta(0))
        c.ok(inv)
    ref = s3store.publish(src, "diff")
    s3store.verify(ref)
    assert no_uploads(s3store)
    assert check_invariants(s3store).hold


def test_c3_local_store_crash_before_manifest(tmp_path):
    c = case("C3 local store killed before the manifest", "fault")
    src = make_artifact(tmp_path / "src", seed=12)
    store = LocalStore(tmp_path / "store")
    run_killed(
        f"""
        from pathlib import Path
        from recycler.store.local import LocalStore
        LocalStore(Path({str(store.root)!r})).publish(Path({str(src)!r}), "diff")
    """,
        "publish:before-manifest",
    )
    assert store.list("diff") == []
    ref = store.publish(src, "diff")
    store.verify(ref)
    c.ok(check_invariants(store))


def test_c4_crash_during_apply_then_rerun_is_byte_identical(models, delta, tmp_path):
    c = case("C4 killed during apply", "fault")
    d = case("C4 rerun byte-identical", "determinism")
    ref = apply_diff(models["base"], delta, tmp_path / "reference", max_shard_bytes=40_000).path
    out = tmp_path / "applied"
    run_killed(
        f"""
        from recycler.stages.apply import apply_diff
        apply_diff({str(models["base"])!r}, {str(delta)!r}, {str(out)!r}, max_shard_bytes=40_000)
    """,
        "write:shard-closed=1",
    )
    assert not out.exists()
    apply_diff(models["base"], delta, out, max_shard_bytes=40_000)
    assert tree_digest(out) == tree_digest(ref)
    c.ok(check_invariants(final_dirs=(out,)))
    d.ok()


@pytest.mark.parametrize("op", ["apply", "diff", "recycle"])
def test_killed_writers_temporaries_are_reclaimed(op, models, delta, tmp_path):
    """A SIGKILLed apply/diff/recycle leaves its `.<out>.tmp-<id>` sibling (up to a model's size): the
    next write to the same destination removes it, and `recycler doctor --fix` removes any in the
    workspace; a temporary whose writer still runs is left alone."""
    from recycler.doctor.storage import check_temporaries
    from recycler.io.atomic import temporaries

    calls = {
        "apply": f"apply_diff({str(models['base'])!r}, {str(delta)!r}, OUT, max_shard_bytes=40_000)",
        "diff": f"diff_checkpoints({str(models['base'])!r}, {str(models['tuned'])!r}, OUT, max_shard_bytes=40_000)",
        "recycle": f"recycle({str(models['base'])!r}, {str(models['tuned'])!r}, {str(models['target'])!r}, OUT, max_shard_bytes=40_000)",
    }
    work = tmp_path / "home" / "work"
    out = work / "fam" / "inst" / "v1" / "out"
    code = f"""
        from pathlib import Path
        from recycler.stages.apply import apply_diff, recycle
        from recycler.stages.extract import diff_checkpoints
        OUT = Path({str(out)!r})
        {calls[op]}
    """
    run_killed(code, "write:shard-closed=1")
    (first,) = temporaries(out.parent)
    assert sum(f.stat().st_size for f in first.rglob("*")) > 0 and not out.exists()
    run_killed(code, "write:shard-closed=1")  # crashes do not pile up: the second reclaimed the first's
    (second,) = temporaries(out.parent)
    assert second != first and not first.exists()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]  # the next write to the same destination reclaims it
    assert out.is_dir() and temporaries(out.parent) == []
    out_again = out.with_name("again")
    run_killed(code.replace(repr(str(out)), repr(str(out_again))), "write:shard-closed=1")
    assert len(temporaries(out_again.parent)) == 1
    fixed = check_temporaries([work], timedelta(hours=1), fix=True)
    assert fixed.fixed and "removed 1" in fixed.detail and temporaries(out_again.parent) == []


def test_c7_crash_after_create_model_version_then_rerun(mlflow_server, s3store, tmp_path):
    c = case("C7 killed during registration", "fault")
    ref = s3store.publish(make_artifact(tmp_path / "src", seed=13), "diff")
    run_killed(
        f"""
        from recycler.registry.client import Registry
        from recycler.store import ArtifactRef
        Registry({mlflow_server.uri!r}).register("diff", "fam-c7", "v", ArtifactRef("diff", {ref.digest!r}, {ref.uri!r}), base_version="v1")
    """,
        "register:created",
    )
    reg = Registry(mlflow_server.uri, backoff=0.1, lease_ttl=1.0, lease_wait=30)
    time.sleep(1.2)  # the killed holder's lease expires
    reg.register("diff", "fam-c7", "v", ref, base_version="v1")
    assert len(reg.versions("diff", "fam-c7", "v")) == 1
    c.ok(check_invariants(s3store, reg))


# ---------------------------------------------------------------------------------------------- D4


def test_d4_reader_never_sees_a_partial_artifact(s3store, tmp_path):
    c = case("D4 reader polls during a publish", "concurrency")
    src = make_artifact(tmp_path / "src", seed=14, big=12 * MB)
    ref = s3store.ref("diff", prepare(src, "diff", verify=False).digest)
    seen, done = [], threading.Event()

    def slow_part(request, **_):
        time.sleep(0.2)

    s3store.client.meta.events.register("before-send.s3.UploadPart", slow_part)
    t = threading.Thread(target=lambda: (s3store.publish(src, "diff"), done.set()))
    t.start()
    reader = S3Store(s3store.bucket, s3store.prefix, endpoint_url=s3store.client.meta.endpoint_url)
    while not done.is_set():
        try:
            reader.fetch(ref, tmp_path / f"read-{len(seen)}")
            seen.append("complete")
        except ArtifactNotFound:
            seen.append("absent")
        except RecyclerError as e:  # a partial artifact would land here
            seen.append(f"partial: {e}")
        time.sleep(0.05)
    t.join()
    s3store.client.meta.events.unregister("before-send.s3.UploadPart", slow_part)
    assert seen and set(seen) <= {"absent", "complete"}, seen
    c.ok(check_invariants(s3store))
