"""`recycler doctor`: check a deployment and repair what is safe to repair.

Why it exists: publishing and registration are crash-safe by construction (recycler.store,
recycler.registry), but a crash still leaves debris that nothing else cleans up (temporary folders,
multipart uploads, expired leases), and a deployment depends on things no single command sees:
package versions, reachable servers, a bucket lifecycle rule, artifacts rotting at rest.

Every check is a plain function returning `CheckResult`s; `run_doctor` runs them all and turns an
exception inside one check into a failed result, so one broken dependency never hides the others.
Repairs (`fix=True`) are limited to what cannot lose data: adding a lifecycle rule, aborting uploads
older than a threshold, deleting expired leases, removing old temporary folders. Artifacts that do
not verify, or that no registry version references, are only reported: deleting them is a decision.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, field_validator

from recycler.atomic import TMP_MARK
from recycler.checkpoint import MANIFEST_NAME
from recycler.errors import VerificationFailed
from recycler.registry import LOCK_PREFIX
from recycler.store import (
    _HEX64,
    KINDS,
    ArtifactNotFound,
    ArtifactRef,
    ArtifactStore,
    LocalStore,
    S3Store,
    _split_s3,
    open_store,
)
from recycler.tracking import redact

if TYPE_CHECKING:
    from recycler.registry import Registry
    from recycler.settings import Settings

Status = Literal["ok", "warn", "fail"]
LIFECYCLE_RULE_ID = "recycler-abort-incomplete-multipart"
_SHOWN = 5  # problems spelled out in `detail`; all of them are in `items`
_REGISTRY_CHECKS = ("unregistered artifacts", "registered versions")


class CheckResult(BaseModel):
    """One finding. `fixable`: `--fix` would repair it; `fixed`: this run repaired it (status is then
    the state after the repair). `detail` and `items` are scrubbed of credentials on construction."""

    name: str
    status: Status
    detail: str = ""
    fixable: bool = False
    fixed: bool = False
    items: list[str] = []

    @field_validator("detail")
    @classmethod
    def _scrub(cls, v: str) -> str:
        return redact(v)

    @field_validator("items")
    @classmethod
    def _scrub_items(cls, v: list[str]) -> list[str]:
        return [redact(i) for i in v]


def _listing(items: list[str]) -> str:
    more = f" … and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return "; ".join(items[:_SHOWN]) + more


def _hours(td: timedelta) -> str:
    return f"{td.total_seconds() / 3600:g} h"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------- packages


@dataclass(frozen=True)
class Advisory:
    package: str
    affected: str  # PEP 440 specifier set of the affected versions
    ids: str
    summary: str


# Known-vulnerable ranges as of 2026; extend the table as advisories appear. Only ranges confirmed by
# the advisory records cited in `ids` (CVE records, GitHub advisories, PyPA advisory database) are
# listed. No entry for safetensors, prefect or boto3: we know of no advisory against the library
# itself that we could state a range for with confidence.
VULNERABLE: tuple[Advisory, ...] = (
    Advisory(
        "torch", "<2.6.0", "CVE-2025-32434 (GHSA-53q9-r3pm-6pq6)",
        "torch.load(weights_only=True) can still execute code from a crafted file",
    ),
    Advisory(
        "transformers", "<4.48.0", "CVE-2024-11392 (PYSEC-2024-227), CVE-2024-11394",
        "unsafe deserialization (RCE) when loading crafted model/config files",
    ),
    Advisory(
        "mlflow", "<2.12.1", "CVE-2023-6831, CVE-2024-1483, CVE-2024-2928, GHSA-j62r-wxqq-f3gf",
        "path traversal / arbitrary file read on the tracking server",
    ),
    Advisory(
        "mlflow", "<3.8.0", "CVE-2026-2033 (GHSA-q2r8-vmq7-fpx2, PYSEC-2026-2658)",
        "artifact handler directory traversal leading to RCE on the tracking server",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Pin:
    package: str
    required: str  # PEP 440 specifier set
    why: str


# pyproject.toml: Prefect 3.8 needs these to run at all. Applied when prefect is in PREFECT_RANGE.
PREFECT_RANGE = ">=3.8,<3.10"
PINS: tuple[Pin, ...] = (
    Pin("fastapi", "<0.151", "Prefect 3.8's API server does not start with newer FastAPI"),
    Pin("sqlalchemy", ">=2.0,<2.1", "with SQLAlchemy 2.1 Prefect's scheduler never fires schedules"),
)
PACKAGES = ("torch", "transformers", "mlflow", "safetensors", "prefect", "boto3")


def installed_versions(
    names: Iterable[str] = (*PACKAGES, *(p.package for p in PINS)),
) -> dict[str, str | None]:
    """name → installed distribution version, or None when it is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _in(version: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(version, prereleases=True)


def check_versions(installed: Mapping[str, str | None]) -> list[CheckResult]:
    """Versions against VULNERABLE (fail) and, when Prefect is installed, against PINS (fail).
    Pure: pass `installed_versions()` or fake version strings."""
    from packaging.version import InvalidVersion, Version

    results = []
    for pkg in PACKAGES:
        v = installed.get(pkg)
        name = f"package {pkg}"
        if v is None:
            results.append(CheckResult(name=name, status="warn", detail="not installed"))
            continue
        try:
            Version(v)
        except InvalidVersion:
            results.append(CheckResult(name=name, status="warn", detail=f"{v}: not a PEP 440 version"))
            continue
        hits = [a for a in VULNERABLE if a.package == pkg and _in(v, a.affected)]
        if hits:
            found = [f"{a.affected}: {a.ids} ({a.summary})" for a in hits]
            detail = f"{v} is in a known-vulnerable range: {_listing(found)}; upgrade"
            results.append(CheckResult(name=name, status="fail", detail=detail, items=found))
        else:
            results.append(CheckResult(name=name, status="ok", detail=v))
    prefect = installed.get("prefect")
    if prefect is None or not _in(prefect, PREFECT_RANGE):
        return results
    for pin in PINS:
        v, name = installed.get(pin.package), f"pin {pin.package}"
        if v is None or not _in(v, pin.required):
            detail = (
                f"{v or 'not installed'}; prefect {prefect} needs {pin.package}{pin.required} ({pin.why})"
            )
            results.append(CheckResult(name=name, status="fail", detail=detail))
        else:
            results.append(CheckResult(name=name, status="ok", detail=f"{v} ({pin.required})"))
    return results


# ---------------------------------------------------------------------------------------------- servers


def safe_url(url: str) -> str:
    """`url` without user info or query (where credentials and tokens hide), then redacted."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return redact(urlunsplit((parts.scheme, host, parts.path, "", "")))


def check_http(name: str, url: str, timeout: float) -> CheckResult:
    """GET {url}/health within `timeout` seconds (MLflow and Prefect both serve it)."""
    target = safe_url(f"{url.rstrip('/')}/health")
    try:
        with urllib.request.urlopen(target, timeout=timeout) as r:
            return CheckResult(name=name, status="ok", detail=f"{target}: HTTP {r.status}")
    except urllib.error.HTTPError as e:
        return CheckResult(name=name, status="fail", detail=f"{target}: HTTP {e.code}")
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return CheckResult(name=name, status="fail", detail=f"{target} unreachable ({reason})")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///…` URI (query stripped), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].partition("?")[0])


def check_tracking(name: str, uri: str, timeout: float) -> CheckResult:
    """HTTP(S): the server's /health. SQLite: the file exists, or its folder can be created/written."""
    if uri.startswith(("http://", "https://")):
        return check_http(name, uri, timeout)
    path = sqlite_path(uri)
    if path is None:
        scheme = uri.partition(":")[0] or "?"
        return CheckResult(name=name, status="warn", detail=f"{scheme}: reachability not checked by doctor")
    if path.is_file():
        return CheckResult(name=name, status="ok", detail=f"SQLite {path} ({path.stat().st_size} bytes)")
    if path.exists():
        return CheckResult(name=name, status="fail", detail=f"SQLite {path} exists but is not a file")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return CheckResult(
            name=name, status="ok", detail=f"SQLite {path} not created yet (created on first use)"
        )
    return CheckResult(
        name=name, status="fail", detail=f"SQLite {path} cannot be created ({parent} not writable)"
    )


# ---------------------------------------------------------------------------------------------- store


def open_doctor_store(settings: Settings, timeout: float) -> ArtifactStore:
    """The settings' store; an S3 one gets short connect timeouts and few retries (the store's own
    client retries for minutes, right for transfers, wrong for a health check)."""
    if not settings.artifact_store.startswith("s3://"):
        return open_store(settings)
    import boto3
    from botocore.config import Config

    bucket, prefix = _split_s3(settings.artifact_store)
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=Config(
            connect_timeout=timeout,
            read_timeout=max(timeout, 30),
            retries={"mode": "standard", "max_attempts": 2},
        ),
    )
    return S3Store(bucket, prefix, client=client, max_concurrency=settings.s3_max_concurrency)


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__))


def _key_prefix(store: S3Store) -> str:
    return f"{store.prefix}/" if store.prefix else ""


def check_local_root(store: LocalStore) -> CheckResult:
    root = store.root
    if not root.exists():
        return CheckResult(name="artifact store", status="ok", detail=f"{root} (created on first publish)")
    if not root.is_dir() or not os.access(root, os.W_OK | os.X_OK):
        return CheckResult(name="artifact store", status="fail", detail=f"{root} is not a writable folder")
    return CheckResult(name="artifact store", status="ok", detail=str(root))


def check_bucket(store: S3Store) -> CheckResult:
    """head_bucket: the endpoint answers, the bucket exists and our credentials may use it."""
    where = f"s3://{store.bucket}/{store.prefix}"
    try:
        store.client.head_bucket(Bucket=store.bucket)
    except Exception as e:
        code = _code(e)
        why = {
            "404": "bucket does not exist",
            "NoSuchBucket": "bucket does not exist",
            "403": "access denied",
        }
        return CheckResult(
            name="artifact store", status="fail", detail=f"{where}: {why.get(code, _first_line(e))}"
        )
    return CheckResult(name="artifact store", status="ok", detail=f"{where} reachable")


def _aborts_uploads_under(rule: dict, key_prefix: str) -> bool:
    """An enabled AbortIncompleteMultipartUpload rule whose prefix filter covers `key_prefix`. Rules
    that also filter on tags or object size are not counted: they may not cover every upload."""
    if rule.get("Status") != "Enabled" or "AbortIncompleteMultipartUpload" not in rule:
        return False
    f = rule.get("Filter", {})
    if (
        "Tag" in f
        or "Tags" in f.get("And", {})
        or any(k.startswith("ObjectSize") for k in (*f, *f.get("And", {})))
    ):
        return False
    rule_prefix = f.get("Prefix", f.get("And", {}).get("Prefix", rule.get("Prefix", "")))
    return key_prefix.startswith(rule_prefix)


def check_lifecycle(store: S3Store, *, fix: bool = False) -> CheckResult:
    """The production backstop for crashed uploads: S3 bills incomplete multipart uploads until they
    are aborted. `fix` adds a rule (DaysAfterInitiation 1) and keeps every existing rule."""
    name, key_prefix = "s3 lifecycle", _key_prefix(store)
    try:
        got = store.client.get_bucket_lifecycle_configuration(Bucket=store.bucket)
    except Exception as e:
        if _code(e) != "NoSuchLifecycleConfiguration":
            return CheckResult(
                name=name, status="warn", detail=f"cannot read the lifecycle rules ({_first_line(e)})"
            )
        got = {"Rules": []}
    rules = got.get("Rules", [])
    if covering := [r for r in rules if _aborts_uploads_under(r, key_prefix)]:
        days = covering[0]["AbortIncompleteMultipartUpload"].get("DaysAfterInitiation")
        detail = f"rule {covering[0].get('ID', '?')!r} aborts incomplete uploads after {days} day(s)"
        return CheckResult(name=name, status="ok", detail=detail)
    missing = (
        f"no enabled rule of s3://{store.bucket} aborts incomplete multipart uploads under '{key_prefix}'"
    )
    if not fix:
        detail = f"{missing}; crashed uploads are billed until aborted (--fix adds one)"
        return CheckResult(name=name, status="warn", detail=detail, fixable=True)
    rule = {
        "ID": LIFECYCLE_RULE_ID,
        "Filter": {"Prefix": key_prefix},
        "Status": "Enabled",
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
    }
    config = {"Rules": [r for r in rules if r.get("ID") != LIFECYCLE_RULE_ID] + [rule]}
    extra = {k: got[k] for k in ("TransitionDefaultMinimumObjectSize",) if k in got}
    store.client.put_bucket_lifecycle_configuration(
        Bucket=store.bucket, LifecycleConfiguration=config, **extra
    )
    detail = f"added rule {LIFECYCLE_RULE_ID!r} (abort after 1 day; {len(rules)} existing rule(s) kept)"
    return CheckResult(name=name, status="ok", detail=detail, fixable=True, fixed=True)


def check_multipart_uploads(store: S3Store, older_than: timedelta, *, fix: bool = False) -> CheckResult:
    """Multipart uploads under the store prefix started before now − `older_than`: left by crashed
    publishers (invisible, but billed). `fix` aborts them with the store's own abort_stale_uploads."""
    name, cutoff = "s3 multipart uploads", datetime.now(UTC) - older_than
    pages = store.client.get_paginator("list_multipart_uploads").paginate(
        Bucket=store.bucket, Prefix=_key_prefix(store)
    )
    stale = [u for page in pages for u in page.get("Uploads", []) if u["Initiated"] <= cutoff]
    age = _hours(older_than)
    if not stale:
        return CheckResult(
            name=name, status="ok", detail=f"none under '{_key_prefix(store)}' older than {age}"
        )
    items = [f"{u['Key']} (started {u['Initiated']:%Y-%m-%d %H:%M %Z})" for u in stale]
    if fix:
        n = store.abort_stale_uploads(older_than)
        return CheckResult(
            name=name,
            status="ok",
            detail=f"aborted {n} upload(s) older than {age}",
            fixable=True,
            fixed=True,
            items=items,
        )
    detail = (
        f"{len(stale)} upload(s) older than {age} (crashed publishers; --fix aborts them): {_listing(items)}"
    )
    return CheckResult(name=name, status="warn", detail=detail, fixable=True, items=items)


def check_temporaries(store: LocalStore, older_than: timedelta, *, fix: bool = False) -> CheckResult:
    """Temporary siblings (`.<digest>.tmp-…`, recycler.atomic) left in a local store by killed
    publishes. Only those older than `older_than` are removed: younger ones may be a publish in progress."""
    name = "temporary files"
    found = [p for kind in KINDS for p in (store.root / kind).glob(f".*{TMP_MARK}*")]
    if not found:
        return CheckResult(name=name, status="ok", detail=f"none in {store.root}")
    cutoff = time.time() - older_than.total_seconds()
    old = [p for p in found if p.lstat().st_mtime <= cutoff]
    items = [f"{p} ({(time.time() - p.lstat().st_mtime) / 3600:.1f} h old)" for p in found]
    if fix and old:
        removed = store.abort_stale_uploads(older_than)  # folders, the store's own cleanup
        for p in old:
            if p.is_file() or p.is_symlink():
                p.unlink(missing_ok=True)
                removed += 1
        left = [p for p in found if p.exists() or p.is_symlink()]
        status: Status = "warn" if left else "ok"
        detail = f"removed {removed} older than {_hours(older_than)}" + (
            f"; {len(left)} recent left (a publish in progress?)" if left else ""
        )
        return CheckResult(name=name, status=status, detail=detail, fixable=True, fixed=True, items=items)
    detail = f"{len(found)} leftover(s), {len(old)} older than {_hours(older_than)} (--fix removes those): {_listing(items)}"
    return CheckResult(name=name, status="warn", detail=detail, fixable=bool(old), items=items)


def check_partial_publishes(store: ArtifactStore) -> CheckResult:
    """Artifact addresses holding files but no manifest: a publish that died before its manifest
    (invisible to readers; re-running the same publish completes it) or one in progress. Reported only."""
    partial: list[str] = []
    for kind in KINDS:
        if isinstance(store, LocalStore):
            base = store.root / kind
            partial += [
                str(d) for d in (base.iterdir() if base.is_dir() else ())
                if _HEX64.match(d.name) and not (d / MANIFEST_NAME).is_file()
            ]  # fmt: skip
        elif isinstance(store, S3Store):
            has_manifest: dict[str, bool] = {}
            for rel in store._sizes(store._key(kind)):
                digest, _, file = rel.partition("/")
                if _HEX64.match(digest):
                    has_manifest[digest] = has_manifest.get(digest, False) or file == MANIFEST_NAME
            partial += [store.ref(kind, d).uri for d, ok in sorted(has_manifest.items()) if not ok]
    if not partial:
        return CheckResult(
            name="partial publishes", status="ok", detail="every artifact address has a manifest"
        )
    detail = f"{len(partial)} address(es) without a manifest (re-run the publish, or delete by hand): {_listing(partial)}"
    return CheckResult(name="partial publishes", status="warn", detail=detail, items=partial)


# ---------------------------------------------------------------------------------------------- registry


def _expires_at(tags: Mapping[str, str]) -> float:
    try:
        return float(tags.get("expires_at", "0") or 0)  # missing = expired, as in Registry._acquire
    except ValueError:
        return 0.0


def check_locks(registry: Registry, *, fix: bool = False) -> CheckResult:
    """Registration leases (`_recycler-lock-*` models) past `expires_at`: left by killed registrations.
    Harmless (the next registration takes them over) but clutter; `fix` deletes them after re-reading
    each one, so a lease renewed or re-taken in between is left alone."""
    from mlflow.exceptions import MlflowException

    client, token, leases = registry.client, None, []
    while True:
        page = registry._call(
            client.search_registered_models, f"name LIKE '{LOCK_PREFIX}%'", max_results=1000, page_token=token
        )
        leases += [(rm.name, dict(rm.tags)) for rm in page if rm.name.startswith(LOCK_PREFIX)]
        if not (token := page.token):
            break
    now = time.time()
    stale = [(n, t) for n, t in leases if _expires_at(t) < now]
    if not stale:
        return CheckResult(
            name="registration leases", status="ok", detail=f"{len(leases)} live, none expired"
        )
    items = [
        f"{n} ({t.get('recycler.lock', '?')}, expired {(now - _expires_at(t)) / 60:.0f} min ago)"
        for n, t in stale
    ]
    if not fix:
        detail = (
            f"{len(stale)} expired lease(s) of killed registrations (--fix deletes them): {_listing(items)}"
        )
        return CheckResult(
            name="registration leases", status="warn", detail=detail, fixable=True, items=items
        )
    deleted = 0
    for lease, tags in stale:
        try:
            held = registry._call(client.get_registered_model, lease)
            if held.tags.get("owner") == tags.get("owner") and _expires_at(held.tags) < time.time():
                registry._call(client.delete_registered_model, lease)
                deleted += 1
        except MlflowException as e:
            if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
    detail = f"deleted {deleted} expired lease(s)"
    return CheckResult(
        name="registration leases", status="ok", detail=detail, fixable=True, fixed=True, items=items
    )


def check_artifacts(
    store: ArtifactStore,
    registry: Registry | None,
    *,
    verify: bool = True,
    no_registry: str = "registry not reachable; not checked",
) -> list[CheckResult]:
    """Every published artifact against its manifest (`store.verify`, every byte re-hashed; with
    `verify=False` only the manifest is read and validated); artifacts no registry version references;
    registry versions whose artifact in this store is missing or does not verify."""
    published: dict[tuple[str, str], ArtifactRef] = {}
    bad: dict[tuple[str, str], str] = {}
    for kind in KINDS:
        for ref in store.list(kind):
            published[(kind, ref.digest)] = ref
            try:
                store.verify(ref) if verify else store.manifest(ref)
            except (VerificationFailed, ArtifactNotFound) as e:
                bad[(kind, ref.digest)] = str(e)
    how = "verified against their manifests" if verify else "have valid manifests (bytes not re-hashed)"
    if bad:
        items = list(bad.values())
        detail = (
            f"{len(bad)} of {len(published)} do not verify (never deleted automatically): {_listing(items)}"
        )
        results = [CheckResult(name="artifacts", status="fail", detail=detail, items=items)]
    else:
        results = [CheckResult(name="artifacts", status="ok", detail=f"{len(published)} artifact(s) {how}")]
    if registry is None:
        return [*results, *(CheckResult(name=n, status="warn", detail=no_registry) for n in _REGISTRY_CHECKS)]
    try:
        versions = registry._search("")
    except Exception as e:  # keep the verification results above
        detail = f"registry search failed: {_first_line(e)}"
        return [*results, *(CheckResult(name=n, status="fail", detail=detail) for n in _REGISTRY_CHECKS)]
    registered: set[tuple[str, str]] = set()
    problems: list[str] = []
    elsewhere = checked = 0
    for mv in versions:
        tags = dict(mv.tags)
        kind, digest = tags.get("artifact_kind", ""), tags.get("manifest_sha256")
        if not digest:
            continue  # not a recycler version
        registered.add((kind, digest))
        label = f"{mv.name}/v{mv.version}"
        try:
            ref = store.ref(kind, digest)
        except ValueError as e:
            problems.append(f"{label}: unusable artifact tags ({e})")
            continue
        if (tags.get("artifact_uri") or mv.source) != ref.uri:
            elsewhere += 1  # another store's artifact: not ours to judge
            continue
        checked += 1
        if (kind, digest) in bad:
            problems.append(f"{label}: artifact incomplete: {bad[(kind, digest)]}")
        elif (kind, digest) not in published:
            try:
                store.verify(ref)  # published since we listed? otherwise says what is missing
            except (VerificationFailed, ArtifactNotFound) as e:
                problems.append(f"{label}: artifact missing: {e}")
    unregistered = [ref.uri for key, ref in published.items() if key not in registered]
    if unregistered:
        detail = f"{len(unregistered)} artifact(s) no registry version references (not removed): {_listing(unregistered)}"
        results.append(
            CheckResult(name="unregistered artifacts", status="warn", detail=detail, items=unregistered)
        )
    else:
        results.append(
            CheckResult(name="unregistered artifacts", status="ok", detail="every artifact is registered")
        )
    note = f"; {elsewhere} point outside this store (not checked)" if elsewhere else ""
    if problems:
        detail = f"{len(problems)} version(s) point at a missing or incomplete artifact: {_listing(problems)}{note}"
        results.append(CheckResult(name="registered versions", status="fail", detail=detail, items=problems))
    else:
        detail = f"{checked} version(s) point at complete artifacts in this store{note}"
        results.append(CheckResult(name="registered versions", status="ok", detail=detail))
    return results


# ---------------------------------------------------------------------------------------------- all


def run_doctor(
    settings: Settings,
    *,
    fix: bool = False,
    upload_age: timedelta = timedelta(hours=24),
    temp_age: timedelta = timedelta(hours=1),
    verify: bool = True,
    timeout: float = 3.0,
    prefect_api_url: str | None = None,
) -> list[CheckResult]:
    """Every check for `settings`, in order. Registry checks run only when the registry answered (or
    its SQLite file exists: doctor never creates one), store checks only when the bucket answered.
    `prefect_api_url` defaults to $PREFECT_API_URL; without either, Prefect is not checked."""
    results: list[CheckResult] = []

    def run(name: str, check: Callable[[], CheckResult | list[CheckResult]]) -> list[CheckResult]:
        try:
            out = check()
        except Exception as e:
            out = CheckResult(name=name, status="fail", detail=f"check failed: {_first_line(e)}")
        found = out if isinstance(out, list) else [out]
        results.extend(found)
        return found

    run("packages", lambda: check_versions(installed_versions()))
    (tracking,) = run(
        "mlflow tracking", lambda: check_tracking("mlflow tracking", settings.tracking_uri, timeout)
    )
    registry_check = tracking
    if settings.registry_uri != settings.tracking_uri:
        (registry_check,) = run(
            "mlflow registry", lambda: check_tracking("mlflow registry", settings.registry_uri, timeout)
        )
    if prefect_url := prefect_api_url or os.environ.get("PREFECT_API_URL"):
        run("prefect api", lambda: check_http("prefect api", prefect_url, timeout))

    registry: Registry | None = None
    db = sqlite_path(settings.registry_uri)
    no_registry = "registry not reachable; not checked"
    if db is not None and not db.is_file():
        no_registry = "no registry yet (its SQLite file does not exist); not checked"
    elif registry_check.status != "fail":
        from recycler.registry import Registry

        try:
            registry = Registry(settings.tracking_uri, settings.registry_uri, attempts=2, backoff=0.5)
        except Exception as e:
            detail = f"cannot open the registry: {_first_line(e)}"
            results.append(CheckResult(name="mlflow registry", status="fail", detail=detail))

    store: ArtifactStore | None = None
    try:
        store = open_doctor_store(settings, timeout)
    except Exception as e:  # e.g. an invalid bucket name
        detail = f"cannot open {settings.artifact_store}: {_first_line(e)}"
        results.append(CheckResult(name="artifact store", status="fail", detail=detail))
    if isinstance(store, S3Store):
        s3 = store
        (bucket,) = run("artifact store", lambda: check_bucket(s3))
        if bucket.status == "fail":
            store = None  # every further store check would fail the same way, slowly
        else:
            run("s3 lifecycle", lambda: check_lifecycle(s3, fix=fix))
            run("s3 multipart uploads", lambda: check_multipart_uploads(s3, upload_age, fix=fix))
    elif isinstance(store, LocalStore):
        local = store
        run("artifact store", lambda: check_local_root(local))

    if registry is not None:
        run("registration leases", lambda: check_locks(registry, fix=fix))
    if store is not None:
        found = store
        run("artifacts", lambda: check_artifacts(found, registry, verify=verify, no_registry=no_registry))
        run("partial publishes", lambda: check_partial_publishes(found))
        if isinstance(store, LocalStore):
            local = store
            run("temporary files", lambda: check_temporaries(local, temp_age, fix=fix))
    return results


def failed(results: Iterable[CheckResult]) -> bool:
    return any(r.status == "fail" for r in results)
