"""MLflow runs for recycler commands and flows: opened, resumed by key, and logged to.

Tracking is opt-in (`--track` on the CLI, `RECYCLER_TRACK=1`, or `enabled=True`): without it
`tracked_run` yields None and the `log_*` helpers do nothing, so library code can call them
unconditionally and the Δ commands never pay MLflow's ~2 s import. Params and tags pass through
`recycler.redact.scrub`, so credentials never reach the tracking server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recycler.redact import install_redaction, redact, scrub
from recycler.registry.links import EXPERIMENT_KIND

if TYPE_CHECKING:
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
    """Create the experiment on first use, tagged so the UI opens it on its runs (not the GenAI pages);
    with a local tracking store keep its artifacts under home (MLflow would otherwise put them in
    ./mlruns relative to whatever the working directory is)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    prepare_store(settings.tracking_uri, settings.registry_uri)
    client = MlflowClient(settings.tracking_uri, settings.registry_uri)
    if exp := client.get_experiment_by_name(settings.experiment):
        if not EXPERIMENT_KIND.items() <= exp.tags.items():  # made by an older recycler or by hand
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    remote = settings.tracking_uri.startswith(("http://", "https://", "databricks"))
    location = None if remote else (settings.home / "mlruns").as_uri()
    try:
        return client.create_experiment(settings.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
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
    run_id: str | None = None,
) -> Iterator[Run | None]:
    """An MLflow run around a block (nested if a run is active), or None when tracking is off.

    With `run_id`, that existing run is resumed instead (a cycle's fine-tune step hands its child run
    to the training process this way). An exception inside the block marks the run FAILED.
    """
    if not tracking_enabled(True if run_id else enabled):
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
    named = (
        {"run_id": run_id, "nested": nested}
        if run_id
        else {"run_name": name, "experiment_id": exp, "nested": nested}
    )
    with mlflow.start_run(**named, tags=scrub(tags)) as run:
        if params:
            mlflow.log_params(scrub(params))
        yield run


@contextmanager
def maybe_track(
    command_name: str, params: Mapping[str, Any], *, enabled: bool | None = None, run_id: str | None = None
) -> Iterator[Run | None]:
    """What the CLI wraps around diff/apply/finetune/evaluate: a run named `recycler <command>` (or the
    existing run `run_id`) with the command's options as params and its wall time as `duration_s`."""
    start = time.perf_counter()
    with tracked_run(
        f"recycler {command_name}",
        params=params,
        tags={"recycler.command": command_name},
        enabled=enabled,
        run_id=run_id,
    ) as run:
        yield run
        if run is not None:
            import mlflow

            mlflow.log_metric("duration_s", time.perf_counter() - start)


CYCLE_TAG = "recycler.cycle"  # run tag: the cycle's key, how a re-run finds (and resumes) its run
TRANSFER_TAG = "recycler.transfer"  # the same for a manual backport or recycle


@contextmanager
def keyed_run(
    key: str,
    name: str,
    params: Mapping[str, Any],
    *,
    tag: str = CYCLE_TAG,
    settings: Settings | None = None,
    enabled: bool | None = None,
) -> Iterator[str | None]:
    """One MLflow run per piece of service work (a release cycle, a transfer), found by `tag = key`
    and resumed, not duplicated, when the work is re-run.

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
        [exp], filter_string=f"tags.`{tag}` = '{key}'", output_format="list", max_results=1
    )
    run_id = found[0].info.run_id if found else None
    with mlflow.start_run(
        run_id=run_id, run_name=None if run_id else name, experiment_id=exp, tags={tag: key}
    ) as run:
        if not run_id:
            mlflow.log_params(scrub(params))
        yield run.info.run_id


def finish_keyed_run(key: str, settings: Settings, note: str, *, tag: str = CYCLE_TAG) -> None:
    """End the keyed run of finished work that a crash left RUNNING (FINISHED, with `note` appended
    to its description); nothing if tracking is off or the run is not RUNNING."""
    if not tracking_enabled(os.environ.get("RECYCLER_TRACK", "1") != "0"):
        return
    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.experiment)
    found = client.search_runs([exp.experiment_id], f"tags.`{tag}` = '{key}'", max_results=1) if exp else []
    if not found or found[0].info.status != "RUNNING":
        return
    run = found[0]
    before = run.data.tags.get("mlflow.note.content", "")
    client.set_tag(
        run.info.run_id, "mlflow.note.content", redact(f"{before}\n\n_Closed by a re-run: {note}._\n")
    )
    client.set_terminated(run.info.run_id, "FINISHED")


@contextmanager
def child_run(
    parent_run_id: str | None,
    name: str,
    *,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
) -> Iterator[str | None]:
    """A run shown nested under `parent_run_id` (a step of a cycle: apply, fine-tune, evaluate),
    ended FINISHED, or FAILED if the block raises. Nothing (None) without a parent run."""
    if parent_run_id is None:
        yield None
        return
    from mlflow import MlflowClient

    client = MlflowClient()  # the tracking URI of the parent's keyed_run
    parent = client.get_run(parent_run_id)
    run = client.create_run(
        parent.info.experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_run_id, **scrub(tags)}
    )
    if params:
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in scrub(params).items()])
    try:
        yield run.info.run_id
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def run_url(run_id: str, settings: Settings) -> str:
    """The full address of a run's page in the MLflow UI (`settings.ui_url`)."""
    from mlflow import MlflowClient

    from recycler.registry.links import run_path, url

    experiment = MlflowClient(settings.tracking_uri).get_run(run_id).info.experiment_id
    return url(settings.ui_url, run_path(experiment, run_id))


@dataclass(frozen=True)
class RunReadback:
    """What a keyed run recorded: its final metrics and, for step metrics, their histories."""

    run_id: str
    metrics: dict[str, float]
    curves: dict[str, list[list[float]]]  # key → [[step, value], …] in step order


def read_keyed_run(
    settings: Settings, key: str, curves: tuple[str, ...] = (), *, tag: str = CYCLE_TAG
) -> RunReadback | None:
    """The run of a piece of service work, read back from MLflow. `key` is a run's key, or its start
    followed by `@` (a cycle: `family/variant/version@`, any content of that version; the newest)."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.experiment)
    match = f"LIKE '{key}%'" if key.endswith("@") else f"= '{key}'"
    order = ["attributes.start_time DESC"]
    found = client.search_runs([exp.experiment_id], f"tags.`{tag}` {match}", max_results=1, order_by=order) if exp else []  # fmt: skip
    if not found:
        return None
    run_id, metrics = found[0].info.run_id, dict(found[0].data.metrics)
    histories = {
        c: [
            [float(m.step), float(m.value)]
            for m in sorted(client.get_metric_history(run_id, c), key=lambda m: m.step)
        ]
        for c in curves
        if c in metrics
    }
    return RunReadback(run_id, metrics, histories)
