"""Artifact store: content-addressed folders on a local disk or in S3, published manifest-last.

Layout: `<root>/<kind>/<digest>/<relative path>`, where `kind` is one of KINDS and `digest` is the
sha256 of the folder's manifest.json (which lists every file's sha256 and size, so the digest
fingerprints the whole folder). Keys are built only from the kind allow-list, a hex digest and
manifest-listed relative paths that `safe_relpath` validated, never from release or tensor names.

Publish protocol (RELIABILITY.md R2–R3): every file first, manifest.json last and create-only
(S3 `If-None-Match: *`; locally a temporary folder renamed into place). A prefix without a manifest
is invisible: `exists`, `list` and `fetch` only trust manifests. Publishing the same content again is
a no-op returning the same ref; a conflicting manifest under the same key is an error.

Readers re-hash every byte against the manifest because S3 does not do it for us: botocore skips
response checksums of multipart objects, and moto accepts wrong upload checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from recycler.atomic import TMP_MARK, atomic_folder, fsync_dir, fsync_file
from recycler.checkpoint import MANIFEST_NAME
from recycler.crashpoints import crash_point
from recycler.errors import OutputExists, RecyclerError, VerificationFailed
from recycler.manifest import write_manifest

if TYPE_CHECKING:
    from recycler.settings import Settings

KINDS = ("base", "diff", "model")
MANIFEST_KIND = {"base": "model", "diff": "diff", "model": "model"}  # store kind → manifest "kind"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BLOCK = 8 * 1024 * 1024
Progress = Callable[[int], None] | None


class ArtifactNotFound(RecyclerError):
    """No manifest at the artifact's address: never published, or a publish that did not finish."""

    exit_code = 10


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
class FileEntry:
    rel: str
    sha256: str
    size: int


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
    def abort_stale_uploads(self, older_than: timedelta) -> int: ...


# ---------------------------------------------------------------------------------------------- checks


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"artifact kind {kind!r} is not one of {', '.join(KINDS)}")
    return kind


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise ValueError(f"artifact digest {digest!r} is not a lowercase hex sha256")
    return digest


def safe_relpath(rel: object) -> str:
    """A manifest-listed path, confined to its folder: relative, POSIX, no `..`, `.`, `:`, `\\` or NUL."""
    if not isinstance(rel, str) or not rel or len(rel) > 512 or "\\" in rel or "\x00" in rel:
        raise VerificationFailed(f"manifest lists an unsafe path {rel!r}")
    parts = rel.split("/")  # not PurePosixPath: it silently drops "." and empty parts
    if any(p in ("", ".", "..") or ":" in p for p in parts):
        raise VerificationFailed(f"manifest lists an unsafe path {rel!r}")
    if parts[-1] == MANIFEST_NAME:
        raise VerificationFailed(f"manifest lists {rel!r}; manifests cannot list a manifest")
    return rel


def parse_manifest(raw: bytes, where: str) -> tuple[dict, tuple[FileEntry, ...]]:
    """Decode manifest bytes and validate every listed path, digest and size."""
    try:
        body = json.loads(raw)
        listed = body["files"]
        files = tuple(
            FileEntry(safe_relpath(rel), check_digest(v["sha256"]), int(v["size"]))
            for rel, v in sorted(listed.items())
        )
    except VerificationFailed as e:
        raise VerificationFailed(f"{where}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise VerificationFailed(f"{where}: malformed {MANIFEST_NAME} ({type(e).__name__}: {e})") from None
    if any(f.size < 0 for f in files):
        raise VerificationFailed(f"{where}: negative file size in {MANIFEST_NAME}")
    return body, files


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") for p in PurePosixPath(rel).parts)


def hash_file(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def mismatch(where: str, entry: FileEntry, sha: str, size: int) -> str | None:
    if size != entry.size:
        return f"{where}: size {size} != manifest {entry.size}"
    if sha != entry.sha256:
        return f"{where}: sha256 mismatch (got {sha[:12]}…, manifest {entry.sha256[:12]}…)"
    return None


def fail_if(problems: list[str], what: str) -> None:
    if problems:
        raise VerificationFailed(f"{what}: {len(problems)} problem(s): " + "; ".join(problems))


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
        problems = [p for f in files if (p := mismatch(f.rel, f, *hash_file(folder / f.rel)))]
        fail_if(problems, str(folder))
    return Prepared(folder, raw, hashlib.sha256(raw).hexdigest(), files)


def ensure_manifest(folder: Path, *, kind: str = "model", body: dict | None = None) -> str:
    """Give any HF folder (e.g. a fine-tune's output) a manifest and return its digest.

    An existing manifest is kept. Hidden entries (`.checkpoints/`, `.cache/`) are left out: the
    manifest is built by recycler.manifest.write_manifest in a hard-linked staging copy without them,
    then moved into `folder` atomically, so the folder never shows a half-written manifest.
    """
    from recycler.manifest import manifest_digest

    folder = Path(folder).resolve()
    if (folder / MANIFEST_NAME).is_file():
        return manifest_digest(folder)
    stage = folder.parent / f".{folder.name}.manifest{TMP_MARK}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        shutil.copytree(folder, stage, ignore=shutil.ignore_patterns(".*"), copy_function=_link_or_copy)
        write_manifest(stage, {"kind": MANIFEST_KIND[check_kind(kind)], **(body or {})}, {})
        tmp = folder / f".{MANIFEST_NAME}{TMP_MARK}{os.getpid()}"
        shutil.copyfile(stage / MANIFEST_NAME, tmp)
        fsync_file(tmp)
        os.replace(tmp, folder / MANIFEST_NAME)
        fsync_dir(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest_digest(folder)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard links make the staging copy free; copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_verified(src: Path, dst: Path, entry: FileEntry, on_progress: Progress) -> str | None:
    """Copy one file while hashing it (one read); return a problem naming the file, or None."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(_BLOCK):
            h.update(block)
            fout.write(block)
            size += len(block)
            if on_progress:
                on_progress(len(block))
    return mismatch(str(src), entry, h.hexdigest(), size)


def _already_published(existing: bytes, prep: Prepared, ref: ArtifactRef) -> ArtifactRef:
    """The manifest key is taken: same bytes = this content is published (success), else a conflict."""
    if existing != prep.manifest_bytes:
        raise VerificationFailed(
            f"{ref.uri}: a different {MANIFEST_NAME} is already published under this digest; the store is corrupt"
        )
    return ref


# ---------------------------------------------------------------------------------------------- local


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
            return _already_published((dest / MANIFEST_NAME).read_bytes(), prep, ref)
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
            return _already_published((dest / MANIFEST_NAME).read_bytes(), prep, ref)
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
        src = self._dir(ref.kind, ref.digest)
        problems = []
        for f in files:
            path = src / f.rel
            if not path.is_file():
                problems.append(f"{f.rel}: missing")
            elif p := mismatch(f.rel, f, *hash_file(path)):
                problems.append(p)
        fail_if(problems, ref.uri)
        return {"files": len(files), "bytes": sum(f.size for f in files)}

    def list(self, kind: str) -> list[ArtifactRef]:
        base = self.root / check_kind(kind)
        if not base.is_dir():
            return []
        return [
            self.ref(kind, d.name)
            for d in sorted(base.iterdir())
            if _HEX64.match(d.name) and (d / MANIFEST_NAME).is_file()
        ]

    def abort_stale_uploads(self, older_than: timedelta) -> int:
        """Remove temporary folders of publishes that died (the local analogue of orphan multipart uploads)."""
        cutoff, n = time.time() - older_than.total_seconds(), 0
        for kind in KINDS:
            for tmp in (self.root / kind).glob(f".*{TMP_MARK}*") if (self.root / kind).is_dir() else ():
                if tmp.is_dir() and tmp.stat().st_mtime <= cutoff:
                    shutil.rmtree(tmp, ignore_errors=True)
                    n += 1
        return n


# ---------------------------------------------------------------------------------------------- S3


class S3Store:
    """Objects under `s3://bucket/prefix/`. Transfers go through one s3transfer manager per call, so
    all files of a folder share `max_concurrency` (multipart parts and small files alike)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_concurrency: int = 8,
        multipart_chunk_mb: int = 64,
        client: object | None = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        from recycler.tracking import install_redaction

        install_redaction()  # botocore's DEBUG logs carry request headers (session tokens)
        if not _BUCKET.match(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        parts = [p for p in prefix.strip("/").split("/") if p]
        if any(p in (".", "..") or "\\" in p for p in parts):
            raise ValueError(f"invalid S3 prefix {prefix!r}")
        self.bucket, self.prefix = bucket, "/".join(parts)
        chunk = multipart_chunk_mb * 1024 * 1024
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                retries={"mode": "standard", "max_attempts": 5},
                max_pool_connections=max(10, 2 * max_concurrency),
                connect_timeout=10,
                read_timeout=120,
            ),
        )
        self.max_concurrency = max_concurrency
        self.transfer = TransferConfig(
            multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=max_concurrency
        )

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def ref(self, kind: str, digest: str) -> ArtifactRef:
        return ArtifactRef(
            kind, digest, f"s3://{self.bucket}/{self._key(check_kind(kind), check_digest(digest))}"
        )

    def _get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def _sizes(self, prefix: str) -> dict[str, int]:
        """Every object under `prefix/` → size (relative keys)."""
        out: dict[str, int] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix + "/")
        for page in pages:
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix) + 1 :]] = obj["Size"]
        return out

    def _uploaded(self, key: str, entry: FileEntry, sizes: dict[str, int]) -> bool:
        """A rerun skips files an interrupted publish already uploaded with the same sha256."""
        if sizes.get(entry.rel) != entry.size:
            return False
        head = self.client.head_object(Bucket=self.bucket, Key=key)
        return head.get("Metadata", {}).get("sha256") == entry.sha256

    def _manager(self):
        from boto3.s3.transfer import create_transfer_manager

        return create_transfer_manager(self.client, self.transfer)

    def publish(self, folder: Path, kind: str, *, on_progress: Progress = None) -> ArtifactRef:
        from botocore.exceptions import ClientError

        prep = prepare(folder, kind, verify=False)
        ref = self.ref(kind, prep.digest)
        base = self._key(kind, prep.digest)
        mkey = f"{base}/{MANIFEST_NAME}"
        if (existing := self._get(mkey)) is not None:  # already published: nothing to read or send
            return _already_published(existing, prep, ref)
        prepare(folder, kind, verify=True)  # never upload bytes that do not match the manifest
        sizes = self._sizes(base)
        subscribers = _subscribers(on_progress)
        with self._manager() as manager:
            futures = []
            for f in prep.files:
                key = f"{base}/{f.rel}"
                if self._uploaded(key, f, sizes):
                    if on_progress:
                        on_progress(f.size)
                    continue
                extra = {"Metadata": {"sha256": f.sha256}}
                futures.append(manager.upload(str(prep.folder / f.rel), self.bucket, key, extra, subscribers))
            for i, fut in enumerate(futures, 1):
                fut.result()  # the first failure propagates; s3transfer aborts its multipart upload
                crash_point(f"publish:uploaded={i}")
        crash_point("publish:before-manifest")
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=mkey,
                Body=prep.manifest_bytes,
                ContentType="application/json",
                IfNoneMatch="*",  # create-only: two publishers cannot both "win"
                Metadata={"sha256": prep.digest},
            )
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ):
                raise
            return _already_published(self._get(mkey) or b"", prep, ref)
        return ref

    def _load(self, ref: ArtifactRef) -> tuple[bytes, tuple[FileEntry, ...]]:
        raw = self._get(self._key(ref.kind, ref.digest, MANIFEST_NAME))
        if raw is None:
            raise ArtifactNotFound(f"{ref.uri}: no {MANIFEST_NAME}; not published (or not completely)")
        if hashlib.sha256(raw).hexdigest() != ref.digest:
            raise VerificationFailed(f"{ref.uri}/{MANIFEST_NAME}: sha256 does not match the artifact digest")
        return raw, parse_manifest(raw, f"{ref.uri}/{MANIFEST_NAME}")[1]

    def manifest(self, ref: ArtifactRef) -> dict:
        return json.loads(self._load(ref)[0])

    def _check_listing(self, ref: ArtifactRef, files: Iterable[FileEntry]) -> None:
        """Missing or resized objects fail before a single byte is downloaded."""
        sizes = self._sizes(self._key(ref.kind, ref.digest))
        problems = [
            f"{f.rel}: missing"
            if f.rel not in sizes
            else f"{f.rel}: size {sizes[f.rel]} != manifest {f.size}"
            for f in files
            if sizes.get(f.rel) != f.size
        ]
        fail_if(problems, f"{ref.uri} is incomplete")

    def fetch(
        self, ref: ArtifactRef, dest: Path, *, overwrite: bool = False, on_progress: Progress = None
    ) -> Path:
        raw, files = self._load(ref)
        self._check_listing(ref, files)
        base = self._key(ref.kind, ref.digest)
        with atomic_folder(dest, overwrite=overwrite) as tmp:
            with self._manager() as manager:
                futures = []
                for f in files:
                    (tmp / f.rel).parent.mkdir(parents=True, exist_ok=True)
                    futures.append(
                        manager.download(
                            self.bucket, f"{base}/{f.rel}", str(tmp / f.rel), None, _subscribers(on_progress)
                        )
                    )
                for fut in futures:
                    fut.result()
            with ThreadPoolExecutor(max_workers=2) as pool:  # hashlib releases the GIL on large blocks
                hashed = list(pool.map(lambda f: (f, hash_file(tmp / f.rel)), files))
            fail_if([p for f, (sha, size) in hashed if (p := mismatch(f.rel, f, sha, size))], ref.uri)
            (tmp / MANIFEST_NAME).write_bytes(raw)  # last
        return Path(dest).resolve()

    def exists(self, ref: ArtifactRef) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(ref.kind, ref.digest, MANIFEST_NAME))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _hash_object(self, key: str) -> tuple[str, int]:
        h, size = hashlib.sha256(), 0
        for chunk in self.client.get_object(Bucket=self.bucket, Key=key)["Body"].iter_chunks(_BLOCK):
            h.update(chunk)
            size += len(chunk)
        return h.hexdigest(), size

    def verify(self, ref: ArtifactRef) -> dict:
        """Stream every object through sha256 (nothing is written to disk)."""
        _, files = self._load(ref)
        self._check_listing(ref, files)
        base = self._key(ref.kind, ref.digest)
        with ThreadPoolExecutor(max_workers=min(4, self.max_concurrency)) as pool:
            hashed = list(pool.map(lambda f: (f, self._hash_object(f"{base}/{f.rel}")), files))
        fail_if([p for f, (sha, size) in hashed if (p := mismatch(f.rel, f, sha, size))], ref.uri)
        return {"files": len(files), "bytes": sum(f.size for f in files)}

    def list(self, kind: str) -> list[ArtifactRef]:
        base = self._key(check_kind(kind))
        digests = [
            rel.split("/")[0]
            for rel in self._sizes(base)
            if rel.endswith(f"/{MANIFEST_NAME}") and rel.count("/") == 1 and _HEX64.match(rel.split("/")[0])
        ]
        return [self.ref(kind, d) for d in sorted(digests)]

    def abort_stale_uploads(self, older_than: timedelta) -> int:
        """Abort multipart uploads under our prefix started before now − `older_than` (crashed publishers).

        Keep `older_than` above the longest upload you run: a live upload that is aborted fails and must
        be retried. A bucket lifecycle rule (AbortIncompleteMultipartUpload) is the production backstop.
        """
        cutoff = datetime.now(UTC) - older_than
        n = 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else ""
        )
        for page in pages:
            for up in page.get("Uploads", []):
                if up["Initiated"] <= cutoff:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                    )
                    n += 1
        return n


def _subscribers(on_progress: Progress) -> list:
    if on_progress is None:
        return []
    from boto3.s3.transfer import ProgressCallbackInvoker

    return [ProgressCallbackInvoker(on_progress)]


# ---------------------------------------------------------------------------------------------- opening


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix


def open_store(settings: Settings) -> ArtifactStore:
    """The store named by `settings.artifact_store` (a local folder or s3://bucket/prefix)."""
    if settings.artifact_store.startswith("s3://"):
        bucket, prefix = _split_s3(settings.artifact_store)
        return S3Store(
            bucket,
            prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            max_concurrency=settings.s3_max_concurrency,
            multipart_chunk_mb=settings.s3_multipart_chunk_mb,
        )
    return LocalStore(Path(settings.artifact_store))


def resolve_uri(uri: str, settings: Settings) -> tuple[ArtifactStore, ArtifactRef]:
    """Turn an artifact URI (`s3://bucket/prefix/<kind>/<digest>` or `<root>/<kind>/<digest>`) into
    its store and ref; S3 endpoint and transfer options come from `settings`."""
    head, kind, digest = uri.rstrip("/").rsplit("/", 2) if uri.count("/") >= 2 else ("", "", "")
    if kind not in KINDS or not _HEX64.match(digest):
        raise ValueError(f"{uri!r} is not an artifact URI (expected …/<{'|'.join(KINDS)}>/<sha256>)")
    if uri.startswith("s3://"):
        bucket, prefix = _split_s3(head)
        store: ArtifactStore = S3Store(
            bucket,
            prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            max_concurrency=settings.s3_max_concurrency,
            multipart_chunk_mb=settings.s3_multipart_chunk_mb,
        )
    else:
        store = LocalStore(Path(head))
    return store, store.ref(kind, digest)
