"""`recycler doctor`: check a deployment and repair what is safe to repair.

Why it exists: publishing and registration are crash-safe by construction (recycler.store,
recycler.registry), but a crash still leaves debris that nothing else cleans up (temporary folders,
multipart uploads, expired leases), and a deployment depends on things no single command sees:
package versions, reachable servers, a bucket lifecycle rule, artifacts rotting at rest.

Every check is a plain function returning `CheckResult`s (packages, servers, storage, registry
modules); `run_doctor` runs them all and turns an exception inside one check into a failed result, so
one broken dependency never hides the others. Repairs (`fix=True`) are limited to what cannot lose
data: adding a lifecycle rule, aborting uploads older than a threshold, deleting expired leases,
removing old temporary folders. Artifacts that do not verify, or that no registry version references,
are only reported: deleting them is a decision.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING

from recycler.delta import fast
from recycler.doctor import packages
from recycler.doctor.registry import check_artifacts, check_chains, check_locks
from recycler.doctor.result import CheckResult, first_line
from recycler.doctor.servers import check_http, check_tracking
from recycler.doctor.storage import (
    check_bucket,
    check_lifecycle,
    check_local_root,
    check_multipart_uploads,
    check_partial_publishes,
    check_temporaries,
    open_doctor_store,
)
from recycler.settings import sqlite_path
from recycler.store import ArtifactStore
from recycler.store.local import LocalStore
from recycler.store.s3 import S3Store

if TYPE_CHECKING:
    from recycler.registry.client import Registry
    from recycler.settings import Settings

__all__ = ["CheckResult", "failed", "run_doctor"]


class _Runner:
    """Runs checks in order, turning an exception inside one into a failed result."""

    def __init__(self) -> None:
        self.results: list[CheckResult] = []

    def __call__(self, name: str, check: Callable[[], CheckResult | list[CheckResult]]) -> list[CheckResult]:
        try:
            out = check()
        except Exception as e:
            out = CheckResult(name=name, status="fail", detail=f"check failed: {first_line(e)}")
        found = out if isinstance(out, list) else [out]
        self.results.extend(found)
        return found


def run_doctor(
    settings: Settings,
    *,
    fix: bool = False,
    upload_age: timedelta = timedelta(hours=24),
    temp_age: timedelta = timedelta(hours=1),
    verify: bool = True,
    timeout: float = 3.0,
    prefect_api_url: str | None = None,
    audit: bool = True,
) -> list[CheckResult]:
    """Every check for `settings`, in order. Registry checks run only when the registry answered (or
    its SQLite file exists: doctor never creates one), store checks only when the bucket answered.
    `prefect_api_url` defaults to $PREFECT_API_URL; without either, Prefect is not checked."""
    run = _Runner()
    if audit:
        run("vulnerabilities", packages.check_vulnerabilities)
    run("pins", lambda: packages.check_pins(packages.installed_versions()))
    run("kernels", lambda: packages.check_kernels(fast.available()))
    registry, no_registry = _open_registry(run, settings, timeout, prefect_api_url)
    store = _store_checks(run, settings, timeout, fix, upload_age)
    if registry is not None:
        run("registration leases", lambda: check_locks(registry, fix=fix))
        run("release chains", lambda: check_chains(registry))
    if store is not None:
        run("artifacts", lambda: check_artifacts(store, registry, verify=verify, no_registry=no_registry))
        run("partial publishes", lambda: check_partial_publishes(store))
    roots = [settings.home / "work", *([store.root] if isinstance(store, LocalStore) else [])]
    run("temporary files", lambda: check_temporaries(roots, temp_age, fix=fix))
    return run.results


def _open_registry(
    run: _Runner, settings: Settings, timeout: float, prefect_api_url: str | None
) -> tuple[Registry | None, str]:
    """Server checks, then the registry if it answered: (registry or None, why it is None)."""
    (registry_check,) = run(
        "mlflow tracking", lambda: check_tracking("mlflow tracking", settings.tracking_uri, timeout)
    )
    if settings.registry_uri != settings.tracking_uri:
        (registry_check,) = run(
            "mlflow registry", lambda: check_tracking("mlflow registry", settings.registry_uri, timeout)
        )
    if prefect_url := prefect_api_url or os.environ.get("PREFECT_API_URL"):
        run("prefect api", lambda: check_http("prefect api", prefect_url, timeout))
    db = sqlite_path(settings.registry_uri)
    if db is not None and not db.is_file():
        return None, "no registry yet (its SQLite file does not exist); not checked"
    if registry_check.status == "fail":
        return None, "registry not reachable; not checked"
    from recycler.registry.client import Registry

    try:
        return Registry(settings.tracking_uri, settings.registry_uri, attempts=2, backoff=0.5), ""
    except Exception as e:
        run.results.append(
            CheckResult(
                name="mlflow registry", status="fail", detail=f"cannot open the registry: {first_line(e)}"
            )
        )
        return None, "registry not reachable; not checked"


def _store_checks(
    run: _Runner, settings: Settings, timeout: float, fix: bool, upload_age: timedelta
) -> ArtifactStore | None:
    """The store's own checks; returns the store if further checks can use it."""
    try:
        store = open_doctor_store(settings, timeout)
    except Exception as e:  # e.g. an invalid bucket name
        detail = f"cannot open {settings.artifact_store}: {first_line(e)}"
        run.results.append(CheckResult(name="artifact store", status="fail", detail=detail))
        return None
    if isinstance(store, LocalStore):
        run("artifact store", lambda: check_local_root(store))
        return store
    assert isinstance(store, S3Store)
    (bucket,) = run("artifact store", lambda: check_bucket(store))
    if bucket.status == "fail":
        return None  # every further store check would fail the same way, slowly
    run("s3 lifecycle", lambda: check_lifecycle(store, fix=fix))
    run("s3 multipart uploads", lambda: check_multipart_uploads(store, upload_age, fix=fix))
    return store


def failed(results: Iterable[CheckResult]) -> bool:
    return any(r.status == "fail" for r in results)
