"""Request bodies as the senders document them: a Hugging Face Hub webhook (version 3), an S3 event
notification (AWS and MinIO spellings), an EventBridge "Object Created" event."""

from __future__ import annotations

import json
from urllib.parse import quote_plus

SHA = "5f0c1d2e3b4a5968778695a4b3c2d1e0f9a8b7c6"


def hub_webhook(
    repo: str = "acme/base-llm",
    refs: list[tuple[str, str | None]] | None = None,
    *,
    scope: str = "repo.content",
    action: str = "update",
    repo_type: str = "model",
) -> dict:
    """The Hub's webhook payload: https://huggingface.co/docs/hub/webhooks (fields of huggingface_hub's
    WebhookPayload); `refs`: (ref, newSha) pairs, newSha None for a deleted ref."""
    body = {
        "event": {"action": action, "scope": scope},
        "repo": {
            "type": repo_type,
            "name": repo,
            "id": "6567d3c1e0b0c2a1f4d5e6f7",
            "private": False,
            "url": {
                "web": f"https://huggingface.co/{repo}",
                "api": f"https://huggingface.co/api/models/{repo}",
            },
            "headSha": SHA,
            "owner": {"id": "6567d3c1e0b0c2a1f4d5e600"},
        },
        "webhook": {"id": "6567d3c1e0b0c2a1f4d5e6ff", "version": 3},
    }
    if refs is not None:
        body["updatedRefs"] = [{"ref": r, "oldSha": None, "newSha": sha} for r, sha in refs]
    return body


def s3_notification(
    bucket: str, keys: list[str], *, minio: bool = True, event: str = "ObjectCreated:Put"
) -> dict:
    """One record per key (keys URL-encoded, as S3 sends them). MinIO prefixes event names with `s3:`
    and adds `EventName`/`Key` at the top level."""
    records = [
        {
            "eventVersion": "2.0",
            "eventSource": "minio:s3" if minio else "aws:s3",
            "awsRegion": "us-east-1",
            "eventTime": "2026-12-06T10:00:00.000Z",
            "eventName": f"s3:{event}" if minio else event,
            "userIdentity": {"principalId": "publisher"},
            "requestParameters": {"sourceIPAddress": "127.0.0.1"},
            "responseElements": {"x-amz-request-id": "17A0B1C2D3E4F5A6"},
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "recycler",
                "bucket": {
                    "name": bucket,
                    "ownerIdentity": {"principalId": "publisher"},
                    "arn": f"arn:aws:s3:::{bucket}",
                },
                "object": {
                    "key": quote_plus(key, safe="/"),
                    "size": 1,
                    "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                    "sequencer": "17A0B1C2D3E4F5A6",
                },
            },
        }
        for key in keys
    ]
    body: dict = {"Records": records}
    if minio and keys:
        body = {"EventName": f"s3:{event}", "Key": f"{bucket}/{keys[-1]}", **body}
    return body


def eventbridge(bucket: str, key: str, detail_type: str = "Object Created") -> dict:
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": detail_type,
        "source": "aws.s3",
        "account": "123456789012",
        "time": "2026-12-06T10:00:00Z",
        "region": "us-east-1",
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {"version": "0", "bucket": {"name": bucket}, "object": {"key": key, "size": 1}},
    }


def dumps(body: dict) -> bytes:
    return json.dumps(body).encode()
