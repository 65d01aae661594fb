"""`recycler doctor` against real parts: a SQLite MLflow registry and a local store in a temporary
RECYCLER_HOME, moto's S3 server over HTTP, a port nobody listens on, and the typer CLI."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import typer
from servers import free_port
from typer.testing import CliRunner

from recycler.cli.doctor import register
from recycler.doctor import CheckResult, failed
from recycler.doctor import run_doctor as _run_doctor
from recycler.doctor.packages import audit_report, check_kernels, check_pins, check_vulnerabilities
from recycler.doctor.registry import check_locks
from recycler.doctor.storage import (
    LIFECYCLE_RULE_ID,
    check_lifecycle,
    check_multipart_uploads,
    check_partial_publishes,
    check_temporaries,
    open_doctor_store,
)
from recycler.io.atomic import TMP_MARK
from recycler.io.manifest import write_manifest
from recycler.registry.client import Registry
from recycler.registry.names import LOCK_PREFIX
from recycler.settings import Settings, get_settings
from recycler.store.local import LocalStore
from recycler.store.s3 import S3Store

GOOD = {
    "torch": "2.13.0+cpu",
    "transformers": "5.23.0",
    "mlflow": "3.17.2",
    "safetensors": "0.8.0",
    "prefect": "3.8.8",
    "boto3": "1.44.5",
    "fastapi": "0.150.0",
    "sqlalchemy": "2.0.58",
}


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    names = [r.name for r in results]
    assert len(names) == len(set(names)), names
    return {r.name: r for r in results}


def make_folder(path: Path, seed: int) -> Path:
    """A small model folder with a manifest (the bytes are random so every test has its own digest)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    (path / "model.safetensors").write_bytes(os.urandom(2000))
    write_manifest(path, {"kind": "model"}, {})
    return path


@pytest.fixture
def local(tmp_path, monkeypatch) -> tuple[Settings, LocalStore, Registry]:
    """The embedded mode: SQLite MLflow and a local store under a fresh RECYCLER_HOME."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    settings = Settings(home=tmp_path / "home", tracking_uri="", registry_uri="", artifact_store="")
    return settings, LocalStore(Path(settings.artifact_store)), Registry(settings.tracking_uri)


@pytest.fixture
def s3_settings(moto_s3, tmp_path, monkeypatch) -> Settings:
    """An S3 store in a bucket of its own (lifecycle rules are per bucket; the session bucket is shared)."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    bucket = f"doctor-{uuid.uuid4().hex[:12]}"
    moto_s3.client().create_bucket(Bucket=bucket)
    return Settings(
        home=tmp_path / "home",
        tracking_uri="",
        registry_uri="",
        artifact_store=f"s3://{bucket}/pre/fix",
        s3_endpoint_url=moto_s3.endpoint,
        s3_region="us-east-1",
    )


# ---------------------------------------------------------------------------------------------- pure


def run_doctor(settings, **kw):
    """The doctor without its pip-audit run (≈17 s against PyPI here; tested once on its own below)."""
    return _run_doctor(settings, audit=False, **kw)


def test_prefect_pins():
    assert all(r.status == "ok" for r in check_pins(GOOD)), check_pins(GOOD)
    bad = by_name(check_pins({**GOOD, "fastapi": "0.151.0", "sqlalchemy": "2.1.0"}))
    assert bad["pin fastapi"].status == "fail" and "<0.151" in bad["pin fastapi"].detail
    assert bad["pin sqlalchemy"].status == "fail" and "<2.1" in bad["pin sqlalchemy"].detail
    # the pins belong to Prefect 3.8/3.9; without Prefect they do not apply, without FastAPI it cannot run
    assert check_pins({**GOOD, "prefect": None, "fastapi": "0.200.0"}) == []
    assert check_pins({**GOOD, "prefect": "3.10.0", "fastapi": "0.200.0"}) == []
    assert by_name(check_pins({**GOOD, "fastapi": None}))["pin fastapi"].status == "fail"


def test_kernels_check_says_which_kernels_compute(local):
    assert check_kernels(True).status == "ok"
    slow = check_kernels(False)
    assert slow.status == "warn" and "numpy" in slow.detail and "C compiler" in slow.detail
    assert by_name(run_doctor(local[0]))["Δ kernels"].status == "ok"  # `make setup` built them here


def test_pip_audit_report_is_read_without_claiming_unaudited_packages_are_clean():
    """pip-audit's JSON (`--format json`): a known vulnerability fails, an unaudited package warns."""
    vuln = {
        "id": "GHSA-xxxx-yyyy-zzzz",
        "fix_versions": ["3.8.0"],
        "aliases": ["CVE-2026-2033"],
        "description": "…",
    }
    found = audit_report(
        {
            "dependencies": [
                {"name": "mlflow", "version": "3.7.2", "vulns": [vuln]},
                {"name": "torch", "version": "2.13.0", "vulns": []},
            ]
        }
    )
    assert found.status == "fail" and "mlflow 3.7.2: GHSA-xxxx-yyyy-zzzz (fixed in 3.8.0)" in found.detail
    partial = audit_report(
        {
            "dependencies": [
                {"name": "torch", "version": "2.13.0", "vulns": []},
                {"name": "accelerate", "skip_reason": "Dependency not found on PyPI"},
            ]
        }
    )
    assert partial.status == "warn" and "checked 1 of 2" in partial.detail and partial.items == ["accelerate"]
    clean = audit_report({"dependencies": [{"name": "torch", "version": "2.13.0", "vulns": []}]})
    assert clean.status == "ok" and "none known in 1" in clean.detail


@pytest.mark.integration
def test_pip_audit_runs_on_this_environment():
    """The real pip-audit against PyPI: here its per-version API is unreachable (so: warn, with the count),
    elsewhere it audits; either way the finding says what was checked and nothing crashes."""
    result = check_vulnerabilities()
    assert result.name == "vulnerabilities" and result.status in ("ok", "warn", "fail"), result
    assert "pip-audit" in result.detail or result.status == "fail"


# ---------------------------------------------------------------------------------------------- local


def test_healthy_local_setup_reports_no_failure(local, tmp_path):
    settings, store, reg = local
    ref = store.publish(make_folder(tmp_path / "a", seed=1), "model")
    reg.register("base", "fam", None, ref, base_version="v1")
    results = by_name(run_doctor(settings))
    assert not failed(results.values()), [r for r in results.values() if r.status == "fail"]
    for name in ("mlflow tracking", "artifact store", "registration leases", "unregistered artifacts"):
        assert results[name].status == "ok", results[name]
    assert results["artifacts"].status == "ok" and "1 artifact" in results["artifacts"].detail
    assert results["registered versions"].detail.startswith("1 version")
    assert results["temporary files"].status == "ok" and results["partial publishes"].status == "ok"
    assert "prefect api" not in results  # PREFECT_API_URL unset: not checked
    # an artifact nobody registered is a warning, and --fix leaves it alone
    extra = store.publish(make_folder(tmp_path / "b", seed=2), "model")
    results = by_name(run_doctor(settings, fix=True))
    unregistered = results["unregistered artifacts"]
    assert unregistered.status == "warn" and unregistered.items == [extra.uri]
    assert not unregistered.fixable and not unregistered.fixed
    assert store.exists(extra) and not failed(results.values())


def test_corrupted_or_missing_artifact_is_a_failure_and_never_deleted(local, tmp_path):
    settings, store, reg = local
    ref = store.publish(make_folder(tmp_path / "a", seed=1), "model")
    gone = store.publish(make_folder(tmp_path / "b", seed=2), "model")
    reg.register("base", "fam", None, ref, base_version="v1")
    reg.register("base", "fam", None, gone, base_version="v2")
    shard = Path(ref.uri) / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes: only re-hashing sees it
    shard.write_bytes(bytes(data))
    shutil.rmtree(gone.uri)
    results = by_name(run_doctor(settings, fix=True))
    artifacts, versions = results["artifacts"], results["registered versions"]
    assert (
        artifacts.status == "fail"
        and "model.safetensors" in artifacts.detail
        and "sha256" in artifacts.detail
    )
    assert versions.status == "fail" and len(versions.items) == 2
    assert any("fam-base/1:" in i and "incomplete" in i for i in versions.items)
    assert any("fam-base/2:" in i and "missing" in i for i in versions.items)
    assert shard.read_bytes() == bytes(data)  # reported, not repaired or removed
    assert failed(results.values())


def test_expired_lease_is_reported_and_deleted_by_fix(local):
    from mlflow import MlflowClient

    settings, _, reg = local
    client = MlflowClient(settings.tracking_uri, settings.registry_uri)
    stale, live = f"{LOCK_PREFIX}{'d' * 32}", f"{LOCK_PREFIX}{'e' * 32}"
    for name, expires in ((stale, time.time() - 3600), (live, time.time() + 3600)):
        tags = {
            "recycler.lock": f"register:{name[-4:]}",
            "owner": uuid.uuid4().hex,
            "expires_at": f"{expires:.3f}",
        }
        client.create_registered_model(name, tags=tags)
    found = check_locks(reg)
    assert found.status == "warn" and found.fixable and not found.fixed
    assert stale in found.detail and live not in found.detail
    leases = by_name(run_doctor(settings, fix=True))["registration leases"]
    assert leases.status == "ok" and leases.fixed and "deleted 1" in leases.detail
    names = {m.name for m in client.search_registered_models()}
    assert stale not in names and live in names  # a live lease is never touched
    assert check_locks(reg).status == "ok"


def test_leftover_temporaries_are_reported_and_stale_ones_removed(tmp_path):
    """A temporary whose writer holds its lock is in progress; one without a live writer is stale at
    once; other temporary names (a manifest being written) only once older than the threshold."""
    from filelock import FileLock

    store = LocalStore(tmp_path / "store")
    work = tmp_path / "home" / "work" / "fam" / "inst" / "v1"
    dead = work / f".merged{TMP_MARK}0123456789ab"  # a killed apply: no writer holds its lock
    live = store.root / "diff" / f".{'b' * 64}{TMP_MARK}abcdef012345"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    old_file = store.root / "model" / f".manifest.json{TMP_MARK}123"
    young_file = store.root / "diff" / f".manifest.json{TMP_MARK}456"
    old_file.parent.mkdir(parents=True)
    old_file.write_text("{}")
    young_file.write_text("{}")
    os.utime(old_file, (time.time() - 7200, time.time() - 7200))
    roots = [tmp_path / "home" / "work", store.root]
    with FileLock(live.parent / f"{live.name}.lock"):  # the live writer
        found = check_temporaries(roots, timedelta(hours=1))
        assert found.status == "warn" and found.fixable and len(found.items) == 2, found
        fixed = check_temporaries(roots, timedelta(hours=1), fix=True)
        assert fixed.fixed and "removed 2" in fixed.detail and "2 in progress left alone" in fixed.detail
        assert not dead.exists() and not old_file.exists() and live.exists() and young_file.exists()
    assert check_temporaries(roots, timedelta(hours=1)).items == [
        f"{live} ({0:.1f} h old)"
    ]  # its writer is gone now
    (store.root / "model" / ("c" * 64)).mkdir()  # files of a publish that died before its manifest
    partial = check_partial_publishes(store)
    assert partial.status == "warn" and partial.items == [str(store.root / "model" / ("c" * 64))]


# ---------------------------------------------------------------------------------------------- S3


def test_missing_lifecycle_rule_is_added_by_fix_keeping_other_rules(s3_settings):
    store = open_doctor_store(s3_settings, timeout=3)
    assert isinstance(store, S3Store)
    assert check_lifecycle(store).status == "warn"  # no lifecycle configuration at all
    others = [
        {"ID": "logs", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 30}},
        {  # aborts uploads, but not under the store's prefix
            "ID": "other",
            "Filter": {"Prefix": "other/"},
            "Status": "Enabled",
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 3},
        },
    ]
    store.client.put_bucket_lifecycle_configuration(
        Bucket=store.bucket, LifecycleConfiguration={"Rules": others}
    )
    missing = check_lifecycle(store)
    assert missing.status == "warn" and missing.fixable and "pre/fix/" in missing.detail
    fixed = check_lifecycle(store, fix=True)
    assert fixed.status == "ok" and fixed.fixed
    rules = {
        r["ID"]: r for r in store.client.get_bucket_lifecycle_configuration(Bucket=store.bucket)["Rules"]
    }
    assert set(rules) == {"logs", "other", LIFECYCLE_RULE_ID}
    assert rules["logs"]["Expiration"] == {"Days": 30}
    assert rules[LIFECYCLE_RULE_ID]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert rules[LIFECYCLE_RULE_ID]["Filter"] == {"Prefix": "pre/fix/"}
    again = check_lifecycle(store)
    assert again.status == "ok" and not again.fixed and LIFECYCLE_RULE_ID in again.detail


def test_orphaned_multipart_upload_is_reported_and_aborted_by_fix(s3_settings):
    store = open_doctor_store(s3_settings, timeout=3)
    assert isinstance(store, S3Store)
    c, bucket = store.client, store.bucket
    key = f"{store.prefix}/model/{'f' * 64}/model.safetensors"
    up = c.create_multipart_upload(Bucket=bucket, Key=key)
    c.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 100)
    outside = c.create_multipart_upload(Bucket=bucket, Key="elsewhere/big")  # not under the store prefix
    found = check_multipart_uploads(store, timedelta(0))
    assert found.status == "warn" and found.fixable and len(found.items) == 1 and key in found.items[0]
    results = by_name(run_doctor(s3_settings, fix=True, upload_age=timedelta(0)))
    aborted = results["s3 multipart uploads"]
    assert aborted.status == "ok" and aborted.fixed and "aborted 1" in aborted.detail
    assert results["artifact store"].status == "ok" and results["s3 lifecycle"].fixed
    left = [u["Key"] for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert left == ["elsewhere/big"]
    c.abort_multipart_upload(Bucket=bucket, Key="elsewhere/big", UploadId=outside["UploadId"])
    assert not failed(results.values()), [r for r in results.values() if r.status == "fail"]


def test_missing_bucket_fails_and_skips_the_store_checks(s3_settings):
    settings = s3_settings.model_copy(
        update={"artifact_store": f"s3://doctor-absent-{uuid.uuid4().hex[:8]}/p"}
    )
    results = by_name(run_doctor(settings))
    assert results["artifact store"].status == "fail" and "does not exist" in results["artifact store"].detail
    assert "s3 lifecycle" not in results and "artifacts" not in results


# ---------------------------------------------------------------------------------------------- servers


def test_unreachable_servers_fail_fast_without_leaking_credentials(tmp_path, monkeypatch):
    password = "rcyTEST-doctor-password-5151"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    port = free_port()  # nothing listens here
    settings = Settings(
        home=tmp_path / "home",
        tracking_uri=f"http://alice:{password}@127.0.0.1:{port}",
        registry_uri="",
        artifact_store="",
    )
    start = time.monotonic()
    results = by_name(run_doctor(settings, timeout=2))
    assert time.monotonic() - start < 10
    tracking = results["mlflow tracking"]
    assert tracking.status == "fail" and "unreachable" in tracking.detail
    assert f"http://127.0.0.1:{port}/health" in tracking.detail
    assert results["prefect api"].status == "fail" and "/api/health" in results["prefect api"].detail
    assert "registration leases" not in results  # needs the registry
    assert results["registered versions"].detail == "registry not reachable; not checked"
    dumped = json.dumps([r.model_dump() for r in results.values()])
    assert password not in dumped and "alice" not in dumped


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_json_table_and_exit_code(local, tmp_path, monkeypatch):
    settings, store, reg = local
    ref = store.publish(make_folder(tmp_path / "a", seed=1), "model")
    reg.register("base", "fam", None, ref, base_version="v1")
    monkeypatch.setenv("RECYCLER_HOME", str(settings.home))
    for var in ("RECYCLER_TRACKING_URI", "RECYCLER_REGISTRY_URI", "RECYCLER_ARTIFACT_STORE"):
        monkeypatch.delenv(var, raising=False)
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A group, as in the real CLI (a one-command typer app has no sub-command names)."""

    register(app)
    runner = CliRunner()
    get_settings.cache_clear()
    try:
        r = runner.invoke(app, ["doctor", "--json", "--no-audit"])
        assert r.exit_code == 0, r.output
        body = json.loads(r.stdout)
        assert body["ok"] is True
        assert {"name", "status", "detail", "fixable", "fixed"} <= set(body["results"][0])
        assert {x["name"]: x["status"] for x in body["results"]}["artifacts"] == "ok"
        r = runner.invoke(app, ["doctor", "--no-audit"])
        assert r.exit_code == 0 and "recycler doctor" in r.stdout and "artifacts" in r.stdout

        shard = Path(ref.uri) / "model.safetensors"
        shard.write_bytes(b"\0" * shard.stat().st_size)
        r = runner.invoke(app, ["doctor", "--json", "--no-audit"])
        assert r.exit_code == 1, r.output
        body = json.loads(r.stdout)
        statuses = {x["name"]: x["status"] for x in body["results"]}
        assert (
            body["ok"] is False
            and statuses["artifacts"] == "fail"
            and statuses["registered versions"] == "fail"
        )
        r = runner.invoke(app, ["doctor", "--no-audit"])
        assert r.exit_code == 1 and "fail" in r.stdout
    finally:
        get_settings.cache_clear()


def test_server_deployment_on_s3_is_healthy(mlflow_server, s3_settings, tmp_path):
    """The production shape: an MLflow server (HTTP) and an S3 store. Read-only (no --fix): the MLflow
    server is shared by the session."""
    from recycler.store import open_store

    uri = mlflow_server.uri
    settings = s3_settings.model_copy(update={"tracking_uri": uri, "registry_uri": uri})
    store = open_store(settings)
    ref = store.publish(make_folder(tmp_path / "a", seed=1), "model")
    Registry(uri).register("base", f"doctor-{uuid.uuid4().hex[:8]}", None, ref, base_version="v1")
    assert isinstance(store, S3Store)
    partial = store.ref("diff", "9" * 64)  # a publish that died before its manifest
    store.client.put_object(
        Bucket=store.bucket, Key=f"{store.prefix}/diff/{'9' * 64}/model.safetensors", Body=b"x"
    )
    results = by_name(run_doctor(settings))
    assert not failed(results.values()), [r for r in results.values() if r.status == "fail"]
    assert results["mlflow tracking"].status == "ok" and "HTTP 200" in results["mlflow tracking"].detail
    assert results["artifact store"].status == "ok" and results["s3 lifecycle"].status == "warn"
    assert results["artifacts"].detail.startswith("1 artifact")
    assert results["registered versions"].status == "ok" and results["registered versions"].detail.startswith(
        "1 "
    )
    assert results["unregistered artifacts"].status == "ok"
    assert results["partial publishes"].status == "warn" and results["partial publishes"].items == [
        partial.uri
    ]
