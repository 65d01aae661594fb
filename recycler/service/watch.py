"""The watcher: start one release cycle per base release not processed yet, oldest first.

State lives in the registry (a release is processed once its cycle's fine-tune is marked complete),
never in the watcher, so any number of watchers can run. How a cycle is started is the caller's:
inline (`run_cycle`, under a per-release OS lock so two watchers on one machine start it once) or as a
deployment run with the release's idempotency key (two watchers anywhere start one run).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from recycler.service import steps
from recycler.service.services import Services
from recycler.service.spec import CycleSpec
from recycler.store.releases import Release, open_source, version_key

StartCycle = Callable[[Release], dict[str, Any]]


def new_releases(source: str, spec: CycleSpec, svc: Services) -> list[Release]:
    """Releases of `source` whose cycle has not completed, oldest first."""
    releases = open_source(source, spec.family, endpoint_url=svc.settings.s3_endpoint_url).list()
    todo = sorted(releases, key=lambda r: version_key(r.version))
    return [r for r in todo if steps.completed_cycle(svc.registry, spec, r.version) is None]


def watch(
    source: str,
    spec: CycleSpec,
    start: StartCycle,
    *,
    services: Services | None = None,
    lock: bool = True,
    say: Callable[[str], None] = lambda _m: None,
) -> list[dict[str, Any]]:
    """Start a cycle (`start(release)`) for every new release, oldest first; return their results.

    With `lock`, each release is processed under a non-blocking per-release lock and re-checked once
    held: a release another watcher is processing is skipped, not waited for.
    """
    svc = services or Services.from_settings()
    results = []
    for release in new_releases(source, spec, svc):
        say(f"new release {release.key}")
        if not lock:
            results.append(start(release))
            continue
        with release_lock(svc.settings.home, release.key) as acquired:
            if not acquired or steps.completed_cycle(svc.registry, spec, release.version):
                say(f"{release.key} is being (or was) processed by another watcher")
                continue
            results.append(start(release))
    return results


@contextmanager
def release_lock(home: Path, key: str) -> Iterator[bool]:
    """A non-blocking per-release OS lock, released by the kernel when its holder dies, so a crashed
    watcher never blocks the next one (a registry lease would need renewing over hours of FT)."""
    locks = Path(home) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    file_lock = FileLock(locks / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.lock")
    try:
        file_lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        file_lock.release()
