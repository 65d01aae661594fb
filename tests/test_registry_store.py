"""Artifact store, registry, tracking and their CLI against real servers (moto S3, MLflow on SQLite and
PostgreSQL). Covers RELIABILITY.md B2, B4, B5, B7, B9, C2, C3, C7, D3, E2 and E7."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from reliability import case, check_invariants

from recycler.errors import ArtifactNotFound, RegistryError, RegistryUnavailable, VerificationFailed
from recycler.io.manifest import verify_folder, write_manifest
from recycler.registry.client import Registry
from recycler.registry.lineage import lineage
from recycler.registry.lineage_graph import to_mermaid
from recycler.registry.names import LOCK_PREFIX, Lineage, champion_alias
from recycler.settings import Settings
from recycler.store import ensure_manifest, prepare, resolve_uri
from recycler.store.local import LocalStore
from recycler.store.s3 import S3Store

pytestmark = pytest.mark.integration
MB = 1024 * 1024


def make_folder(path: Path, *, seed: int, kind: str = "diff", big: int = 0) -> Path:
    """A folder with a manifest: two small 'shards', a config, and optionally one multipart-sized file."""
    rng = __import__("random").Random(seed)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    for i in (1, 2):
        (path / f"model-0000{i}-of-00002.safetensors").write_bytes(rng.randbytes(40_000 + i))
    if big:
        (path / "big.safetensors").write_bytes(rng.randbytes(big))
    write_manifest(path, {"kind": kind}, {})
    return path


@pytest.fixture
def s3store(moto_s3):
    """A store under a fresh prefix; 5 MiB parts so a 12 MiB file is a 3-part multipart upload."""
    return S3Store(
        moto_s3.bucket, f"t/{uuid.uuid4().hex[:8]}", endpoint_url=moto_s3.endpoint, multipart_chunk_mb=5
    )


@pytest.fixture(params=["sqlite", "postgres"])
def registry(request) -> Registry:
    server = request.getfixturevalue("mlflow_server" if request.param == "sqlite" else "mlflow_pg_server")
    return Registry(server.uri, attempts=3, backoff=0.2)


# ------------------------------------------------------------------------------------------ store only


def test_local_store_publish_fetch_verify(tmp_path):
    src = make_folder(tmp_path / "src", seed=1, kind="model")
    (src / ".checkpoints").mkdir()
    (src / ".checkpoints" / "state.json").write_text("{}")  # hidden: never published
    store = LocalStore(tmp_path / "store")
    ref = store.publish(src, "model")
    assert store.publish(src, "model") == ref  # idempotent
    assert store.list("model") == [ref] and store.exists(ref)
    assert not (Path(ref.uri) / ".checkpoints").exists()
    out = store.fetch(ref, tmp_path / "out")
    assert prepare(out, "model", verify=True).digest == ref.digest
    (Path(ref.uri) / "config.json").write_text('{"seed": 2}')  # corrupted at rest
    with pytest.raises(VerificationFailed, match="config.json"):
        store.verify(ref)
    with pytest.raises(VerificationFailed, match="config.json"):
        store.fetch(ref, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    stale = tmp_path / "store" / "model" / f".{'0' * 64}.tmp-{'d' * 12}"
    stale.mkdir()
    assert store.abort_stale_uploads(timedelta(0)) == 1 and not stale.exists()


def test_ensure_manifest_skips_hidden_entries(tmp_path):
    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    (folder / ".checkpoints" / "step-1").mkdir(parents=True)
    (folder / ".checkpoints" / "step-1" / "w.safetensors").write_bytes(b"y")
    digest = ensure_manifest(folder)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors"]
    assert ensure_manifest(folder) == digest and not list(tmp_path.glob(".*tmp-*"))


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a\\b", "C:x", "a/./b", "a//b", "sub/manifest.json"])
def test_unsafe_manifest_paths_are_refused(tmp_path, bad):
    folder = make_folder(tmp_path / "f", seed=3)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][bad] = {"sha256": "0" * 64, "size": 1}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerificationFailed, match="unsafe path|cannot list a manifest"):
        prepare(folder, "diff", verify=False)


def test_corrupted_or_missing_object_fails_fetch_and_verify(s3store, tmp_path):
    ref = s3store.publish(make_folder(tmp_path / "src", seed=4, big=12 * MB), "diff")
    key = f"{s3store.prefix}/diff/{ref.digest}/model-00002-of-00002.safetensors"
    body = bytearray(s3store.client.get_object(Bucket=s3store.bucket, Key=key)["Body"].read())
    body[100] ^= 0xFF  # same size, one flipped byte
    s3store.client.put_object(Bucket=s3store.bucket, Key=key, Body=bytes(body))
    # and the multipart object (composite checksum: botocore would not notice), re-uploaded as multipart
    big_key = f"{s3store.prefix}/diff/{ref.digest}/big.safetensors"
    big = bytearray((tmp_path / "src" / "big.safetensors").read_bytes())
    big[-1] ^= 0x01
    (tmp_path / "bad-big").write_bytes(bytes(big))
    s3store.client.upload_file(str(tmp_path / "bad-big"), s3store.bucket, big_key, Config=s3store.transfer)
    for call in (lambda: s3store.verify(ref), lambda: s3store.fetch(ref, tmp_path / "out")):
        with pytest.raises(VerificationFailed) as err:
            call()
        assert "model-00002-of-00002.safetensors: sha256 mismatch" in str(err.value)
        assert "big.safetensors: sha256 mismatch" in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    s3store.client.delete_object(Bucket=s3store.bucket, Key=key)
    with pytest.raises(VerificationFailed, match=r"incomplete.*model-00002-of-00002.safetensors: missing"):
        s3store.fetch(ref, tmp_path / "out")


def test_failed_upload_leaves_no_manifest_and_rerun_completes(s3store, mlflow_server, tmp_path):
    """B2/C2/C3: UploadPart #2 fails → no manifest, no version, multipart aborted; the rerun publishes
    and registers once. Then the manifest PUT fails → the next rerun uploads only the manifest."""
    src = make_folder(tmp_path / "src", seed=5, big=12 * MB)
    reg = Registry(mlflow_server.uri, backoff=0.2)
    family = f"up{uuid.uuid4().hex[:6]}"
    events = s3store.client.meta.events
    calls: list[str] = []

    def fail_second_part(request, **kwargs):
        calls.append("UploadPart")
        if len(calls) == 2:
            raise ConnectionAbortedError("injected failure in UploadPart #2")

    def publish_then_register():  # the flow's order: register only after the manifest exists
        ref = s3store.publish(src, "diff")
        return reg.register("diff", family, "v", ref, base_version="b1")

    events.register("before-send.s3.UploadPart", fail_second_part)
    try:
        with pytest.raises(ConnectionAbortedError):
            publish_then_register()
    finally:
        events.unregister("before-send.s3.UploadPart", fail_second_part)
    ref = s3store.ref("diff", prepare(src, "diff", verify=False).digest)
    assert not s3store.exists(ref) and s3store.list("diff") == []
    assert not s3store.client.list_multipart_uploads(Bucket=s3store.bucket).get("Uploads")
    assert reg.versions("diff", family, "v") == []
    assert publish_then_register().version == "1"

    # C3: shards uploaded, manifest PUT lost; the rerun skips the shards (same sha256 metadata)
    src2 = make_folder(tmp_path / "src2", seed=6, big=6 * MB)

    def fail_manifest(request, **kwargs):
        if request.url.endswith("manifest.json"):
            raise ConnectionAbortedError("injected failure writing the manifest")

    events.register("before-send.s3.PutObject", fail_manifest)
    try:
        with pytest.raises(ConnectionAbortedError):
            s3store.publish(src2, "diff")
    finally:
        events.unregister("before-send.s3.PutObject", fail_manifest)
    uploads: list[str] = []

    def record(request, **kwargs):
        uploads.append(request.url.split("?")[0].rsplit("/", 1)[-1])

    writes = ("PutObject", "CreateMultipartUpload", "UploadPart")
    for op in writes:
        events.register(f"before-send.s3.{op}", record)
    try:
        ref2 = s3store.publish(src2, "diff")
    finally:
        for op in writes:
            events.unregister(f"before-send.s3.{op}", record)
    assert s3store.exists(ref2)
    assert uploads == ["manifest.json"]  # every file was already there with its sha256


def test_stale_multipart_uploads_are_aborted(s3store, moto_s3):
    c = s3store.client
    mine = c.create_multipart_upload(Bucket=s3store.bucket, Key=f"{s3store.prefix}/diff/x/big")
    c.upload_part(
        Bucket=s3store.bucket,
        Key=f"{s3store.prefix}/diff/x/big",
        UploadId=mine["UploadId"],
        PartNumber=1,
        Body=b"1" * 10,
    )
    other = c.create_multipart_upload(Bucket=s3store.bucket, Key="elsewhere/big")
    assert s3store.abort_stale_uploads(timedelta(0)) == 1  # only under this store's prefix
    left = [u["Key"] for u in c.list_multipart_uploads(Bucket=s3store.bucket).get("Uploads", [])]
    assert left == ["elsewhere/big"]
    c.abort_multipart_upload(Bucket=s3store.bucket, Key="elsewhere/big", UploadId=other["UploadId"])


# ------------------------------------------------------------------------------------------ registry


def _copy_with_manifest(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    ensure_manifest(dest)
    return dest


def test_round_trip_publish_register_alias_lineage(registry, s3store, models, delta, tmp_path):
    """Lin et al.'s cycle on tiny models: base v1 → ft v1 → Δ → base v2 + Δ → ft v2, all registered."""
    from recycler.stages.apply import apply_diff

    fam, var = f"rt-{uuid.uuid4().hex[:6]}", "math"
    pub = lambda folder, kind: s3store.publish(folder, kind)  # noqa: E731
    base1 = registry.register(
        "base",
        fam,
        None,
        pub(_copy_with_manifest(models["base"], tmp_path / "b1"), "base"),
        base_version="v1",
    )
    ft1 = registry.register(
        "ft",
        fam,
        var,
        pub(_copy_with_manifest(models["tuned"], tmp_path / "f1"), "model"),
        base_version="v1",
        metrics={"acc": 0.5},
    )
    d_ref = pub(delta, "diff")
    d1 = registry.register(
        "diff",
        fam,
        var,
        d_ref,
        base_version="v1",
        lineage=Lineage(source_ft=ft1.reference, diff_mode="direct"),
    )
    assert registry.register("diff", fam, var, d_ref, base_version="v1").version == d1.version  # idempotent
    registry.set_alias("diff", fam, var, "next-diff", d1.version)
    base2 = registry.register(
        "base",
        fam,
        None,
        pub(_copy_with_manifest(models["target"], tmp_path / "b2"), "base"),
        base_version="v2",
    )
    merged_dir = apply_diff(models["target"], delta, tmp_path / "m2").path
    m2 = registry.register(
        "merged",
        fam,
        var,
        pub(merged_dir, "model"),
        base_version="v2",
        lineage=Lineage(parent_diff=f"{fam}-{var}-diff@next-diff"),
    )
    ft2_dir = make_folder(tmp_path / "f2", seed=7, kind="model")  # stands in for a fine-tune of m2
    ft2 = registry.register(
        "ft",
        fam,
        var,
        pub(ft2_dir, "model"),
        base_version="v2",
        lineage=Lineage(parent_diff=d1.reference, source_merged=m2.reference),
        metrics={"acc": 0.7},
    )
    for alias in ("champion", champion_alias("v2")):
        registry.set_alias("ft", fam, var, alias, ft2.version)

    assert m2.tags["parent_diff"] == d1.reference  # the alias was resolved to a fixed version
    assert registry.get_alias("ft", fam, var, "approved-v2").version == ft2.version
    assert registry.get_alias("ft", fam, var, "approved-v9") is None
    assert (
        registry.base_version(fam, "v2").version == base2.version and registry.base_version(fam, "v9") is None
    )
    assert {v.version: set(v.aliases) for v in registry.versions("ft", fam, var)} == {
        "1": set(),
        "2": {"champion", "approved-v2"},
    }
    assert fam in registry.families()
    tree = lineage(registry, f"{fam}-{var}-ft", "champion")
    labels = {(n.relation, n.label) for n in tree.walk()}
    assert ("base", f"{base1.name} v{base1.version}") in labels and (
        "base",
        f"{base2.name} v{base2.version}",
    ) in labels
    assert ("source_ft", f"{ft1.name} v1") in labels and ("source_merged", f"{m2.name} v1") in labels
    assert "flowchart LR" in to_mermaid(tree) and "-->|parent_diff|" in to_mermaid(tree)
    assert "Δ" in registry.client.get_model_version(d1.name, d1.version).description

    store, ref = resolve_uri(
        m2.source, Settings(home=tmp_path / "h", s3_endpoint_url=s3store.client.meta.endpoint_url)
    )
    assert ref == m2.artifact
    fetched = store.fetch(ref, tmp_path / "fetched")
    assert verify_folder(fetched)["kind"] == "model"


def test_concurrent_registrations_make_one_version(registry, s3store, tmp_path):
    """D3: 8 threads, each with its own client, register one artifact → exactly one version."""
    d3 = case(f"D3 eight concurrent registrations [{registry.uri}]", "concurrency")
    ref = s3store.publish(make_folder(tmp_path / "src", seed=8), "diff")
    family, results, errors = f"cc-{uuid.uuid4().hex[:6]}", [], []
    barrier = threading.Barrier(8)

    def worker():
        try:
            r = Registry(registry.uri, backoff=0.2)
            barrier.wait()
            results.append(r.register("diff", family, "v", ref, base_version="b1").version)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 8 and len(set(results)) == 1
    assert [v.version for v in registry.versions("diff", family, "v")] == results[:1]
    leftovers = registry.client.search_registered_models(f"name LIKE '{LOCK_PREFIX}%'")
    assert list(leftovers) == []
    d3.ok(check_invariants(s3store, registry))


def test_expired_lease_of_a_killed_holder_is_taken_over(mlflow_server, s3store, tmp_path):
    """C10: a lease whose holder died (expires_at in the past) does not block; a live one times out."""
    reg = Registry(mlflow_server.uri, lease_wait=1.0, backoff=0.2)
    ref = s3store.publish(make_folder(tmp_path / "src", seed=9), "diff")
    family = f"ls-{uuid.uuid4().hex[:6]}"
    import hashlib

    key = f"register:{family}-v-diff:{ref.digest}"
    lock = LOCK_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]
    reg.client.create_registered_model(lock, tags={"owner": "dead", "expires_at": str(time.time() + 60)})
    with pytest.raises(RegistryError, match="held by another process"):
        reg.register("diff", family, "v", ref, base_version="b1")
    reg.client.set_registered_model_tag(lock, "expires_at", str(time.time() - 1))
    assert reg.register("diff", family, "v", ref, base_version="b1").version == "1"


def test_registry_down_fails_fast_with_a_clear_error(monkeypatch, tmp_path):
    from recycler.store import ArtifactRef

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reg = Registry(f"http://127.0.0.1:{port}", attempts=3, backoff=0.1)
    ref = ArtifactRef("diff", "a" * 64, f"s3://b/p/diff/{'a' * 64}")
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="failed 3 times"):
        reg.register("diff", "fam", "v", ref, base_version="b1")
    assert time.monotonic() - start < 20


def test_names_and_references_are_validated(mlflow_server):
    from recycler.store import ArtifactRef

    reg = Registry(mlflow_server.uri)
    ref = ArtifactRef("diff", "b" * 64, f"s3://b/p/diff/{'b' * 64}")
    for family in ("../x", "Fam", "a b", "x' or '1'='1"):
        with pytest.raises(RegistryError, match="family"):
            reg.register("diff", family, "v", ref, base_version="b1")
    with pytest.raises(RegistryError, match="not found"):
        reg.register("diff", "fam", "v", ref, base_version="b1", lineage=Lineage(source_ft="nope-v-ft/1"))
    with pytest.raises(RegistryError, match="unknown tag 'gate_margn'"):
        reg.register("diff", "fam", "v", ref, base_version="b1", status={"gate_margn": "x"})
    with pytest.raises(RegistryError, match="local path"):
        reg.register("diff", "fam", "v", ArtifactRef("diff", "b" * 64, "/tmp/x"), base_version="b1")
    with pytest.raises(ArtifactNotFound):
        LocalStore(Path("/nonexistent")).manifest(ArtifactRef("diff", "b" * 64, "/x"))


# ------------------------------------------------------------------------------------------ tracking, logs, CLI


def test_tracked_run_logs_curve_json_figure_dataset(mlflow_server, tmp_path):
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

    from recycler.registry.runlog import log_curve, log_dataset, log_figure, log_json_artifact
    from recycler.registry.runs import tracked_run

    settings = Settings(home=tmp_path / "home", tracking_uri=mlflow_server.uri, experiment="t-tracking")
    with tracked_run("off", settings=settings, enabled=False) as run:
        assert run is None
        log_curve("loss", [(1, 1.0)])  # no active run: a no-op
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "response": "2"}\n{"prompt": "2+2", "response": "4"}\n')
    with tracked_run(
        "ft", params={"lr": 5e-6, "opt": {"name": "adamw"}}, settings=settings, enabled=True
    ) as run:
        log_curve("loss", [(1, 2.0), (2, 1.5), (3, 1.25)])
        log_json_artifact({"ok": True}, "record.json")
        fig = Figure()
        fig.subplots().plot([1, 2], [3, 4])
        log_figure(fig, "curve.png")
        info = log_dataset(data, "training")
    client = MlflowClient(mlflow_server.uri)
    got = client.get_run(run.info.run_id)
    assert got.data.params == {"lr": "5e-06", "opt.name": "adamw"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (1, 2.0),
        (2, 1.5),
        (3, 1.25),
    ]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"record.json", "curve.png"}
    (ds_input,) = got.inputs.dataset_inputs
    assert {t.key: t.value for t in ds_input.tags}["sha256"] == info["sha256"]
    assert ds_input.dataset.source_type == "local" and str(data) in ds_input.dataset.source


def test_credentials_never_reach_logs_or_mlflow(caplog, capfd, aws_env, s3store, mlflow_server, tmp_path):
    """E7: DEBUG on root, boto3, botocore, urllib3, mlflow through S3 and registry traffic → no secret."""
    e7 = case("E7 credential leak scan", "security")
    from mlflow import MlflowClient

    from recycler.redact import SECRET_ENV, install_redaction
    from recycler.registry.runs import tracked_run

    install_redaction()
    names = ("", "boto3", "botocore", "urllib3", "mlflow", "s3transfer")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.DEBUG)
    secrets = {k: v for k, v in aws_env.items() if k in SECRET_ENV}
    assert len(secrets) == 4
    secret = secrets["AWS_SECRET_ACCESS_KEY"]
    try:
        with caplog.at_level(logging.DEBUG):
            ref = s3store.publish(make_folder(tmp_path / "src", seed=10), "diff")
            s3store.fetch(ref, tmp_path / "out")
            Registry(mlflow_server.uri).register(
                "diff", f"cr-{uuid.uuid4().hex[:6]}", "v", ref, base_version="b1"
            )
            settings = Settings(
                home=tmp_path / "home", tracking_uri=mlflow_server.uri, experiment="t-secrets"
            )
            with tracked_run(
                "r", params={"aws_secret": secret, "note": f"key {secret}"}, settings=settings, enabled=True
            ) as run:
                pass
            logging.getLogger("botocore.test").debug("leak attempt %s", secret)
            try:
                raise RuntimeError(f"token={secrets['AWS_SESSION_TOKEN']}")
            except RuntimeError:
                logging.getLogger("mlflow.test").exception("failed")
    finally:
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)
    out, err = capfd.readouterr()
    formatted = "\n".join(logging.Formatter("%(message)s").format(r) for r in caplog.records)
    assert "Sending http request" in caplog.text  # botocore really logged its requests (with headers)
    params = MlflowClient(mlflow_server.uri).get_run(run.info.run_id).data.params
    for value in secrets.values():
        for where, text in (
            ("log", caplog.text),
            ("records", formatted),
            ("stdout", out),
            ("stderr", err),
            ("params", json.dumps(params)),
        ):
            assert value not in text, f"{value[:10]}… leaked into {where}"
    assert params == {"aws_secret": "***", "note": "key ***"}
    logs = "\n".join([caplog.text, formatted, out, err, json.dumps(params)])
    e7.ok(check_invariants(logs=logs, secrets=tuple(secrets.values())))


def test_cli_publish_fetch_lineage_ls(mlflow_server, moto_s3, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from recycler.cli.registry import register
    from recycler.settings import get_settings

    monkeypatch.setenv("RECYCLER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECYCLER_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("RECYCLER_ARTIFACT_STORE", f"s3://{moto_s3.bucket}/cli-{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("RECYCLER_S3_ENDPOINT_URL", moto_s3.endpoint)
    get_settings.cache_clear()
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(os.urandom(1000))
    try:
        r = runner.invoke(app, ["publish", str(folder), "--kind", "model", "--quiet", "--json"])
        assert r.exit_code == 0, r.output
        uri = json.loads(r.stdout[r.stdout.index("{") :])["uri"]
        r = runner.invoke(app, ["fetch", uri, "-o", str(tmp_path / "got"), "--quiet"])
        assert r.exit_code == 0, r.output
        assert (tmp_path / "got" / "model.safetensors").read_bytes() == (
            folder / "model.safetensors"
        ).read_bytes()
        store, ref = resolve_uri(uri, get_settings())
        fam = f"cli-{uuid.uuid4().hex[:6]}"
        reg = Registry(mlflow_server.uri)
        reg.register("base", fam, None, store.publish(folder, "base"), base_version="v1")
        ft = reg.register("ft", fam, "x", ref, base_version="v1")
        reg.set_alias("ft", fam, "x", "champion", ft.version)
        mmd = tmp_path / "l.mmd"
        r = runner.invoke(app, ["lineage", f"{fam}-x-ft@champion", "--mermaid", str(mmd), "--log"])
        assert r.exit_code == 0, r.output
        assert f"{fam}-base v1" in r.stdout and "flowchart LR" in mmd.read_text()
        r = runner.invoke(app, ["lineage", f"{fam}-x-ft", "--json"])
        assert json.loads(r.stdout)["parents"][0]["name"] == f"{fam}-base"
        r = runner.invoke(app, ["registry", "ls", "--family", fam])
        assert (
            r.exit_code == 0 and f"{fam}-x-ft" in r.stdout and "champion" in r.stdout and "1 (v1)" in r.stdout
        )
        r = runner.invoke(app, ["registry", "ls", "--family", fam, "--json"])
        ft = next(m for m in json.loads(r.stdout) if m["name"] == f"{fam}-x-ft")
        assert ft["aliases"] == {"champion": "1"} and ft["releases"] == ["v1"]
    finally:
        get_settings.cache_clear()


def test_processes_starting_on_a_fresh_sqlite_home_do_not_race_on_the_schema(tmp_path):
    """MLflow migrates an empty SQLite store without a lock; unguarded, two of three processes die with
    "table already exists" (reproduced here 4 times out of 4 before the init lock)."""
    import subprocess
    import sys

    d = case("D6 processes create the SQLite registry at once", "concurrency")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=60"
    code = (
        "import sys; from recycler.registry.client import Registry; r = Registry(sys.argv[1]); "
        "print(len(r.client.search_registered_models()))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert Registry(uri).models() == []
    d.ok()
