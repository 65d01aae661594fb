"""The artifact store's health: reachable, a lifecycle rule for crashed multipart uploads, no orphaned
uploads, temporary folders or partial publishes left by killed writers."""

from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from recycler.doctor.result import CheckResult, first_line, hours, listing
from recycler.io.atomic import LOCK_SUFFIX, TMP_MARK, reclaim, temporaries, writer_alive
from recycler.store import KINDS, ArtifactStore, open_store
from recycler.store.local import LocalStore
from recycler.store.s3 import S3Store

if TYPE_CHECKING:
    from recycler.settings import Settings

LIFECYCLE_RULE_ID = "recycler-abort-incomplete-multipart"


def open_doctor_store(settings: Settings, timeout: float) -> ArtifactStore:
    """The settings' store; an S3 one gets short connect timeouts and few retries (the store's own
    client retries for minutes, right for transfers, wrong for a health check)."""
    if not settings.artifact_store.startswith("s3://"):
        return open_store(settings)
    from recycler.store.s3 import s3_client

    client = s3_client(
        settings.s3_endpoint_url,
        settings.s3_region,
        connect_timeout=timeout,
        read_timeout=max(timeout, 30),
        attempts=2,
    )
    return open_store(settings, client=client)


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
            name="artifact store", status="fail", detail=f"{where}: {why.get(code, first_line(e))}"
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
                name=name, status="warn", detail=f"cannot read the lifecycle rules ({first_line(e)})"
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
    age = hours(older_than)
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
        f"{len(stale)} upload(s) older than {age} (crashed publishers; --fix aborts them): {listing(items)}"
    )
    return CheckResult(name=name, status="warn", detail=detail, fixable=True, items=items)


def check_temporaries(roots: list[Path], older_than: timedelta, *, fix: bool = False) -> CheckResult:
    """Temporaries of atomic writes left by killed writers under `roots` (the local store and the
    workspace, where apply, diff and fine-tune outputs are built): up to a model's size each.

    A temporary made by an atomic write carries its writer's lock, so it is stale exactly when the lock
    can be taken (recycler.io.atomic); other leftovers with a temporary name (a manifest being
    written, a staging copy) count as stale once older than `older_than`. `fix` removes the stale ones.
    """
    name, now = "temporary files", time.time()
    found = [t for root in roots if root.is_dir() for t in temporaries(root, recursive=True)]
    others = [
        p
        for root in roots
        if root.is_dir()
        for p in root.rglob(f".*{TMP_MARK}*")
        if p not in found and not p.name.endswith(LOCK_SUFFIX)
    ]
    stale = [t for t in found if not writer_alive(t)] + [
        p for p in others if p.lstat().st_mtime <= now - older_than.total_seconds()
    ]
    live = len(found) + len(others) - len(stale)
    where = ", ".join(str(r) for r in roots)
    if not stale:
        detail = f"none left by killed writers in {where}" + (f" ({live} in progress)" if live else "")
        return CheckResult(name=name, status="ok", detail=detail)
    items = [f"{p} ({(now - p.lstat().st_mtime) / 3600:.1f} h old)" for p in stale]
    size = sum(f.stat().st_size for p in stale for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    if not fix:
        detail = f"{len(stale)} left by killed writers ({size / 1e6:,.1f} MB; --fix removes them): {listing(items)}"
        return CheckResult(name=name, status="warn", detail=detail, fixable=True, items=items)
    for p in stale:
        if p in found:
            reclaim(p)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    detail = f"removed {len(stale)} ({size / 1e6:,.1f} MB)" + (
        f"; {live} in progress left alone" if live else ""
    )
    return CheckResult(name=name, status="ok", detail=detail, fixable=True, fixed=True, items=items)


def check_partial_publishes(store: ArtifactStore) -> CheckResult:
    """Artifact addresses holding files but no manifest: a publish that died before its manifest
    (invisible to readers; re-running the same publish completes it) or one in progress. Reported only."""
    partial = [uri for kind in KINDS for uri in store.partial(kind)]
    if not partial:
        return CheckResult(
            name="partial publishes", status="ok", detail="every artifact address has a manifest"
        )
    detail = f"{len(partial)} address(es) without a manifest (re-run the publish, or delete by hand): {listing(partial)}"
    return CheckResult(name="partial publishes", status="warn", detail=detail, items=partial)
