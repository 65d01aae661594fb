"""Where new base versions come from: a local folder, an S3 prefix, or the Hugging Face Hub.

A release is identified by (family, version, fingerprint). Ids are checked against an allow-list
before any I/O, because they become registry names, lock names and storage paths; the fingerprint
makes a re-published version with other weights a different release (and a different idempotency
key) instead of being silently skipped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from recycler.errors import InvalidReleaseId
from recycler.io.layout import RELEASE_GLOBS, is_release_file

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_id(value: str, what: str = "family") -> str:
    """Family/variant names: lowercase, digits, '.', '_', '-'; no path syntax of any kind."""
    if not isinstance(value, str) or not ID_PATTERN.match(value) or ".." in value:
        raise InvalidReleaseId(
            f"invalid {what} {value!r}: use 1-64 of a-z 0-9 . _ - (starting with a letter or digit)"
        )
    return value


def check_version(value: str) -> str:
    if not isinstance(value, str) or not VERSION_PATTERN.match(value) or ".." in value:
        raise InvalidReleaseId(
            f"invalid version {value!r}: use 1-64 of A-Z a-z 0-9 . _ - (no '..', slashes or '%')"
        )
    return value


def version_key(version: str) -> tuple:
    """Natural order: v2 < v10, 3.0 < 3.1."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version))


@dataclass(frozen=True)
class Release:
    family: str
    version: str
    uri: str
    fingerprint: str

    @property
    def key(self) -> str:
        """Idempotency key: one release cycle per (family, version, content)."""
        return f"{self.family}@{self.version}#{self.fingerprint[:16]}"


class ReleaseSource(Protocol):
    family: str

    def list(self) -> list[Release]:
        """All releases, oldest first."""
        ...

    def materialize(self, release: Release, dest: Path) -> Path:
        """A local HF folder with the release's weights (may be the source folder itself)."""
        ...


def _fingerprint(entries: Iterable[tuple[str, int, str]]) -> str:
    h = hashlib.sha256()
    for name, size, tag in sorted(entries):
        h.update(f"{name}\0{size}\0{tag}\n".encode())
    return h.hexdigest()


class LocalFolderSource:
    """Each sub-folder of `root` holding config.json and safetensors is a version."""

    def __init__(self, root: Path, family: str):
        self.root, self.family = Path(root), check_id(family)

    def list(self) -> list[Release]:
        releases = []
        if not self.root.is_dir():
            return []
        for d in self.root.iterdir():
            if d.name.startswith(".") or not d.is_dir() or not VERSION_PATTERN.match(d.name):
                continue
            if not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
                continue
            files = [
                (f.name, f.stat().st_size, str(f.stat().st_mtime_ns)) for f in d.iterdir() if f.is_file()
            ]
            releases.append(Release(self.family, d.name, str(d.resolve()), _fingerprint(files)))
        return sorted(releases, key=lambda r: version_key(r.version))

    def materialize(self, release: Release, dest: Path) -> Path:
        return Path(release.uri)


class S3PrefixSource:
    """Each `s3://bucket/prefix/<version>/` holding config.json and safetensors is a version."""

    def __init__(
        self, bucket: str, prefix: str, family: str, *, client=None, endpoint_url: str | None = None
    ):
        from recycler.store.s3 import s3_client

        self.bucket, self.prefix, self.family = bucket, prefix.strip("/"), check_id(family)
        self.s3 = client or s3_client(endpoint_url)

    def _objects(self, version: str = "") -> list[dict]:
        base = f"{self.prefix}/{version}/" if version else f"{self.prefix}/"
        out: list[dict] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            out += page.get("Contents", [])
        return out

    def list(self) -> list[Release]:
        by_version: dict[str, list[dict]] = {}
        for obj in self._objects():
            rel = obj["Key"][len(self.prefix) + 1 :]
            if "/" not in rel:
                continue
            version, name = rel.split("/", 1)
            if VERSION_PATTERN.match(version) and "/" not in name:
                by_version.setdefault(version, []).append(obj | {"Name": name})
        releases = []
        for version, objs in by_version.items():
            names = {o["Name"] for o in objs}
            if "config.json" in names and any(n.endswith(".safetensors") for n in names):
                fp = _fingerprint((o["Name"], o["Size"], o["ETag"]) for o in objs)
                releases.append(
                    Release(self.family, version, f"s3://{self.bucket}/{self.prefix}/{version}/", fp)
                )
        return sorted(releases, key=lambda r: version_key(r.version))

    def materialize(self, release: Release, dest: Path) -> Path:
        from recycler.io.atomic import atomic_folder

        check_version(release.version)
        if dest.exists():
            return dest
        with atomic_folder(dest) as tmp:
            base = f"{self.prefix}/{release.version}/"
            for obj in self._objects(release.version):
                name = obj["Key"][len(base) :]
                # Only plain file names of known kinds: never a key-derived path, never a pickle.
                if is_release_file(name):
                    self.s3.download_file(self.bucket, obj["Key"], str(tmp / name))
        return dest


class HubSource:
    """Revisions (branches and tags) of one Hub repo, each a version. `api` is an `HfApi` (or a fake)."""

    def __init__(self, repo_id: str, family: str, *, api=None, revisions: re.Pattern | None = None):
        if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", repo_id) or ".." in repo_id:
            raise InvalidReleaseId(f"invalid Hub repo id {repo_id!r}")
        self.repo_id, self.family, self.pattern = repo_id, check_id(family), revisions
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self.api = api

    def list(self) -> list[Release]:
        refs = self.api.list_repo_refs(self.repo_id)
        releases = []
        for ref in [*refs.branches, *refs.tags]:
            if not VERSION_PATTERN.match(ref.name) or (self.pattern and not self.pattern.match(ref.name)):
                continue
            releases.append(
                Release(self.family, ref.name, f"hf://{self.repo_id}@{ref.name}", ref.target_commit)
            )
        return sorted(releases, key=lambda r: version_key(r.version))

    def materialize(self, release: Release, dest: Path) -> Path:
        from huggingface_hub import snapshot_download

        check_version(release.version)
        return Path(
            snapshot_download(
                self.repo_id, revision=release.fingerprint, local_dir=dest, allow_patterns=list(RELEASE_GLOBS)
            )
        )


def open_source(spec: str, family: str, *, endpoint_url: str | None = None, **kw) -> ReleaseSource:
    """`/path/to/folder`, `s3://bucket/prefix` (on `endpoint_url`, e.g. MinIO) or `hf://org/repo`."""
    if spec.startswith("s3://"):
        bucket, _, prefix = spec[5:].partition("/")
        return S3PrefixSource(bucket, prefix, family, endpoint_url=endpoint_url, **kw)
    if spec.startswith("hf://"):
        return HubSource(spec[5:], family, **kw)
    return LocalFolderSource(Path(spec), family)
