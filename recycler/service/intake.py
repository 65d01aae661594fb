"""What the platforms announce, parsed: Hub webhooks and S3 bucket notifications, before any routing.

Pure functions of the request's bytes and headers, so every refusal is decided (and tested) without
a server. A parse error carries the HTTP status the receiver answers with: 400 for a body that is
not JSON, 422 for JSON of the wrong shape. What is well formed but says nothing about a release (a
discussion, a deleted tag, a dataset repo, an object removed) is not an error: it is returned as an
ignored reason, and the receiver answers 202 so the sender does not retry it.

Shapes (what the senders document):
* Hugging Face Hub webhook (version 3): `{"event": {"action", "scope"}, "repo": {"type", "name", …},
  "updatedRefs": [{"ref": "refs/tags/v2", "oldSha", "newSha"}], "webhook": {"id", "version"}}`; the
  secret set on the webhook arrives verbatim in the `X-Webhook-Secret` header.
* S3 / MinIO event notification: `{"Records": [{"eventName": "ObjectCreated:Put" (MinIO:
  "s3:ObjectCreated:Put"), "s3": {"bucket": {"name"}, "object": {"key", "size", "eTag"}}}]}` with
  URL-encoded keys; MinIO's webhook target sends its `auth_token` as `Authorization: Bearer <token>`.
* Amazon EventBridge (an API destination with a header): `{"source": "aws.s3", "detail-type":
  "Object Created", "detail": {"bucket": {"name"}, "object": {"key"}}}`.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from recycler.store.releases import VERSION_PATTERN

REF_PREFIXES = ("refs/tags/", "refs/heads/")  # what HubSource lists as versions: tags and branches


class BadPayload(ValueError):
    """A request the receiver refuses: `status` is the HTTP answer (400 not JSON, 422 wrong shape)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HubRef:
    """A Hub repository ref that now points at a commit (a tag or branch created or moved)."""

    repo: str
    version: str
    sha: str


@dataclass(frozen=True)
class CreatedObject:
    """An object an S3-compatible store says was created (key decoded)."""

    bucket: str
    key: str


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadPayload(400, f"body is not JSON ({type(e).__name__})") from None


def secret_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison (the time taken does not depend on how much of it matched)."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` (MinIO's auth_token), or the bare header value."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token else authorization.strip()


def _field(obj: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(name)
    return obj


def hub_refs(payload: Any) -> tuple[list[HubRef], list[str]]:
    """The refs a Hub webhook says now point at a commit; and why the rest was ignored."""
    if not isinstance(payload, dict) or not isinstance(payload.get("event"), dict):
        raise BadPayload(422, "not a Hub webhook: no `event` object")
    scope, repo = _field(payload, "event", "scope"), payload.get("repo")
    name, kind = _field(repo, "name"), _field(repo, "type")
    if not isinstance(scope, str) or not isinstance(name, str) or not isinstance(kind, str):
        raise BadPayload(422, "not a Hub webhook: needs event.scope, repo.name and repo.type strings")
    if kind != "model":
        return [], [f"{kind} repo {name}: only model repos carry base releases"]
    if not scope.startswith("repo.content") and scope != "repo":
        return [], [f"{name}: {scope} event, not a content update"]
    updated = payload.get("updatedRefs")
    if updated is None:
        return [], [f"{name}: no updatedRefs (no tag or branch moved)"]
    if not isinstance(updated, list):
        raise BadPayload(422, "updatedRefs is not a list")
    refs, ignored = [], []
    for u in updated:
        ref, sha = _field(u, "ref"), _field(u, "newSha")
        if not isinstance(ref, str):
            raise BadPayload(422, "an updatedRefs entry has no `ref` string")
        version = next((ref[len(p) :] for p in REF_PREFIXES if ref.startswith(p)), None)
        if version is None:
            ignored.append(f"{name}: {ref} is neither a tag nor a branch")
        elif not isinstance(sha, str) or not sha:
            ignored.append(f"{name}: {ref} was deleted")
        elif not VERSION_PATTERN.match(version) or ".." in version:
            ignored.append(f"{name}: {ref} is not a valid version name")
        else:
            refs.append(HubRef(name, version, sha))
    return refs, ignored


def _created(name: Any) -> bool:
    return isinstance(name, str) and name.removeprefix("s3:").startswith("ObjectCreated:")


def s3_objects(payload: Any) -> tuple[list[CreatedObject], list[str]]:
    """The objects an S3/MinIO notification (or an EventBridge event) says were created."""
    if isinstance(payload, dict) and payload.get("source") == "aws.s3" and "detail" in payload:
        bucket, key = _field(payload, "detail", "bucket", "name"), _field(payload, "detail", "object", "key")
        if not isinstance(bucket, str) or not isinstance(key, str):
            raise BadPayload(422, "EventBridge event without detail.bucket.name and detail.object.key")
        if payload.get("detail-type") != "Object Created":
            return [], [f"{payload.get('detail-type')}: not an object creation"]
        return [CreatedObject(bucket, key)], []
    records = payload.get("Records") if isinstance(payload, dict) else None
    if not isinstance(records, list):
        raise BadPayload(422, "not an S3 event notification: no `Records` list")
    objects, ignored = [], []
    for r in records:
        bucket, key = _field(r, "s3", "bucket", "name"), _field(r, "s3", "object", "key")
        if not isinstance(bucket, str) or not isinstance(key, str):
            raise BadPayload(422, "an S3 record without s3.bucket.name and s3.object.key")
        if not _created(_field(r, "eventName")):
            ignored.append(f"{bucket}/{key}: {_field(r, 'eventName')}, not an object creation")
            continue
        objects.append(CreatedObject(bucket, unquote_plus(key)))  # keys arrive URL-encoded
    return objects, ignored
