"""`recycler cycle`, `recycler watch`, `recycler backport`, `recycler serve`: the service's flows by hand.

A family's cycle settings live in a YAML file (the fields of `recycler.cycle.CycleSpec`):

    family: llama-3-8b
    variant: instruct
    train: data/instruct-train.jsonl
    eval_task: data/heldout.jsonl
    finetune: {learning_rate: 5.0e-6, batch_size: 8, epochs: 2}
    gate_margin: 0.01
    baseline: false

Without PREFECT_API_URL, Prefect runs a temporary local server for the duration of the command; with
it, runs appear in that server's UI. Mounted by the main CLI; flows are imported only when used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

SpecOpt = Annotated[
    Path, typer.Option("--spec", "-s", help="YAML file with the family's cycle settings (CycleSpec fields).")
]
SourceArg = Annotated[
    str,
    typer.Argument(
        help="Release source: a folder of version sub-folders, s3://bucket/prefix or hf://org/repo."
    ),
]


def load_spec(path: Path):
    """A CycleSpec from YAML; relative data paths are taken relative to the YAML file."""
    import yaml

    from recycler.cycle import CycleSpec
    from recycler.errors import RecyclerError

    if not path.is_file():
        raise RecyclerError(f"spec file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecyclerError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise RecyclerError(f"{path}: expected a mapping of CycleSpec fields")
    for key in ("train", "eval_task", "precheck_sample"):
        if isinstance(values.get(key), str) and not Path(values[key]).is_absolute():
            values[key] = str((path.parent / values[key]).resolve())
    try:
        return CycleSpec.model_validate(values)
    except ValueError as e:
        raise RecyclerError(f"{path}: {e}") from None


def _prefect_defaults() -> None:
    """Before Prefect loads: a cold temporary server can take ~20 s to start on a small machine
    (Prefect's own default timeout), and its telemetry only adds SQLite lock noise."""
    import os

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _print(result: object) -> None:
    typer.echo(json.dumps(result, indent=1, default=str))


def cycle_command(
    version: Annotated[str, typer.Argument(help="The base release to process, e.g. v2 or 3.1.")],
    source: SourceArg,
    spec: SpecOpt,
) -> None:
    """Run one release cycle: apply the family's next-diff, fine-tune, evaluate, gate, register."""
    _prefect_defaults()
    from flows.release import release_cycle

    _print(release_cycle(version, source, load_spec(spec)))


def watch_command(
    source: SourceArg,
    spec: SpecOpt,
    deployment: Annotated[
        bool,
        typer.Option(
            "--deployment",
            help="Start release-cycle/gpu on a Prefect server (idempotent per release) instead of running inline.",
        ),
    ] = False,
) -> None:
    """Process every release of SOURCE not processed yet, oldest first (state is in the registry)."""
    _prefect_defaults()
    from flows.release import watch_releases

    _print(watch_releases(source, load_spec(spec), dispatch="deployment" if deployment else "inline"))


def backport_command(
    diff: Annotated[
        str,
        typer.Argument(help="A registered Δ: NAME@ALIAS or NAME/VERSION, e.g. fam-instruct-diff@next-diff."),
    ],
    target: Annotated[str, typer.Argument(help="A registered base version to apply it to, e.g. v1.")],
    family: Annotated[str, typer.Option("--family", help="Model family.")],
    task: Annotated[Path, typer.Option("--task", help="Task JSONL to evaluate base and result on.")],
    variant: Annotated[str, typer.Option("--variant", help="Fine-tuned variant.")] = "instruct",
    alpha: Annotated[float, typer.Option("--alpha", help="Scale of Δ.")] = 1.0,
    extract: Annotated[
        str,
        typer.Option(
            "--extract", help="Answer extraction: 'number' (last number) or 'text' (normalized text)."
        ),
    ] = "number",
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Longest generated answer.")
    ] = 256,
) -> None:
    """Apply a registered Δ to a registered (older) base and register the result, without training."""
    _prefect_defaults()
    from flows.release import EvalOptions, backport

    options = EvalOptions(alpha=alpha, extract=extract, max_new_tokens=max_new_tokens)
    _print(backport(diff, target, family, str(task), variant, options))


def serve_command(
    source: SourceArg,
    spec: SpecOpt,
    interval: Annotated[int, typer.Option("--interval", min=60, help="Seconds between watcher runs.")] = 3600,
) -> None:
    """Serve the watcher (on a schedule) and the manual backport/recycle flows from this process.

    Needs a Prefect server (PREFECT_API_URL): schedules and manual runs are created by the server.
    For a cluster use the deployments in infra/prefect.yaml and workers instead.
    """
    _prefect_defaults()
    from prefect import serve

    from flows.release import backport, recycle, watch_releases

    parameters = {"source": source, "spec": load_spec(spec).model_dump(mode="json")}
    serve(
        watch_releases.to_deployment(
            name="watcher", interval=interval, parameters=parameters, concurrency_limit=1
        ),
        backport.to_deployment(name="manual"),
        recycle.to_deployment(name="manual"),
    )


def register(app: typer.Typer) -> None:
    app.command("cycle")(cycle_command)
    app.command("watch")(watch_command)
    app.command("backport")(backport_command)
    app.command("serve")(serve_command)
