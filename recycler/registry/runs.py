"""MLflow runs for recycler commands and flows: opened, resumed by key, and logged to.

Tracking is opt-in (`--track` on the CLI, `RECYCLER_TRACK=1`, or `enabled=True`): without it
`tracked_run` yields None and the `log_*` helpers do nothing, so library code can call them
unconditionally and the Δ commands never pay MLflow's ~2 s import. Params and tags pass through
`recycler.redact.scrub`, so credentials never reach the tracking server.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recycler.redact import install_redaction, scrub

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.entities import Run

    from recycler.settings import Settings


# ---------------------------------------------------------------------------------------------- runs


_prepared: set[str] = set()


def prepare_store(*uris: str) -> None:
    """Create a local SQLite MLflow store once, under a file lock, before anything else touches it.

    MLflow creates and migrates an empty SQLite database on first use, without a lock: two processes
    starting on a fresh home (two watchers, a worker and a CLI call) race on the schema and one dies
    with "table already exists". Remote stores are created by their server and need nothing.
    """
    from filelock import FileLock
    from mlflow import MlflowClient

    from recycler.settings import sqlite_path

    for uri in dict.fromkeys(uris):
        if (db := sqlite_path(uri)) is None or uri in _prepared:
            continue
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(db.with_name(db.name + ".init-lock")):  # an OS lock: released if we die
            client = MlflowClient(uri, uri)
            client.search_experiments(max_results=1)  # tracking tables + migrations
            client.search_registered_models(max_results=1)  # registry tables
        _prepared.add(uri)


def tracking_enabled(enabled: bool | None = None) -> bool:
    if enabled is not None:
        return enabled
    return os.environ.get("RECYCLER_TRACK", "").strip().lower() in ("1", "true", "yes", "on")


def experiment_id(settings: Settings) -> str:
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
    exp = experiment_id(settings)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=name, experiment_id=exp, tags=scrub(tags), nested=nested) as run:
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


CYCLE_TAG = "recycler.cycle"  # run tag: the cycle's key, how a re-run finds (and resumes) its run


@contextmanager
def cycle_run(
    key: str,
    name: str,
    params: Mapping[str, Any],
    *,
    settings: Settings | None = None,
    enabled: bool | None = None,
) -> Iterator[str | None]:
    """One MLflow run per release cycle, resumed (not duplicated) when the cycle is re-run.

    Tracking is on unless RECYCLER_TRACK=0 (the service's runs are its audit trail). Yields the run id,
    or None when tracking is off.
    """
    if not tracking_enabled(enabled if enabled is not None else os.environ.get("RECYCLER_TRACK", "1") != "0"):
        yield None
        return
    import mlflow

    from recycler.settings import get_settings

    install_redaction()
    settings = settings or get_settings()
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)
    exp = experiment_id(settings)
    found = mlflow.search_runs(
        [exp], filter_string=f"tags.`{CYCLE_TAG}` = '{key}'", output_format="list", max_results=1
    )
    run_id = found[0].info.run_id if found else None
    with mlflow.start_run(
        run_id=run_id, run_name=None if run_id else name, experiment_id=exp, tags={CYCLE_TAG: key}
    ) as run:
        if not run_id:
            mlflow.log_params(scrub(params))
        yield run.info.run_id


def log_metrics(metrics: Mapping[str, float | int | None], *, run_id: str | None = None) -> None:
    """Metrics of a run (default: the active one; None values skipped); nothing without a run."""
    if (run_id := _run(run_id)) is None:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
    if batch:
        MlflowClient().log_batch(run_id, metrics=batch)


def log_evaluation(result: Any) -> None:
    """An evaluation's score, count and records in the active run (the `recycler evaluate --track` run)."""
    if _active_run_id() is None:
        return
    import mlflow

    mlflow.log_metric(result.metric, result.score)
    mlflow.log_metric("n", result.n)
    log_json_artifact(result.model_dump(), "evaluation.json")


# ---------------------------------------------------------------------------------------------- helpers


def _active_run_id() -> str | None:
    import sys

    if "mlflow" not in sys.modules:  # never imported: no run can be active
        return None
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def _run(run_id: str | None) -> str | None:
    return run_id or _active_run_id()


def log_curve(key: str, points: list[tuple[int, float]], *, run_id: str | None = None) -> None:
    """Log (step, value) pairs as one step metric, in batches (one request per 1000 points)."""
    if (run_id := _run(run_id)) is None or not points:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(v), now, int(step)) for step, v in points]
    client = MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def log_json_artifact(obj: Any, artifact_file: str, *, run_id: str | None = None) -> None:
    if (run_id := _run(run_id)) is not None:
        from mlflow import MlflowClient

        MlflowClient().log_dict(run_id, obj, artifact_file)


def log_text_artifact(text: str, artifact_file: str, *, run_id: str | None = None) -> None:
    if (run_id := _run(run_id)) is not None:
        from mlflow import MlflowClient

        MlflowClient().log_text(run_id, text, artifact_file)


def log_figure(fig: Figure, artifact_file: str = "figure.png", *, run_id: str | None = None) -> None:
    """A matplotlib figure as a PNG artifact (the extension picks the format)."""
    if (run_id := _run(run_id)) is not None:
        from mlflow import MlflowClient

        MlflowClient().log_figure(run_id, fig, artifact_file)


def log_artifact(path: Path, *, run_id: str | None = None) -> None:
    """A local file as an artifact of a run (default: the active one)."""
    if (run_id := _run(run_id)) is not None:
        from mlflow import MlflowClient

        MlflowClient().log_artifact(run_id, str(path))


def log_lineage(registry: Any, version: Any, *, run_id: str | None = None, max_depth: int = 8) -> None:
    """The lineage of a registered version (this cycle and the ones before) as a picture and Mermaid."""
    if (run_id := _run(run_id)) is None:
        return
    from recycler.registry.lineage import lineage
    from recycler.registry.lineage_plot import lineage_figure

    tree = lineage(registry, version.name, version.version, max_depth=max_depth)
    log_figure(lineage_figure(tree), "lineage.png", run_id=run_id)
    log_text_artifact(tree.to_mermaid(), "lineage.mmd", run_id=run_id)


def convergence_figure(recycled: Mapping[str, Any], baseline: Mapping[str, Any], version: str) -> Figure:
    """Accuracy against step of FT from M_i + Δ and FT from M_i, on one axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, rec in (("FT from M_i + Δ", recycled), ("FT from M_i", baseline)):
        if rec.get("curve"):
            steps, acc = zip(*rec["curve"], strict=True)
            ax.plot(steps, acc, marker="o", label=label)
    ax.set(xlabel="step", ylabel="accuracy", title=f"convergence on base {version}")
    ax.legend()
    fig.tight_layout()
    return fig


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

    from recycler.io.manifest import sha256_file

    path = Path(path).resolve()
    digest = sha256_file(path)
    sha, size = digest.sha256, digest.size
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
