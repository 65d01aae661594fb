"""Where new base versions come from: a local folder, an S3 prefix, or the Hugging Face Hub.

A release is identified by (family, version, fingerprint). Ids are checked against an allow-list
before any I/O, because they become registry names, lock names and storage paths. The fingerprint is
of content only (sha256 of each file for a folder, ETags for S3, the commit for the Hub; never
timestamps), so a re-published version with other weights is a different release (handled by the
spec's `on_republish`), and a touched file is not.

A release is listed only once it is complete (`missing_parts`): config.json parses, and either an
index whose shards are all present, or one unsharded `model.safetensors`; in a folder every shard
must also be as long as its header declares (a shard caught mid-copy is shorter). S3 objects and Hub
commits appear whole, so there only the set of files is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from recycler.errors import InvalidReleaseId
from recycler.io.layout import INDEX_NAME, RELEASE_GLOBS, SHARD_NAME, is_release_file

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
    incomplete: dict[str, str]  # version → why the last listing left it out (still being copied)

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


SHARDED = re.compile(r"-\d+-of-(\d+)\.safetensors$")  # model-00001-of-00003.safetensors


def missing_parts(names: set[str], read_json: Callable[[str], object]) -> str | None:
    """Why a release with these file names is not complete yet (None: it is). `read_json(name)`
    returns a file's parsed JSON, or None when it does not parse (a file still being written)."""
    if "config.json" not in names or not isinstance(read_json("config.json"), dict):
        return "config.json missing or not complete JSON"
    if INDEX_NAME in names:
        index = read_json(INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            return f"{INDEX_NAME} not complete JSON"
        shards = {str(v) for v in weight_map.values()}
        if absent := sorted(s for s in shards if SHARD_NAME.match(s) and s not in names):
            return f"shards not there yet: {', '.join(absent[:3])}{' …' if len(absent) > 3 else ''}"
        return None
    weights = {n for n in names if n.endswith(".safetensors")}
    if any(SHARDED.search(n) for n in weights):
        return f"sharded weights without {INDEX_NAME} (index not there yet)"
    if not weights:
        return "no safetensors weights yet"
    return None


class DigestCache:
    """sha256 of local files, recomputed only when a file's size, mtime or inode changes: the
    fingerprint is of content (a touched file keeps it), and a poll does not re-read tens of GB."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.known: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                self.known = json.loads(path.read_text())
            except ValueError:
                self.known = {}
        self.dirty = False

    def sha256(self, f: Path) -> str:
        from recycler.io.manifest import sha256_file

        st = f.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        key = str(f.resolve())
        if (hit := self.known.get(key)) and hit[:3] == stamp:
            return hit[3]
        digest = sha256_file(f).sha256
        self.known[key], self.dirty = [*stamp, digest], True
        return digest

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.known))
        os.replace(tmp, self.path)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def folder_missing_parts(d: Path) -> str | None:
    """`missing_parts` of a local folder, plus: every shard is as long as its header declares."""
    from recycler.io.safetensors import declared_size

    names = {f.name for f in d.iterdir() if f.is_file() and not f.name.startswith(".")}
    if why := missing_parts(names, lambda n: _read_json(d / n)):
        return why
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        declared, size = declared_size(d / name), (d / name).stat().st_size
        if declared is None or size < declared:
            return f"{name} is still being written ({size} of {declared or '?'} bytes)"
    return None


class LocalFolderSource:
    """Each complete sub-folder of `root` (`folder_missing_parts`) is a version; `digests`: where the
    file digest cache lives (None: files are hashed on every listing)."""

    def __init__(self, root: Path, family: str, *, digests: Path | None = None):
        self.root, self.family = Path(root), check_id(family)
        self.digests = digests
        self.incomplete: dict[str, str] = {}  # version → why it was not listed (the last listing)

    def list(self) -> list[Release]:
        releases: list[Release] = []
        self.incomplete = {}
        if not self.root.is_dir():
            return []
        cache = DigestCache(self.digests)
        for d in self.root.iterdir():
            if d.name.startswith(".") or not d.is_dir() or not VERSION_PATTERN.match(d.name):
                continue
            if r := self._release(d, cache):
                releases.append(r)
        cache.save()
        return sorted(releases, key=lambda r: version_key(r.version))

    def release(self, version: str) -> Release | None:
        """One version alone (an announcement's check): None while it is not complete, with the
        reason in `incomplete[version]`."""
        check_version(version)
        self.incomplete.pop(version, None)
        if not (self.root / version).is_dir():
            self.incomplete[version] = f"no folder {version} in {self.root}"
            return None
        cache = DigestCache(self.digests)
        found = self._release(self.root / version, cache)
        cache.save()
        return found

    def _release(self, d: Path, cache: DigestCache) -> Release | None:
        if why := folder_missing_parts(d):
            self.incomplete[d.name] = why
            return None
        files = [f for f in d.iterdir() if f.is_file() and is_release_file(f.name)]
        fp = _fingerprint((f.name, f.stat().st_size, cache.sha256(f)) for f in files)
        return Release(self.family, d.name, str(d.resolve()), fp)

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
        self.incomplete: dict[str, str] = {}

    def _base(self, version: str = "") -> str:
        """The key prefix of the source (or of one version): '' at the bucket's root."""
        head = f"{self.prefix}/" if self.prefix else ""
        return f"{head}{version}/" if version else head

    def _objects(self, version: str = "") -> list[dict]:
        base = self._base(version)
        out: list[dict] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            out += page.get("Contents", [])
        return out

    def list(self) -> list[Release]:
        by_version: dict[str, list[dict]] = {}
        for obj in self._objects():
            rel = obj["Key"][len(self._base()) :]
            if "/" not in rel:
                continue
            version, name = rel.split("/", 1)
            if VERSION_PATTERN.match(version) and "/" not in name:
                by_version.setdefault(version, []).append(obj | {"Name": name})
        self.incomplete = {}
        releases = [r for v, objs in by_version.items() if (r := self._release(v, objs))]
        return sorted(releases, key=lambda r: version_key(r.version))

    def release(self, version: str) -> Release | None:
        """One version, listed alone (a notification's check): None while it is not complete, with
        the reason in `incomplete[version]`."""
        check_version(version)
        self.incomplete.pop(version, None)
        base = self._base(version)
        objs = [o | {"Name": o["Key"][len(base) :]} for o in self._objects(version)]
        return self._release(version, [o for o in objs if "/" not in o["Name"]])

    def _release(self, version: str, objs: list[dict]) -> Release | None:
        files = [o for o in objs if is_release_file(o["Name"])]
        names = {o["Name"] for o in files}
        if why := missing_parts(names, lambda n: self._json(version, n)):
            self.incomplete[version] = why
            return None
        fp = _fingerprint((o["Name"], o["Size"], o["ETag"].strip('"')) for o in files)
        return Release(self.family, version, f"s3://{self.bucket}/{self._base(version)}", fp)

    def _json(self, version: str, name: str) -> object:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=f"{self._base(version)}{name}")["Body"].read()
            return json.loads(body)
        except Exception:  # not there, or not JSON: incomplete
            return None

    def materialize(self, release: Release, dest: Path) -> Path:
        from recycler.io.atomic import atomic_folder

        check_version(release.version)
        if dest.exists():
            return dest
        with atomic_folder(dest) as tmp:
            base = self._base(release.version)
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
        self.incomplete: dict[str, str] = {}  # a Hub commit is whole
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


def open_source(
    spec: str, family: str, *, endpoint_url: str | None = None, digests: Path | None = None, **kw
) -> ReleaseSource:
    """`/path/to/folder`, `s3://bucket/prefix` (on `endpoint_url`, e.g. MinIO) or `hf://org/repo`.
    `digests`: the local file digest cache (a folder source's content fingerprints)."""
    if spec.startswith("s3://"):
        bucket, _, prefix = spec[5:].partition("/")
        return S3PrefixSource(bucket, prefix, family, endpoint_url=endpoint_url, **kw)
    if spec.startswith("hf://"):
        return HubSource(spec[5:], family, **kw)
    return LocalFolderSource(Path(spec), family, digests=digests)
