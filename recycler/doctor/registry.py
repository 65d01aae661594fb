"""The registry's health: expired registration leases, and every registered version pointing at a
complete artifact in the store (and every artifact referenced by some version)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from recycler.doctor.result import CheckResult, first_line, listing
from recycler.errors import ArtifactNotFound, VerificationFailed
from recycler.registry import lease
from recycler.store import KINDS, ArtifactRef, ArtifactStore

if TYPE_CHECKING:
    from recycler.registry.client import Registry
    from recycler.registry.names import RegisteredVersion

REGISTRY_CHECKS = ("unregistered artifacts", "registered versions")


def check_locks(registry: Registry, *, fix: bool = False) -> CheckResult:
    """Registration leases (`_recycler-lock-*` models) past `expires_at`: left by killed registrations.
    Harmless (the next registration takes them over) but clutter; `fix` deletes them after re-reading
    each one, so a lease renewed or re-taken in between is left alone."""
    found = lease.leases(registry)
    now = time.time()
    stale = [info for info in found if info.expires_at < now]
    if not stale:
        return CheckResult(name="registration leases", status="ok", detail=f"{len(found)} live, none expired")
    items = [f"{i.name} ({i.key}, expired {(now - i.expires_at) / 60:.0f} min ago)" for i in stale]
    if not fix:
        detail = (
            f"{len(stale)} expired lease(s) of killed registrations (--fix deletes them): {listing(items)}"
        )
        return CheckResult(
            name="registration leases", status="warn", detail=detail, fixable=True, items=items
        )
    deleted = sum(lease.delete_if_expired(registry, info) for info in stale)
    return CheckResult(
        name="registration leases",
        status="ok",
        detail=f"deleted {deleted} expired lease(s)",
        fixable=True,
        fixed=True,
        items=items,
    )


def check_chains(registry: Registry) -> CheckResult:
    """Every family's release chain: which release blocks it (given up, refused, failed and waiting
    for its retry, or in flight for longer than a day) and how to unblock it."""
    from recycler.registry.chain import ChainLedger

    chains = registry.call(registry.client.search_registered_models, "tags.`recycler.kind` = 'chain'", max_results=1000)  # fmt: skip
    problems = []
    for model in chains:
        family, variant = model.tags.get("recycler.family", "?"), model.tags.get("recycler.variant", "?")
        for e in ChainLedger(registry, family, variant).entries().values():
            stuck = e.state in ("dispatched", "running") and time.time() - e.updated > 86400
            if e.state in ("gave-up", "failed") or stuck:
                what = f"in flight since {time.strftime('%Y-%m-%d %H:%M', time.localtime(e.updated))}" if stuck else f"{e.state} after {e.attempts} attempt(s)"  # fmt: skip
                problems.append(
                    f"{family}-{variant} {e.version}: {what} ({e.reason}); unblock with `recycler chain retry "
                    f"{e.version} --spec SPEC` or `recycler chain skip {e.version} --spec SPEC --reason …`"
                )
    if not problems:
        return CheckResult(name="release chains", status="ok", detail=f"{len(chains)} chain(s), none blocked")
    return CheckResult(name="release chains", status="warn", detail=listing(problems), items=problems)


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
    published, bad = _verify_published(store, verify)
    how = "verified against their manifests" if verify else "have valid manifests (bytes not re-hashed)"
    if bad:
        items = list(bad.values())
        detail = (
            f"{len(bad)} of {len(published)} do not verify (never deleted automatically): {listing(items)}"
        )
        results = [CheckResult(name="artifacts", status="fail", detail=detail, items=items)]
    else:
        results = [CheckResult(name="artifacts", status="ok", detail=f"{len(published)} artifact(s) {how}")]
    if registry is None:
        return [*results, *(CheckResult(name=n, status="warn", detail=no_registry) for n in REGISTRY_CHECKS)]
    try:
        versions = registry.all_versions()
    except Exception as e:  # keep the verification results above
        detail = f"registry search failed: {first_line(e)}"
        return [*results, *(CheckResult(name=n, status="fail", detail=detail) for n in REGISTRY_CHECKS)]
    return [*results, *_versions_against_store(store, versions, published, bad)]


Key = tuple[str, str]  # (artifact kind, digest)


def _verify_published(store: ArtifactStore, verify: bool) -> tuple[dict[Key, ArtifactRef], dict[Key, str]]:
    """Every artifact in the store, and the problem of each one that does not verify."""
    published: dict[Key, ArtifactRef] = {}
    bad: dict[Key, str] = {}
    for kind in KINDS:
        for ref in store.list(kind):
            published[(kind, ref.digest)] = ref
            try:
                store.verify(ref) if verify else store.manifest(ref)
            except (VerificationFailed, ArtifactNotFound) as e:
                bad[(kind, ref.digest)] = str(e)
    return published, bad


def _versions_against_store(
    store: ArtifactStore,
    versions: list[RegisteredVersion],
    published: dict[Key, ArtifactRef],
    bad: dict[Key, str],
) -> list[CheckResult]:
    registered: set[Key] = set()
    problems: list[str] = []
    elsewhere = checked = 0
    for v in versions:
        kind, digest = v.tags.get("artifact_kind", ""), v.tags.get("manifest_sha256", "")
        registered.add((kind, digest))
        try:
            ref = store.ref(kind, digest)
        except ValueError as e:
            problems.append(f"{v.reference}: unusable artifact tags ({e})")
            continue
        if (v.tags.get("artifact_uri") or v.source) != ref.uri:
            elsewhere += 1  # another store's artifact: not ours to judge
            continue
        checked += 1
        if (kind, digest) in bad:
            problems.append(f"{v.reference}: artifact incomplete: {bad[(kind, digest)]}")
        elif (kind, digest) not in published:
            try:
                store.verify(ref)  # published since we listed? otherwise says what is missing
            except (VerificationFailed, ArtifactNotFound) as e:
                problems.append(f"{v.reference}: artifact missing: {e}")
    unregistered = [ref.uri for key, ref in published.items() if key not in registered]
    if unregistered:
        detail = f"{len(unregistered)} artifact(s) no registry version references (not removed): {listing(unregistered)}"
        results = [
            CheckResult(name="unregistered artifacts", status="warn", detail=detail, items=unregistered)
        ]
    else:
        results = [
            CheckResult(name="unregistered artifacts", status="ok", detail="every artifact is registered")
        ]
    note = f"; {elsewhere} point outside this store (not checked)" if elsewhere else ""
    if problems:
        detail = (
            f"{len(problems)} version(s) point at a missing or incomplete artifact: {listing(problems)}{note}"
        )
        results.append(CheckResult(name="registered versions", status="fail", detail=detail, items=problems))
    else:
        detail = f"{checked} version(s) point at complete artifacts in this store{note}"
        results.append(CheckResult(name="registered versions", status="ok", detail=detail))
    return results
