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
from prefect.runtime import flow_run
from recycler_flows.tasks import library_logs, prefect_step, summary_artifact

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
    return f"watch {_family(flow_run.parameters.get('spec', {}))}"


@flow(name="release-cycle", flow_run_name=_cycle_run_name, log_prints=True)
def release_cycle(version: str, source: str, spec: CycleSpec) -> dict[str, Any]:
    """Algorithm 1 for one new base release: apply the family's Δ^iter, fine-tune, evaluate, gate,
    register the fine-tune and its new Δ with lineage, and move the aliases if it wins."""
    with library_logs():
        result = run_cycle(version, source, spec, run=prefect_step)
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
) -> list[dict[str, Any]]:
    """Start one release cycle per base release not yet processed, oldest first.

    `inline` runs each cycle as a subflow under a per-release lock (the embedded default: one
    machine); `deployment` starts `release-cycle/gpu` with the release's idempotency key, so any
    number of watchers on any machines start one run per release, and waits for it (each cycle needs
    the Δ the previous one registers).
    """
    if dispatch == "deployment":
        return watch(
            source,
            spec,
            lambda r: dispatch_cycle(deployment, r, source, spec),
            lock=False,
            say=get_run_logger().info,
        )
    return watch(source, spec, lambda r: release_cycle(r.version, source, spec), say=get_run_logger().info)


def dispatch_cycle(deployment: str, release: Release, source: str, spec: CycleSpec) -> dict[str, Any]:
    """Start (or join) the deployment run of `release` and wait for it."""
    from prefect.deployments import run_deployment

    run = run_deployment(
        deployment,
        parameters={"version": release.version, "source": source, "spec": spec.model_dump(mode="json")},
        idempotency_key=release.key,
        timeout=None,
    )
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"release cycle for {release.key} ended {run.state.name if run.state else '?'}")
    return {"version": release.version, "flow_run": str(run.id), "state": run.state.name}
