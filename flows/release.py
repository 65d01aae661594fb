"""The release cycle and the watcher as Prefect flows.

`release-cycle` runs Algorithm 1 for one base release (recycler.service.cycle.run_cycle, each step a
task); `watch-releases` starts one cycle per new release, oldest first (recycler.service.watch),
inline as a subflow or as a `release-cycle/gpu` deployment run with the release's idempotency key.
Deployments: infra/prefect.yaml (`watch-releases/watcher` on the CPU pool, `release-cycle/gpu` on the
A100 pool).
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.runtime import flow_run
from recycler_flows.tasks import library_logs, prefect_step, summary_artifact

from recycler.service.announce import EVENT, RESOURCE_PREFIX
from recycler.service.cycle import run_cycle
from recycler.service.spec import CycleSpec
from recycler.service.summary import cycle_note, verdict
from recycler.service.watch import watch
from recycler.store.releases import Release

RELEASE_CYCLE_DEPLOYMENT = "release-cycle/gpu"


def _family(spec: CycleSpec | dict) -> str:
    """`family-variant` of a spec parameter (a CycleSpec in-process, a dict from a deployment)."""
    spec = spec if isinstance(spec, dict) else spec.model_dump()
    return f"{spec.get('family', '?')}-{spec.get('variant', 'instruct')}"


def _cycle_run_name() -> str:
    p = flow_run.parameters
    return f"cycle {_family(p.get('spec', {}))}@{p.get('version', '?')}"


def _watch_run_name() -> str:
    announced = flow_run.parameters.get("announced")
    return f"watch {_family(flow_run.parameters.get('spec', {}))}" + (f" ({announced})" if announced else "")


def release_trigger(family: str) -> DeploymentEventTrigger:
    """Start a watcher run of `family` when one of its releases is announced (recycler receive):
    the watcher, not the cycle, is started, so the release is dispatched under the watcher's key in
    the family's order (an automation would key a cycle run by its own invocation id)."""
    return DeploymentEventTrigger(
        name=f"{family}: release published",
        expect={EVENT},
        match={"prefect.resource.id": f"{RESOURCE_PREFIX}{family}@*"},
        parameters={"announced": "{{ event.payload.key }}"},
    )


@flow(name="release-cycle", flow_run_name=_cycle_run_name, log_prints=True)
def release_cycle(
    version: str,
    source: str,
    spec: CycleSpec,
    attempt: int | None = None,
    fingerprint: str | None = None,
    wait: float | None = None,
) -> dict[str, Any]:
    """Algorithm 1 for one new base release: apply the family's Δ^iter, fine-tune, evaluate, gate,
    register the fine-tune and its new Δ with lineage, and move the aliases if it wins.

    It holds the family's turn while it runs (one cycle per family at a time, in release order).
    `attempt` and `fingerprint` come from the watcher that dispatched it; `wait`: seconds to wait for
    the turn (default: long enough to take over a dead holder's)."""
    with library_logs():
        result = run_cycle(
            version, source, spec, run=prefect_step, attempt=attempt, fingerprint=fingerprint, wait=wait
        )
    if result.status == "already-complete":
        get_run_logger().info("%s %s: already complete (%s)", spec.family, version, result.registered["ft"])
    else:
        title = f"cycle {spec.family}-{spec.variant} {version}"
        summary_artifact(
            title, lambda ui: cycle_note(result, ui=ui), result.run_id, f"{title}: {verdict(result)}"
        )
    return result.model_dump(mode="json")


@flow(name="watch-releases", flow_run_name=_watch_run_name, log_prints=True)
def watch_releases(
    source: str,
    spec: CycleSpec,
    dispatch: Literal["inline", "deployment"] = "inline",
    deployment: str = RELEASE_CYCLE_DEPLOYMENT,
    announced: str = "",
) -> list[dict[str, Any]]:
    """Take the family's release chain forward, oldest release first (recycler.service.watch).

    `inline` runs each cycle as a subflow (the embedded default); a watcher that finds another
    process holding the family's turn stops. `deployment` records each attempt in the chain and
    starts `release-cycle/gpu` with the attempt's idempotency key (or joins the run in flight), so any
    number of watchers on any machines start one run per attempt, and waits for it (each cycle needs
    the Δ the previous one registers); a failed or crashed run is retried under the next attempt's key.
    `announced`: the release key of the event that started this run (a trigger sets it); the run
    still reads the source and the chain, so an announcement only wakes it up.
    """
    logger = get_run_logger()
    if announced:
        logger.info("started by the announcement of %s", announced)
    if dispatch == "deployment":
        start = lambda r, attempt, key: dispatch_cycle(deployment, r, source, spec, attempt, key)  # noqa: E731
    else:
        start = lambda r, attempt, key: release_cycle(r.version, source, spec, wait=0.0)  # noqa: E731
    return watch(source, spec, start, dispatch=dispatch == "deployment", say=logger.info)


def dispatch_cycle(
    deployment: str, release: Release, source: str, spec: CycleSpec, attempt: int | None, key: str | None
) -> dict[str, Any]:
    """Start (or join) the deployment run of one attempt of `release` and wait for it; its final
    state is returned, not raised: the watcher records a failed attempt and retries under a new key."""
    from prefect.deployments import run_deployment

    parameters = {"version": release.version, "source": source, "spec": spec.model_dump(mode="json"),
                  "attempt": attempt, "fingerprint": release.fingerprint}  # fmt: skip
    run = run_deployment(deployment, parameters=parameters, idempotency_key=key, timeout=None)
    state = run.state.name if run.state else "?"
    completed = bool(run.state and run.state.is_completed())
    return {
        "version": release.version,
        "flow_run": str(run.id),
        "state": "Completed" if completed else state,
        "key": key,
    }
