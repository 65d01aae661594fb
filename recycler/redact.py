"""Credentials never reach logs, MLflow params/tags or artifacts (RELIABILITY.md R7).

`install_redaction` replaces the values of SECRET_ENV variables in every log record. It installs a
`logging.Filter` on the root logger and its handlers and, because filters on a logger do not see
records propagated from child loggers (botocore, urllib3, mlflow), also a log-record factory that
redacts each record when it is created. `scrub` flattens and cleans params and tags before they are
logged. No MLflow or boto3 here: both the registry and the store use it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN")
REDACTED = "***"
_SECRET_KEY = re.compile(r"secret|token|password|passwd|credential|api[_-]?key", re.IGNORECASE)
_MAX_PARAM = 6000  # MLflow's limit on a param value


def secret_values() -> list[str]:
    """Current values of SECRET_ENV (read each time: tests and credential refreshes change them)."""
    values = {os.environ.get(k, "") for k in SECRET_ENV}
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    for s in secret_values() if secrets is None else secrets:
        text = text.replace(s, REDACTED)
    return text


def redact_record(record: logging.LogRecord) -> None:
    """Rewrite a record in place so that no secret appears in its message, traceback or stack."""
    secrets = secret_values()
    if not secrets:
        return
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: leave it to logging's own error handling
        return
    if any(s in message for s in secrets):
        record.msg, record.args = redact(message, secrets), None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text, secrets)
    if record.stack_info:
        record.stack_info = redact(record.stack_info, secrets)


class SecretRedactor(logging.Filter):
    """Never drops a record; only rewrites it."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def install_redaction() -> None:
    """Idempotent: redact secrets in every record from every logger (see the module docstring)."""
    root = logging.getLogger()
    for target in (root, *root.handlers):
        if not any(isinstance(f, SecretRedactor) for f in target.filters):
            target.addFilter(SecretRedactor())
    previous = logging.getLogRecordFactory()
    if getattr(previous, "recycler_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        redact_record(record)
        return record

    factory.recycler_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def scrub(values: Mapping[str, Any] | None) -> dict[str, str]:
    """Flatten nested dicts to dotted keys, stringify, and blank anything that looks like a credential."""
    out: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v)
            return
        text = redact(str(value))
        out[prefix] = REDACTED if _SECRET_KEY.search(prefix) else text[:_MAX_PARAM]

    visit("", dict(values or {}))
    return out
