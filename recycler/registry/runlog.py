"""Logging into MLflow runs: metrics, curves, figures, artifacts, datasets, training records, lineage.

Every helper takes an explicit `run_id` or uses the active run, and does nothing without either, so
library code calls them unconditionally and runs without tracking pay nothing.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
    """`obj` as a JSON artifact, credentials removed (see recycler.redact)."""
    import json

    log_text_artifact(json.dumps(obj, indent=1, default=str), artifact_file, run_id=run_id)


def log_text_artifact(text: str, artifact_file: str, *, run_id: str | None = None) -> None:
    """`text` as an artifact, credentials removed (see recycler.redact)."""
    if (run_id := _run(run_id)) is not None:
        from mlflow import MlflowClient

        from recycler.redact import redact

        MlflowClient().log_text(run_id, redact(text), artifact_file)


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


def log_lineage(registry: Any, version: Any, *, run_id: str | None = None, max_depth: int = 12) -> None:
    """The lineage of a registered version (this cycle and the ones before): lineage.png (Graphviz),
    lineage.md (Mermaid, previewed by MLflow) and lineage.dot."""
    if (run_id := _run(run_id)) is None:
        return
    from recycler.registry.lineage import lineage
    from recycler.registry.lineage_graph import render_png, to_dot, to_markdown

    tree = lineage(registry, version.name, version.version, max_depth=max_depth)
    log_text_artifact(to_markdown(tree), "lineage.md", run_id=run_id)
    log_text_artifact(to_dot(tree), "lineage.dot", run_id=run_id)
    png = render_png(tree)
    if png is None:
        import logging

        logging.getLogger(__name__).warning(
            "Graphviz `dot` not found: lineage.png not drawn (apt-get install graphviz)"
        )
        return
    log_bytes_artifact(png, "lineage.png", run_id=run_id)


def log_bytes_artifact(data: bytes, artifact_file: str, *, run_id: str | None = None) -> None:
    if (run_id := _run(run_id)) is None:
        return
    import tempfile

    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / artifact_file
        path.write_bytes(data)
        MlflowClient().log_artifact(run_id, str(path))


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


def set_run_tags(run_id: str | None, tags: Mapping[str, str]) -> None:
    if run_id is not None:
        from mlflow import MlflowClient
        from mlflow.entities import RunTag

        from recycler.redact import scrub

        MlflowClient().log_batch(run_id, tags=[RunTag(k, v) for k, v in scrub(tags).items()])


def set_note(run_id: str | None, markdown: str) -> None:
    """The run's description (MLflow renders it as Markdown on the run page)."""
    if run_id is not None:
        from mlflow import MlflowClient

        from recycler.redact import redact

        MlflowClient().set_tag(run_id, "mlflow.note.content", redact(markdown))
