"""Artifact store: content-addressed folders on a local disk or in S3, published manifest-last.

`open_store(settings)` gives the store named by RECYCLER_ARTIFACT_STORE (a folder, the embedded
default, or `s3://bucket/prefix`); `resolve_uri` turns an artifact URI back into its store and ref.
boto3 is imported only inside recycler.store.s3, and only when an S3 store is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from recycler.io.manifest import HEX64
from recycler.store.artifact import KINDS, ArtifactRef, ArtifactStore, ensure_manifest, prepare

if TYPE_CHECKING:
    from recycler.settings import Settings

__all__ = ["KINDS", "ArtifactRef", "ArtifactStore", "ensure_manifest", "open_store", "prepare", "resolve_uri"]


def _s3(bucket_prefix: str, settings: Settings, **kw) -> ArtifactStore:
    from recycler.store.s3 import S3Store, split_s3

    bucket, prefix = split_s3(bucket_prefix)
    return S3Store(
        bucket,
        prefix,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        max_concurrency=settings.s3_max_concurrency,
        multipart_chunk_mb=settings.s3_multipart_chunk_mb,
        **kw,
    )


def open_store(settings: Settings, **s3_options) -> ArtifactStore:
    """The store named by `settings.artifact_store` (a local folder or s3://bucket/prefix).

    `s3_options` go to S3Store (e.g. `client=` a client with short timeouts, as `recycler doctor` uses).
    """
    from recycler.store.local import LocalStore

    if settings.artifact_store.startswith("s3://"):
        return _s3(settings.artifact_store, settings, **s3_options)
    return LocalStore(Path(settings.artifact_store))


def resolve_uri(uri: str, settings: Settings) -> tuple[ArtifactStore, ArtifactRef]:
    """Turn an artifact URI (`s3://bucket/prefix/<kind>/<digest>` or `<root>/<kind>/<digest>`) into
    its store and ref; S3 endpoint and transfer options come from `settings`."""
    from recycler.store.local import LocalStore

    head, kind, digest = uri.rstrip("/").rsplit("/", 2) if uri.count("/") >= 2 else ("", "", "")
    if kind not in KINDS or not HEX64.match(digest):
        raise ValueError(f"{uri!r} is not an artifact URI (expected …/<{'|'.join(KINDS)}>/<sha256>)")
    store = _s3(head, settings) if uri.startswith("s3://") else LocalStore(Path(head))
    return store, store.ref(kind, digest)
