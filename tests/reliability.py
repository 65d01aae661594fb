"""The reliability ledger and the global invariant check (RELIABILITY.md §b `INV()`).

Every reliability case registers itself with `case(id, category)` and calls `ok(...)` at its end with
the invariant report; a failed assertion leaves the case unconfirmed, and the summary line printed at
the end of the run (tests/conftest.py: pytest_terminal_summary) counts it against its category:

    bad inputs rejected: N/N · faults survived: N/N · bytes lost: 0 · partial visible: 0 ·
    duplicate versions/runs: 0 · deterministic reruns: N/N · secret leaks: 0
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from recycler.errors import ArtifactNotFound, VerificationFailed
from recycler.io.atomic import TMP_MARK
from recycler.io.checkpoint import MANIFEST_NAME
from recycler.store import KINDS
from recycler.store.local import LocalStore
from recycler.store.s3 import S3Store

CATEGORIES = {
    "bad_input": "bad inputs rejected",
    "fault": "faults survived",
    "determinism": "deterministic reruns",
}


@dataclass
class Invariants:
    bytes_lost: int = 0
    partial_visible: int = 0
    incomplete_registered: int = 0
    duplicate_versions: int = 0
    temp_in_final: int = 0
    secret_leaks: int = 0
    orphans: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def hold(self) -> bool:
        return not self.problems


@dataclass
class Ledger:
    cases: dict[str, str] = field(default_factory=dict)  # id → category
    confirmed: set[str] = field(default_factory=set)
    totals: Counter = field(default_factory=Counter)

    def summary(self) -> str | None:
        if not self.cases:
            return None
        parts = []
        for cat, label in CATEGORIES.items():
            ids = [i for i, c in self.cases.items() if c == cat]
            if ids:
                parts.append(f"{label}: {len(self.confirmed.intersection(ids))}/{len(ids)}")
        t = self.totals
        parts += [
            f"bytes lost: {t['bytes_lost']}",
            f"partial visible: {t['partial_visible'] + t['incomplete_registered'] + t['temp_in_final']}",
            f"duplicate versions/runs: {t['duplicate_versions']}",
            f"secret leaks: {t['secret_leaks']}",
        ]
        order = ["bad inputs", "faults", "bytes", "partial", "duplicate", "deterministic", "secret"]
        parts.sort(key=lambda p: next(i for i, k in enumerate(order) if p.startswith(k)))
        return " · ".join(parts)


LEDGER = Ledger()


@dataclass
class Case:
    id: str
    category: str

    def ok(self, inv: Invariants | None = None) -> None:
        """Confirm the case: its own assertions passed and (if given) the invariants hold."""
        if inv is not None:
            for key in ("bytes_lost", "partial_visible", "incomplete_registered", "duplicate_versions"):
                LEDGER.totals[key] += getattr(inv, key)
            LEDGER.totals["temp_in_final"] += inv.temp_in_final
            LEDGER.totals["secret_leaks"] += inv.secret_leaks
            assert inv.hold, f"{self.id}: invariants violated: {inv.problems}"
        LEDGER.confirmed.add(self.id)


def case(case_id: str, category: str) -> Case:
    assert category in CATEGORIES or category in ("concurrency", "security"), category
    LEDGER.cases[case_id] = category
    return Case(case_id, category)


def check_invariants(
    store: LocalStore | S3Store | None = None,
    registry=None,
    *,
    logs: str = "",
    secrets: tuple[str, ...] = (),
    final_dirs: tuple[Path, ...] = (),
) -> Invariants:
    """INV(): (i)+(ii) every published artifact verifies against its manifest; nothing is visible
    without a manifest; (iii) no registry version points at an incomplete artifact; (iv) at most one
    version per artifact and model; (v) no temporary files in final places; (vi) no secret in logs."""
    inv = Invariants()
    if store is not None:
        for kind in KINDS:
            for ref in store.list(kind):
                try:
                    store.verify(ref)
                except (VerificationFailed, ArtifactNotFound) as e:
                    inv.bytes_lost += 1
                    inv.problems.append(f"published {ref.uri} does not verify: {e}")
        inv.orphans = _prefixes_without_manifest(
            store
        )  # invisible to readers; `recycler doctor` reports them
    if registry is not None:
        seen: Counter = Counter()
        for mv in registry.client.search_model_versions(""):
            tags = dict(mv.tags)
            if "manifest_sha256" not in tags:
                continue
            seen[(mv.name, tags["manifest_sha256"])] += 1
            if (
                store is not None
                and tags.get("artifact_uri") == store.ref(tags["artifact_kind"], tags["manifest_sha256"]).uri
            ):
                ref = store.ref(tags["artifact_kind"], tags["manifest_sha256"])
                try:
                    store.verify(ref)
                except (VerificationFailed, ArtifactNotFound) as e:
                    inv.incomplete_registered += 1
                    inv.problems.append(f"{mv.name}/{mv.version} points at an incomplete artifact: {e}")
        for (name, digest), n in seen.items():
            if n > 1:
                inv.duplicate_versions += n - 1
                inv.problems.append(f"{name}: {n} versions of artifact {digest[:12]}")
    # (v) temporary files inside published folders: <kind>/<digest>/… in a local store, anywhere
    # inside a final output folder; hidden temporary siblings (.name.tmp-…) are invisible to readers
    places = [(Path(d), 0) for d in final_dirs] + ([(store.root, 2)] if isinstance(store, LocalStore) else [])
    for root, depth in places:
        for p in root.rglob("*") if root.exists() else ():
            parents = p.relative_to(root).parts[:-1]
            if len(parents) < depth or any(part.startswith(".") for part in parents):
                continue
            if TMP_MARK in p.name or p.name.endswith((".tmp", ".incomplete")):
                inv.temp_in_final += 1
                inv.problems.append(f"temporary file in a final place: {p}")
    for secret in secrets:
        if secret and secret in logs:
            inv.secret_leaks += 1
            inv.problems.append(f"secret ending …{secret[-4:]} found in captured logs")
    return inv


def _prefixes_without_manifest(store: LocalStore | S3Store) -> list[str]:
    if isinstance(store, LocalStore):
        return [
            str(d)
            for kind in KINDS
            if (store.root / kind).is_dir()
            for d in (store.root / kind).iterdir()
            if not d.name.startswith(".") and not (d / MANIFEST_NAME).is_file()
        ]
    prefixes: dict[str, bool] = {}
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=store.prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            head, _, name = obj["Key"].rpartition("/")
            parts = head.split("/")
            if len(parts) >= 2 and parts[-2] in KINDS and len(parts[-1]) == 64:
                prefixes[head] = prefixes.get(head, False) or name == MANIFEST_NAME
    return [p for p, has_manifest in prefixes.items() if not has_manifest]


def tree_digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes: 'the same bytes as an uninterrupted run'."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()
