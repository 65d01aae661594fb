"""Are the servers a deployment needs there: MLflow (HTTP or a SQLite file) and Prefect."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

from recycler.doctor.result import CheckResult
from recycler.redact import redact
from recycler.settings import sqlite_path


def safe_url(url: str) -> str:
    """`url` without user info or query (where credentials and tokens hide), then redacted."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return redact(urlunsplit((parts.scheme, host, parts.path, "", "")))


def check_http(name: str, url: str, timeout: float) -> CheckResult:
    """GET {url}/health within `timeout` seconds (MLflow and Prefect both serve it)."""
    target = safe_url(f"{url.rstrip('/')}/health")
    try:
        with urllib.request.urlopen(target, timeout=timeout) as r:
            return CheckResult(name=name, status="ok", detail=f"{target}: HTTP {r.status}")
    except urllib.error.HTTPError as e:
        return CheckResult(name=name, status="fail", detail=f"{target}: HTTP {e.code}")
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return CheckResult(name=name, status="fail", detail=f"{target} unreachable ({reason})")


def check_tracking(name: str, uri: str, timeout: float) -> CheckResult:
    """HTTP(S): the server's /health. SQLite: the file exists, or its folder can be created/written."""
    if uri.startswith(("http://", "https://")):
        return check_http(name, uri, timeout)
    path = sqlite_path(uri)
    if path is None:
        scheme = uri.partition(":")[0] or "?"
        return CheckResult(name=name, status="warn", detail=f"{scheme}: reachability not checked by doctor")
    if path.is_file():
        return CheckResult(name=name, status="ok", detail=f"SQLite {path} ({path.stat().st_size} bytes)")
    if path.exists():
        return CheckResult(name=name, status="fail", detail=f"SQLite {path} exists but is not a file")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return CheckResult(
            name=name, status="ok", detail=f"SQLite {path} not created yet (created on first use)"
        )
    return CheckResult(
        name=name, status="fail", detail=f"SQLite {path} cannot be created ({parent} not writable)"
    )
