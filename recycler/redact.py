"""Credentials never reach logs, MLflow params/tags or artifacts (RELIABILITY.md R7).

`install_redaction` replaces credential values (those of SECRET_ENV and of any variable named like a
credential, plus anything shaped like a key, token or URL password) in every log record. It installs a
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

SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "PREFECT_API_KEY", "DATABRICKS_TOKEN", "GITHUB_TOKEN",
    "WANDB_API_KEY", "OPENAI_API_KEY", "AZURE_STORAGE_KEY", "GOOGLE_APPLICATION_CREDENTIALS_JSON",
)  # fmt: skip
REDACTED = "***"
_MAX_PARAM = 6000  # MLflow's limit on a param value

# A key names a secret when its last word is a secret noun (`hf_token`, `db.password`, `clientSecret`),
# or its last two are (`api_key`, `secret_access_key`). Words, not substrings: `eval_max_new_tokens`,
# `pad_token_id` and `tokenizer` are ordinary parameters. A `<special>_token` names a tokenizer string.
_SECRET_LAST = {"secret", "password", "passwd", "pwd", "token", "credential", "credentials", "apikey", "passphrase"}  # fmt: skip
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("account", "key"), ("auth", "header")}  # fmt: skip
_TOKENIZER_WORDS = {
    "pad",
    "eos",
    "bos",
    "unk",
    "sep",
    "cls",
    "mask",
    "special",
    "start",
    "end",
    "image",
    "audio",
}
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z]|\b|[^A-Za-z]|$)|[A-Z]?[a-z]+|\d+")

# Values that are credentials whatever their key: cloud and hub keys, bearer tokens, JWTs, private keys,
# and the password in a URL's user info (kept: scheme, user, host).
_SECRET_VALUE = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\bhf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|\b(?:ghp|gho|ghs|ghu|github_pat)_[A-Za-z0-9_]{20,}"  # GitHub
    r"|\bsk-[A-Za-z0-9_-]{20,}"  # OpenAI-style
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bdapi[0-9a-f]{32}"  # Databricks
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r"|(?i:bearer\s+)[A-Za-z0-9._~+/-]{16,}=*"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
    re.S,
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+(?=@)", re.I)


def key_is_secret(key: str) -> bool:
    """Whether a parameter/tag/variable name names a credential (see the rules above)."""
    words = [w.lower() for part in key.split(".")[-1:] for w in _WORD.findall(part)]
    if not words:
        return False
    if words[-1] == "token":
        return len(words) == 1 or words[-2] not in _TOKENIZER_WORDS
    return words[-1] in _SECRET_LAST or tuple(words[-2:]) in _SECRET_PAIRS


# Names that match the rules above but hold no credential: the shell's working directories (`pwd` is
# also short for password). Scrubbing their values blanked every path under the checkout.
NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})


def _is_path(value: str) -> bool:
    """An existing absolute path is where a credential may be kept (GOOGLE_APPLICATION_CREDENTIALS),
    never the credential itself; blanking it would blank every path beneath it."""
    try:
        return os.path.isabs(value) and os.path.exists(value)
    except (OSError, ValueError):
        return False


def secret_values() -> list[str]:
    """Current values of credential variables: SECRET_ENV and any variable whose name is a secret's
    (read each time: tests and credential refreshes change them). Short values are left out, since
    replacing `1` or `true` everywhere would only garble text."""
    values = {os.environ.get(k, "") for k in SECRET_ENV}
    # list(os.environ) is one snapshot of the names; .get, because another thread (MLflow's telemetry) may
    # delete a variable between the snapshot and the read: iterating .items() then raises KeyError
    values |= {
        v
        for k in list(os.environ)
        if key_is_secret(k)
        and k not in NOT_SECRET_ENV
        and len(v := os.environ.get(k, "")) >= 8
        and not _is_path(v)
    }
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` without the current credential values and anything shaped like a credential."""
    for s in secret_values() if secrets is None else secrets:
        text = text.replace(s, REDACTED)
    text = _SECRET_VALUE.sub(REDACTED, text)
    return _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, text)


def redact_record(record: logging.LogRecord) -> None:
    """Rewrite a record in place so that no secret appears in its message, traceback or stack."""
    secrets = secret_values()
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: leave it to logging's own error handling
        return
    if (cleaned := redact(message, secrets)) != message:
        record.msg, record.args = cleaned, None
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
    """Flatten nested dicts to dotted keys, stringify, blank the values of keys that name a credential
    and remove credentials from the others."""
    out: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v)
            return
        text = redact(str(value))
        out[prefix] = REDACTED if key_is_secret(prefix) else text[:_MAX_PARAM]

    visit("", dict(values or {}))
    return out
