"""Artifacts as objects under `s3://bucket/prefix/` (AWS or any S3-compatible endpoint), and the one
place recycler builds a boto3 client.

Transfers go through one s3transfer manager per call, so all files of a folder share
`max_concurrency` (multipart parts and small files alike). The manifest is written last with
`If-None-Match: *` (create-only), so two publishers cannot both "win". Readers re-hash every byte:
botocore skips response checksums of multipart objects, and moto accepts wrong upload checksums.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from recycler.crashpoints import crash_point
from recycler.errors import ArtifactNotFound, VerificationFailed
from recycler.io.atomic import atomic_folder
from recycler.io.layout import MANIFEST_NAME
from recycler.io.manifest import (
    HASH_BLOCK,
    HEX64,
    FileDigest,
    FileEntry,
    fail_if,
    mismatch,
    parse_manifest,
    sha256_file,
    sha256_stream,
)
from recycler.store.artifact import (
    ArtifactRef,
    Progress,
    already_published,
    check_digest,
    check_kind,
    prepare,
)

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    *,
    pool: int = 10,
    connect_timeout: float = 10,
    read_timeout: float = 120,
    attempts: int = 5,
):
    """A boto3 S3 client with standard retries, and log redaction installed first: botocore's DEBUG
    logs carry request headers (session tokens). Credentials come from boto3's own chain (env, IAM)."""
    import boto3
    from botocore.config import Config

    from recycler.redact import install_redaction

    install_redaction()
    config = Config(
        retries={"mode": "standard", "max_attempts": attempts},
        max_pool_connections=pool,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix` → (bucket, prefix)."""
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix


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
        from boto3.s3.transfer import TransferConfig

        if not _BUCKET.match(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        parts = [p for p in prefix.strip("/").split("/") if p]
        if any(p in (".", "..") or "\\" in p for p in parts):
            raise ValueError(f"invalid S3 prefix {prefix!r}")
        self.bucket, self.prefix = bucket, "/".join(parts)
        chunk = multipart_chunk_mb * 1024 * 1024
        self.client = client or s3_client(endpoint_url, region, pool=max(10, 2 * max_concurrency))
        self.max_concurrency = max_concurrency
        self.transfer = TransferConfig(
            multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=max_concurrency
        )

    def key(self, *parts: str) -> str:
        """The object key of `parts` under this store's prefix."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def ref(self, kind: str, digest: str) -> ArtifactRef:
        return ArtifactRef(
            kind, digest, f"s3://{self.bucket}/{self.key(check_kind(kind), check_digest(digest))}"
        )

    def _get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def sizes(self, prefix: str) -> dict[str, int]:
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
        base = self.key(kind, prep.digest)
        mkey = f"{base}/{MANIFEST_NAME}"
        if (existing := self._get(mkey)) is not None:  # already published: nothing to read or send
            return already_published(existing, prep, ref)
        prepare(folder, kind, verify=True)  # never upload bytes that do not match the manifest
        sizes = self.sizes(base)
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
            return already_published(self._get(mkey) or b"", prep, ref)
        return ref

    def _load(self, ref: ArtifactRef) -> tuple[bytes, tuple[FileEntry, ...]]:
        raw = self._get(self.key(ref.kind, ref.digest, MANIFEST_NAME))
        if raw is None:
            raise ArtifactNotFound(f"{ref.uri}: no {MANIFEST_NAME}; not published (or not completely)")
        if hashlib.sha256(raw).hexdigest() != ref.digest:
            raise VerificationFailed(f"{ref.uri}/{MANIFEST_NAME}: sha256 does not match the artifact digest")
        return raw, parse_manifest(raw, f"{ref.uri}/{MANIFEST_NAME}")[1]

    def manifest(self, ref: ArtifactRef) -> dict:
        return json.loads(self._load(ref)[0])

    def _check_listing(self, ref: ArtifactRef, files: Iterable[FileEntry]) -> None:
        """Missing or resized objects fail before a single byte is downloaded."""
        sizes = self.sizes(self.key(ref.kind, ref.digest))
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
        base = self.key(ref.kind, ref.digest)
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
                hashed = list(pool.map(lambda f: (f, sha256_file(tmp / f.rel)), files))
            fail_if([p for f, got in hashed if (p := mismatch(f.rel, f, got))], ref.uri)
            (tmp / MANIFEST_NAME).write_bytes(raw)  # last
        return Path(dest).resolve()

    def exists(self, ref: ArtifactRef) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(ref.kind, ref.digest, MANIFEST_NAME))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _hash_object(self, key: str) -> FileDigest:
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        return sha256_stream(body.iter_chunks(HASH_BLOCK))

    def verify(self, ref: ArtifactRef) -> dict:
        """Stream every object through sha256 (nothing is written to disk)."""
        _, files = self._load(ref)
        self._check_listing(ref, files)
        base = self.key(ref.kind, ref.digest)
        with ThreadPoolExecutor(max_workers=min(4, self.max_concurrency)) as pool:
            hashed = list(pool.map(lambda f: (f, self._hash_object(f"{base}/{f.rel}")), files))
        fail_if([p for f, got in hashed if (p := mismatch(f.rel, f, got))], ref.uri)
        return {"files": len(files), "bytes": sum(f.size for f in files)}

    def list(self, kind: str) -> list[ArtifactRef]:
        base = self.key(check_kind(kind))
        digests = [
            rel.split("/")[0]
            for rel in self.sizes(base)
            if rel.endswith(f"/{MANIFEST_NAME}") and rel.count("/") == 1 and HEX64.match(rel.split("/")[0])
        ]
        return [self.ref(kind, d) for d in sorted(digests)]

    def partial(self, kind: str) -> list[str]:
        """Addresses holding objects but no manifest: a publish that died before its manifest."""
        has_manifest: dict[str, bool] = {}
        for rel in self.sizes(self.key(check_kind(kind))):
            digest, _, file = rel.partition("/")
            if HEX64.match(digest):
                has_manifest[digest] = has_manifest.get(digest, False) or file == MANIFEST_NAME
        return [self.ref(kind, d).uri for d, ok in sorted(has_manifest.items()) if not ok]

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
