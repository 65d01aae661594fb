"""`recycler cycle | watch | backport | serve | demo`: the service's flows by hand.

Mounted into the `recycler` command through the entry-point group `recycler.cli` (pyproject.toml),
so the library never imports the flows. Prefect is imported inside each command: `recycler --help`
stays fast. Without PREFECT_API_URL, Prefect runs a temporary local server for the duration of a
command; with it, runs appear in that server's UI.

A family's cycle settings live in a YAML file (the fields of `recycler.service.spec.CycleSpec`):

    family: llama-3-8b
    variant: instruct
    train: data/instruct-train.jsonl
    evaluation: {task: data/heldout.jsonl, extract: number}
    finetune: {learning_rate: 5.0e-6, batch_size: 8, epochs: 2}
    gate_margin: 0.01

`recycler init-spec` writes a commented template with every field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

SERVED = "served"  # deployment name of `recycler serve` (infra/prefect.yaml uses watcher/gpu/manual)

SpecOpt = Annotated[
    Path, typer.Option("--spec", "-s", help="YAML file with the family's cycle settings (CycleSpec fields).")
]
SourceArg = Annotated[
    str,
    typer.Argument(
        help="Release source: a folder of version sub-folders, s3://bucket/prefix or hf://org/repo."
    ),
]


def _prefect_defaults() -> None:
    """Before Prefect loads: a cold temporary server can take ~20 s to start on a small machine
    (Prefect's own default timeout), and its telemetry only adds SQLite lock noise."""
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
    from recycler.service.spec import load_spec
    from recycler.service.steps import find_release
    from recycler.settings import get_settings
    from recycler.store.releases import open_source

    family_spec = load_spec(spec)
    # the release must exist before anything starts (a server, a database): one line if it does not
    find_release(
        open_source(source, family_spec.family, endpoint_url=get_settings().s3_endpoint_url), version
    )
    _prefect_defaults()
    from recycler_flows.release import release_cycle

    _print(release_cycle(version, source, family_spec))


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
    from recycler.service.spec import load_spec

    family_spec = load_spec(spec)
    _prefect_defaults()
    from recycler_flows.release import watch_releases

    _print(watch_releases(source, family_spec, dispatch="deployment" if deployment else "inline"))


def backport_command(
    diff: Annotated[
        str,
        typer.Argument(help="A registered Δ: NAME@ALIAS or NAME/VERSION, e.g. fam-instruct-diff@next-diff."),
    ],
    target: Annotated[str, typer.Argument(help="A registered base version to apply it to, e.g. v1.")],
    spec: Annotated[
        Path | None,
        typer.Option(
            "--spec", "-s", help="The family's spec: family, variant, evaluation and alpha come from it."
        ),
    ] = None,
    family: Annotated[str | None, typer.Option("--family", help="Model family (without --spec).")] = None,
    variant: Annotated[
        str | None, typer.Option("--variant", help="Fine-tuned variant (default: the spec's).")
    ] = None,
    task: Annotated[
        Path | None, typer.Option("--task", help="Task JSONL to evaluate on (without --spec).")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option("--alpha", help="Scale of Δ (default: the spec's, else 1).")
    ] = None,
    add: Annotated[
        list[str] | None,
        typer.Option(
            "--add",
            help="A further registered Δ added in the same pass, NAME/VERSION[=ALPHA] (repeatable): "
            "base + α·DIFF + Σ α_i·Δ_i, rounded once; every Δ and α go into the lineage (composed_of).",
        ),
    ] = None,
    output: Annotated[
        str,
        typer.Option(
            "--output",
            help="merged: a model (base + α·Δ); adapter: α·Δ as a PEFT LoRA adapter for the base "
            "({family}-{variant}-lora), with --rank or --energy (default: the spec's adapter:).",
        ),
    ] = "merged",
    rank: Annotated[
        int | None, typer.Option("--rank", min=1, help="Adapter output: the rank of every module.")
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy", min=0.0, max=1.0, help="Adapter output: per module, keep this share of ‖Δ‖²."
        ),
    ] = None,
) -> None:
    """Apply a registered Δ to a registered (older) base and register the result, without training.

    With --spec the result is evaluated exactly as the family's cycles evaluate; without it, --family
    and --task are needed (evaluation settings at their defaults). `--output adapter` registers the
    Δ as a LoRA adapter for that base instead of a merged model, scored as base + B·A.
    """
    from recycler.service.composition import ComposedPart
    from recycler.service.spec import AdapterForm, EvalSettings, load_spec
    from recycler.service.transfer import TransferRequest

    if output not in ("merged", "adapter"):
        raise typer.BadParameter(f"--output must be merged or adapter, got {output!r}")
    if output == "merged" and (rank is not None or energy is not None):
        raise typer.BadParameter("--rank and --energy go with --output adapter")
    family_spec = load_spec(spec) if spec else None
    evaluation = EvalSettings(task=task) if task else None
    try:
        parts = tuple(ComposedPart.parse(a) for a in add or ())
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if rank is not None and energy is not None:
        raise typer.BadParameter("give one of --rank and --energy, not both")
    form = AdapterForm(rank=rank, energy=energy) if rank is not None or energy is not None else None
    request = TransferRequest.of(
        family_spec,
        family=family,
        variant=variant,
        evaluation=evaluation,
        alpha=alpha,
        output=output,
        adapter=form,
        add=parts,
    )
    _prefect_defaults()
    from recycler_flows.transfer import backport

    _print(
        backport(
            diff,
            target,
            family=request.family,
            variant=request.variant,
            evaluation=request.evaluation,
            alpha=request.alpha,
            output=request.output,
            adapter=request.adapter,
            add=list(request.add),
        )
    )


def serve_command(
    source: SourceArg,
    spec: SpecOpt,
    interval: Annotated[
        int, typer.Option("--interval", min=60, help="Seconds between watcher runs (the reconciler).")
    ] = 3600,
    receive_port: Annotated[
        int | None,
        typer.Option(
            "--receive-port",
            help="Also run a receiver for SOURCE's webhooks/notifications on this port (needs RECYCLER_WEBHOOK_SECRET).",
        ),
    ] = None,
    receive_host: Annotated[
        str, typer.Option("--receive-host", help="Address the receiver binds.")
    ] = "127.0.0.1",
    poll: Annotated[
        float, typer.Option("--poll", min=1, help="Seconds between this process's polls for runs to start.")
    ] = 2.0,
) -> None:
    """Serve the watcher (on a schedule, and on every announced release) and the manual
    backport/recycle flows from this process.

    Needs a Prefect server (PREFECT_API_URL): schedules, triggers and manual runs are created by the
    server. Deployments: watch-releases/served (its trigger starts it when `recycler.release.published`
    names the family), backport/served, recycle/served (the family's spec as the default parameters).
    With --receive-port the same process receives the Hub webhooks and S3 notifications of SOURCE
    (`recycler receive` with a one-route table). For a cluster use infra/prefect.yaml and workers.
    """
    from recycler.service.routes import RouteTable
    from recycler.service.spec import load_spec

    family_spec = load_spec(spec)
    family = family_spec.model_dump(mode="json")
    _prefect_defaults()
    from prefect import serve
    from recycler_flows.release import release_trigger, watch_releases
    from recycler_flows.transfer import backport, recycle

    if receive_port is not None:
        from recycler_flows.receiver import receiver_from_env, start_in_thread

        receiver = receiver_from_env(RouteTable.single(source, family_spec.family))
        start_in_thread(receiver.app(), receive_host, receive_port)
        typer.echo(f"receiving announcements of {source} on http://{receive_host}:{receive_port}/hooks/…")
    # Named apart from infra/prefect.yaml's deployments (watcher, manual): a served deployment that
    # took over a worker deployment's name would crash every run of it (no code storage to pull).
    serve(
        watch_releases.to_deployment(
            name=SERVED,
            interval=interval,
            parameters={"source": source, "spec": family},
            concurrency_limit=1,
            triggers=[release_trigger(family_spec.family)],
        ),
        backport.to_deployment(name=SERVED, parameters={"spec": family}),
        recycle.to_deployment(name=SERVED, parameters={"spec": family}),
        query_seconds=poll,
    )


def receive_command(
    routes: Annotated[
        Path,
        typer.Option(
            "--routes",
            "-r",
            help="YAML routing table: `routes:` entries of {source, spec} (which source is whose).",
        ),
    ],
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8470,
    max_body: Annotated[
        int, typer.Option("--max-body", min=1024, help="Largest request body in bytes.")
    ] = 256 * 1024,
    rate: Annotated[
        float, typer.Option("--rate", min=0.1, help="Requests per second per client, after --burst.")
    ] = 20.0,
    burst: Annotated[int, typer.Option("--burst", min=1, help="Requests a client may send at once.")] = 200,
    settle: Annotated[
        float,
        typer.Option(
            "--settle", min=0, help="Seconds an S3 upload must pause before its release is checked."
        ),
    ] = 2.0,
) -> None:
    """Receive release announcements and emit one Prefect event per complete release.

    Hugging Face Hub webhooks on POST /hooks/hub (secret in X-Webhook-Secret), S3/MinIO bucket
    notifications on POST /hooks/s3 and publishers' own announcements on POST /hooks/announce
    (Authorization: Bearer <secret>). The secret is RECYCLER_WEBHOOK_SECRET; the Prefect server is
    PREFECT_API_URL; S3 sources are checked for completeness on RECYCLER_S3_ENDPOINT_URL.
    Each release becomes `recycler.release.published`, whose trigger starts the family's watcher.
    """
    import logging

    import uvicorn

    from recycler.service.routes import load_routes

    table = load_routes(routes)
    _prefect_defaults()
    from recycler_flows.receiver import Limits, receiver_from_env

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    receiver = receiver_from_env(
        table, limits=Limits(max_body=max_body, per_second=rate, burst=burst, settle=settle)
    )
    families = sorted({r.family for r in table.routes})
    typer.echo(f"receiving for {', '.join(families)} on http://{host}:{port}/hooks/{{hub,s3,announce}}")
    uvicorn.run(receiver.app(), host=host, port=port, access_log=False, log_level="warning")


def deploy_command(
    prefect_file: Annotated[
        Path,
        typer.Option("--prefect-file", help="The deployment file (its work pools are created if missing)."),
    ] = Path("infra/prefect.yaml"),
    pool_type: Annotated[
        str,
        typer.Option(
            "--pool-type", help="Type of the pools created: process, or kubernetes (templates in infra/k8s/)."
        ),
    ] = "process",
) -> None:
    """Create the work pools a deployment file names (if missing), then deploy every flow in it.

    Needs PREFECT_API_URL. Workers then start with `prefect worker start --pool cpu` (and `--pool
    a100` on GPU hosts) wherever the project is installed: an image or a checkout.
    """
    from recycler_flows.deploy import deploy

    if pool_type not in ("process", "kubernetes"):
        raise typer.BadParameter("--pool-type must be process or kubernetes")
    created, output = deploy(prefect_file, pool_type)  # type: ignore[arg-type]
    typer.echo(output.strip())
    typer.echo(f"work pools created: {', '.join(created) or 'none (all existed)'}")


def init_spec_command(
    output: Annotated[Path, typer.Argument(help="Where to write the template, e.g. family.yaml.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
) -> None:
    """Write a commented family spec: every field with its default and what it does."""
    from recycler.errors import OutputExists
    from recycler.service.spec import spec_template

    if output.exists() and not overwrite:
        raise OutputExists(f"{output} exists; pass --overwrite to replace it")
    output.write_text(spec_template())
    typer.echo(
        f"wrote {output}: fill in family, train and evaluation.task, then `recycler watch RELEASES --spec {output}`"
    )


def demo_command(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for releases, registry, artifacts and logs.")
    ] = Path("out/demo"),
    fast: Annotated[
        bool, typer.Option("--fast", help="The small toy family (a smoke test in ~2 minutes, not evidence).")
    ] = False,
    versions: Annotated[
        str, typer.Option("--versions", help="Toy releases to publish, oldest first (comma-separated).")
    ] = "v3,v4,v5",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in a non-empty OUTPUT.")] = False,
) -> None:
    """The service end to end, unattended: releases v3→v5 of the toy family picked up by the watcher,
    one iterative release cycle each (apply Δ^iter, fine-tune, evaluate, gate, register), then a
    backport of the family's newest Δ onto the first release.

    Embedded defaults: Prefect without a server, MLflow on a SQLite file and artifacts in a local
    folder, all under OUTPUT, CPU only. RECYCLER_TRACKING_URI and RECYCLER_ARTIFACT_STORE, if set, are
    honoured (a tracking server then serves its own UI, and no `mlflow ui` command is printed).
    """
    from recycler_flows.demo import main

    main(
        output,
        fast=fast,
        versions=tuple(v.strip() for v in versions.split(",") if v.strip()),
        overwrite=overwrite,
    )


def register(app: typer.Typer) -> None:
    """Mount the service commands (entry point `recycler.cli: service`)."""
    app.command("cycle")(cycle_command)
    app.command("watch")(watch_command)
    app.command("backport")(backport_command)
    app.command("serve")(serve_command)
    app.command("receive")(receive_command)
    app.command("demo")(demo_command)
    app.command("init-spec")(init_spec_command)
    app.command("deploy")(deploy_command)
