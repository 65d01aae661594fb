"""MLflow runs for recycler commands and flows, and redaction of credentials from every log record.

Tracking is opt-in (`--track` on the CLI, `RECYCLER_TRACK=1`, or `enabled=True`): without it
`tracked_run` yields None and the `log_*` helpers do nothing, so library code can call them
unconditionally and the Δ commands never pay MLflow's ~2 s import.

Credentials never reach MLflow or logs (RELIABILITY.md R7): params and tags are scrubbed, and
`install_redaction` replaces the values of SECRET_ENV variables in every log record. It installs a
`logging.Filter` on the root logger and its handlers and, because filters on a logger do not see
records propagated from child loggers (botocore, urllib3, mlflow), also a log-record factory that
redacts each record when it is created.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.entities import Run

    from recycler.settings import Settings

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN")
REDACTED = "***"
_SECRET_KEY = re.compile(r"secret|token|password|passwd|credential|api[_-]?key", re.IGNORECASE)
_MAX_PARAM = 6000  # MLflow's limit on a param value


# ---------------------------------------------------------------------------------------------- redaction


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


# ---------------------------------------------------------------------------------------------- runs


_prepared: set[str] = set()


def prepare_store(*uris: str) -> None:
    """Create a local SQLite MLflow store once, under a file lock, before anything else touches it.

    MLflow creates and migrates an empty SQLite database on first use, without a lock: two processes
    starting on a fresh home (two watchers, a worker and a CLI call) race on the schema and one dies
    with "table already exists". Remote stores are created by their server and need nothing.
    """
    import fcntl

    from mlflow import MlflowClient

    for uri in dict.fromkeys(uris):
        if not uri.startswith("sqlite:///") or uri in _prepared:
            continue
        db = Path(uri[len("sqlite:///") :].partition("?")[0])
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".init-lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if we die
            client = MlflowClient(uri, uri)
            client.search_experiments(max_results=1)  # tracking tables + migrations
            client.search_registered_models(max_results=1)  # registry tables
        _prepared.add(uri)


def tracking_enabled(enabled: bool | None = None) -> bool:
    if enabled is not None:
        return enabled
    return os.environ.get("RECYCLER_TRACK", "").strip().lower() in ("1", "true", "yes", "on")


def _experiment_id(settings: Settings) -> str:
    """Create the experiment on first use; with a local tracking store keep its artifacts under home
    (MLflow would otherwise put them in ./mlruns relative to whatever the working directory is)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    prepare_store(settings.tracking_uri, settings.registry_uri)
    client = MlflowClient(settings.tracking_uri, settings.registry_uri)
    if exp := client.get_experiment_by_name(settings.experiment):
        return exp.experiment_id
    remote = settings.tracking_uri.startswith(("http://", "https://", "databricks"))
    location = None if remote else (settings.home / "mlruns").as_uri()
    try:
        return client.create_experiment(settings.experiment, artifact_location=location)
    except MlflowException:  # created concurrently
        exp = client.get_experiment_by_name(settings.experiment)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def tracked_run(
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
    enabled: bool | None = None,
) -> Iterator[Run | None]:
    """An MLflow run around a block (nested if a run is active), or None when tracking is off.

    An exception inside the block marks the run FAILED and propagates.
    """
    if not tracking_enabled(enabled):
        yield None
        return
    import mlflow

    from recycler.settings import get_settings

    settings = settings or get_settings()
    install_redaction()
    settings.home.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)
    experiment_id = _experiment_id(settings)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=name, experiment_id=experiment_id, tags=scrub(tags), nested=nested) as run:
        if params:
            mlflow.log_params(scrub(params))
        yield run


@contextmanager
def maybe_track(
    command_name: str, params: Mapping[str, Any], *, enabled: bool | None = None
) -> Iterator[Run | None]:
    """What the CLI wraps around diff/apply/finetune/evaluate: a run named `recycler <command>`
    with the command's options as params and its wall time as the metric `duration_s`."""
    start = time.perf_counter()
    with tracked_run(
        f"recycler {command_name}",
        params=params,
        tags={"recycler.command": command_name},
        enabled=enabled,
    ) as run:
        yield run
        if run is not None:
            import mlflow

            mlflow.log_metric("duration_s", time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- helpers


def _active_run_id() -> str | None:
    import sys

    if "mlflow" not in sys.modules:  # never imported: no run can be active
        return None
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def log_curve(key: str, points: list[tuple[int, float]]) -> None:
    """Log (step, value) pairs as one step metric, in batches (one request per 1000 points)."""
    if (run_id := _active_run_id()) is None or not points:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(v), now, int(step)) for step, v in points]
    client = MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def log_json_artifact(obj: Any, artifact_file: str) -> None:
    if _active_run_id() is None:
        return
    import mlflow

    mlflow.log_dict(obj, artifact_file)


def log_text_artifact(text: str, artifact_file: str) -> None:
    if _active_run_id() is None:
        return
    import mlflow

    mlflow.log_text(text, artifact_file)


def log_figure(fig: Figure, artifact_file: str = "figure.png") -> None:
    """A matplotlib figure as a PNG artifact (the extension picks the format)."""
    if _active_run_id() is None:
        return
    import mlflow

    mlflow.log_figure(fig, artifact_file)


def log_dataset(path: Path, context: str, *, name: str | None = None) -> dict | None:
    """Record a local JSONL file as a run input: its path is the source, its sha256 the identity.

    Nothing is uploaded. The full sha256, size and line count go into the input's tags (MLflow's
    digest column holds 36 characters, so the digest is the sha256's first 32 hex digits).
    """
    if _active_run_id() is None:
        return None
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from recycler.store import hash_file

    path = Path(path).resolve()
    sha, size = hash_file(path)
    with open(path, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    with warnings.catch_warnings():  # MLflow registers two identical local sources ('' and file:)
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
        source = resolve_dataset_source(str(path))
    dataset = MetaDataset(source, name=name or path.stem, digest=sha[:32])
    tags = {"sha256": sha, "bytes": str(size), "lines": str(lines)}
    mlflow.log_input(dataset, context=context, tags=tags)
    return {"name": dataset.name, "source": str(path), **tags}


def log_training_record(record: Mapping[str, Any], folder: Path | None = None) -> None:
    """A fine-tune's record in the active run: loss and eval curves as step metrics, totals as metrics,
    the record itself and its convergence plot as artifacts."""
    if (run_id := _active_run_id()) is None:
        return
    import mlflow

    log_curve("train_loss", [tuple(p) for p in record.get("loss_per_step") or []])
    log_curve("eval_score", [tuple(p) for p in record.get("curve") or []])
    totals = {k: record[k] for k in ("steps", "wall_time_s", "tokens_per_s") if record.get(k) is not None}
    if totals:
        mlflow.log_metrics({k: float(v) for k, v in totals.items()}, run_id=run_id)
    log_json_artifact(dict(record), "training_record.json")
    if folder is not None and (plot := Path(folder) / "convergence.png").is_file():
        mlflow.log_artifact(str(plot), run_id=run_id)
