"""What an artifact is: a folder with a manifest, addressed by the sha256 of that manifest.

`ArtifactStore` is the protocol flows, the registry and the CLI program against; `LocalStore`
(recycler.store.local) and `S3Store` (recycler.store.s3) implement it. Layout in every store:
`<root>/<kind>/<digest>/<relative path>`, where `kind` is one of KINDS and `digest` the sha256 of the
folder's manifest.json, which lists every file's sha256 and size and so fingerprints the whole folder.
Keys are built only from the kind allow-list, a hex digest and manifest-listed relative paths that
`recycler.io.manifest.safe_relpath` validated, never from release or tensor names.

Publish protocol (RELIABILITY.md R2–R3): every file first, manifest.json last and create-only. A
prefix without a manifest is invisible: `exists`, `list` and `fetch` only trust manifests. Publishing
the same content again is a no-op returning the same ref; a conflicting manifest is an error.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Protocol

from recycler.errors import VerificationFailed
from recycler.io.atomic import TMP_MARK, fsync_dir, fsync_file, link_or_copy
from recycler.io.layout import MANIFEST_NAME
from recycler.io.manifest import (
    HEX64,
    FileEntry,
    fail_if,
    listed_file_problems,
    manifest_digest,
    parse_manifest,
    write_manifest,
)

KINDS = ("base", "diff", "model", "adapter")
MANIFEST_KIND = {
    "base": "model",
    "diff": "diff",
    "model": "model",
    "adapter": "adapter",
}  # store kind → manifest "kind"
Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class ArtifactRef:
    """A published folder: `uri` is `s3://bucket/prefix/<kind>/<digest>` or a local path."""

    kind: str
    digest: str
    uri: str

    def __post_init__(self) -> None:
        check_kind(self.kind)
        check_digest(self.digest)


@dataclass(frozen=True)
class Prepared:
    """A local folder ready to publish: its manifest bytes, digest and validated file list."""

    folder: Path
    manifest_bytes: bytes
    digest: str
    files: tuple[FileEntry, ...]

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


class ArtifactStore(Protocol):
    """What flows and the CLI need from a store; LocalStore and S3Store implement it."""

    def ref(self, kind: str, digest: str) -> ArtifactRef: ...
    def publish(self, folder: Path, kind: str, *, on_progress: Progress = None) -> ArtifactRef: ...
    def fetch(
        self, ref: ArtifactRef, dest: Path, *, overwrite: bool = False, on_progress: Progress = None
    ) -> Path: ...
    def exists(self, ref: ArtifactRef) -> bool: ...
    def manifest(self, ref: ArtifactRef) -> dict: ...
    def verify(self, ref: ArtifactRef) -> dict: ...
    def list(self, kind: str) -> list[ArtifactRef]: ...
    def partial(self, kind: str) -> list[str]: ...
    def abort_stale_uploads(self, older_than: timedelta) -> int: ...


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"artifact kind {kind!r} is not one of {', '.join(KINDS)}")
    return kind


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not HEX64.match(digest):
        raise ValueError(f"artifact digest {digest!r} is not a lowercase hex sha256")
    return digest


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") for p in PurePosixPath(rel).parts)


def prepare(folder: Path, kind: str, *, verify: bool) -> Prepared:
    """Validate a folder for publishing: manifest present and of the right kind, no unlisted files
    (hidden ones such as `.checkpoints/` are never published), and with `verify` every byte hashed."""
    folder = Path(folder).resolve()
    check_kind(kind)
    mpath = folder / MANIFEST_NAME
    if not mpath.is_file():
        raise VerificationFailed(
            f"{folder}: no {MANIFEST_NAME}; write one first (recycler.store.ensure_manifest or `recycler publish`)"
        )
    raw = mpath.read_bytes()
    body, files = parse_manifest(raw, str(mpath))
    if body.get("kind") != MANIFEST_KIND[kind]:
        raise VerificationFailed(
            f"{mpath}: manifest kind {body.get('kind')!r} cannot be published as {kind!r} "
            f"(expects {MANIFEST_KIND[kind]!r})"
        )
    listed = {f.rel for f in files}
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    problems = [f"missing file {r}" for r in sorted(listed - present)]
    problems += [f"unlisted file {r}" for r in sorted(present - listed - {MANIFEST_NAME}) if not _hidden(r)]
    fail_if(problems, str(folder))
    if verify:
        fail_if(listed_file_problems(folder, files), str(folder))
    return Prepared(folder, raw, hashlib.sha256(raw).hexdigest(), files)


def ensure_manifest(folder: Path, *, kind: str = "model", body: dict | None = None) -> str:
    """Give any HF folder (e.g. a fine-tune's output) a manifest and return its digest.

    An existing manifest is kept. Hidden entries (`.checkpoints/`, `.cache/`) are left out: the
    manifest is written in a hard-linked staging copy without them, then moved into `folder`
    atomically, so the folder never shows a half-written manifest.
    """
    folder = Path(folder).resolve()
    if (folder / MANIFEST_NAME).is_file():
        return manifest_digest(folder)
    stage = folder.parent / f".{folder.name}.manifest{TMP_MARK}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        shutil.copytree(folder, stage, ignore=shutil.ignore_patterns(".*"), copy_function=link_or_copy)
        write_manifest(stage, {"kind": MANIFEST_KIND[check_kind(kind)], **(body or {})}, {})
        tmp = folder / f".{MANIFEST_NAME}{TMP_MARK}{os.getpid()}"
        shutil.copyfile(stage / MANIFEST_NAME, tmp)
        fsync_file(tmp)
        os.replace(tmp, folder / MANIFEST_NAME)
        fsync_dir(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest_digest(folder)


def already_published(existing: bytes, prep: Prepared, ref: ArtifactRef) -> ArtifactRef:
    """The manifest key is taken: same bytes = this content is published (success), else a conflict."""
    if existing != prep.manifest_bytes:
        raise VerificationFailed(
            f"{ref.uri}: a different {MANIFEST_NAME} is already published under this digest; the store is corrupt"
        )
    return ref
