"""Artifacts as folders under a local root (the embedded default): published by an atomic rename."""

from __future__ import annotations

import hashlib
import shutil
import time
from datetime import timedelta
from pathlib import Path

from recycler.crashpoints import crash_point
from recycler.errors import ArtifactNotFound, OutputExists, VerificationFailed
from recycler.io.atomic import atomic_folder, reclaim, temporaries, writer_alive
from recycler.io.layout import MANIFEST_NAME
from recycler.io.manifest import (
    HEX64,
    FileEntry,
    copy_verified,
    fail_if,
    listed_file_problems,
    parse_manifest,
)
from recycler.store.artifact import (
    KINDS,
    ArtifactRef,
    Progress,
    already_published,
    check_digest,
    check_kind,
    prepare,
)


class LocalStore:
    """Folders under `root`. Publishing copies into a temporary sibling and renames it into place."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _dir(self, kind: str, digest: str) -> Path:
        return self.root / check_kind(kind) / check_digest(digest)

    def ref(self, kind: str, digest: str) -> ArtifactRef:
        return ArtifactRef(kind, digest, str(self._dir(kind, digest)))

    def publish(self, folder: Path, kind: str, *, on_progress: Progress = None) -> ArtifactRef:
        prep = prepare(folder, kind, verify=False)  # bytes are verified while copying
        ref, dest = self.ref(kind, prep.digest), self._dir(kind, prep.digest)
        if (dest / MANIFEST_NAME).is_file():
            return already_published((dest / MANIFEST_NAME).read_bytes(), prep, ref)
        try:
            with atomic_folder(dest, [prep.folder]) as tmp:
                problems = [
                    p
                    for f in prep.files
                    if (p := copy_verified(prep.folder / f.rel, tmp / f.rel, f, on_progress))
                ]
                fail_if(problems, str(prep.folder))
                crash_point("publish:before-manifest")
                (tmp / MANIFEST_NAME).write_bytes(prep.manifest_bytes)  # last
        except OutputExists:  # another publisher won the rename
            if not (dest / MANIFEST_NAME).is_file():
                raise VerificationFailed(f"{dest}: exists without {MANIFEST_NAME}; remove it") from None
            return already_published((dest / MANIFEST_NAME).read_bytes(), prep, ref)
        return ref

    def manifest(self, ref: ArtifactRef) -> dict:
        return self._load(ref)[0]

    def _load(self, ref: ArtifactRef) -> tuple[dict, tuple[FileEntry, ...]]:
        mpath = self._dir(ref.kind, ref.digest) / MANIFEST_NAME
        if not mpath.is_file():
            raise ArtifactNotFound(f"{ref.uri}: no {MANIFEST_NAME}; not published (or not completely)")
        raw = mpath.read_bytes()
        if hashlib.sha256(raw).hexdigest() != ref.digest:
            raise VerificationFailed(f"{mpath}: sha256 does not match the artifact digest {ref.digest}")
        return parse_manifest(raw, str(mpath))

    def fetch(
        self, ref: ArtifactRef, dest: Path, *, overwrite: bool = False, on_progress: Progress = None
    ) -> Path:
        _, files = self._load(ref)
        src = self._dir(ref.kind, ref.digest)
        with atomic_folder(dest, [src], overwrite=overwrite) as tmp:
            fail_if(
                [p for f in files if (p := copy_verified(src / f.rel, tmp / f.rel, f, on_progress))],
                ref.uri,
            )
            shutil.copyfile(src / MANIFEST_NAME, tmp / MANIFEST_NAME)
        return Path(dest).resolve()

    def exists(self, ref: ArtifactRef) -> bool:
        return (self._dir(ref.kind, ref.digest) / MANIFEST_NAME).is_file()

    def verify(self, ref: ArtifactRef) -> dict:
        _, files = self._load(ref)
        fail_if(listed_file_problems(self._dir(ref.kind, ref.digest), files), ref.uri)
        return {"files": len(files), "bytes": sum(f.size for f in files)}

    def list(self, kind: str) -> list[ArtifactRef]:
        base = self.root / check_kind(kind)
        if not base.is_dir():
            return []
        return [
            self.ref(kind, d.name)
            for d in sorted(base.iterdir())
            if HEX64.match(d.name) and (d / MANIFEST_NAME).is_file()
        ]

    def partial(self, kind: str) -> list[str]:
        """Addresses holding files but no manifest: a publish that died before its manifest."""
        base = self.root / check_kind(kind)
        found = sorted(base.iterdir()) if base.is_dir() else []
        return [str(d) for d in found if HEX64.match(d.name) and not (d / MANIFEST_NAME).is_file()]

    def abort_stale_uploads(self, older_than: timedelta) -> int:
        """Remove temporary folders of publishes whose writer is gone and that are older than
        `older_than` (the local analogue of aborting orphaned multipart uploads)."""
        cutoff = time.time() - older_than.total_seconds()
        stale = [t for kind in KINDS for t in temporaries(self.root / kind) if t.stat().st_mtime <= cutoff]
        return sum(1 for t in stale if not writer_alive(t) and reclaim(t) >= 0)
