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
from recycler_flows.tasks import prefect_step

from recycler.service.cycle import run_cycle
from recycler.service.spec import CycleSpec
from recycler.service.watch import watch
from recycler.store.releases import Release

RELEASE_CYCLE_DEPLOYMENT = "release-cycle/gpu"


@flow(name="release-cycle", log_prints=True)
def release_cycle(version: str, source: str, spec: CycleSpec) -> dict[str, Any]:
    """Algorithm 1 for one new base release: apply the family's Δ^iter, fine-tune, evaluate, gate,
    register the fine-tune and its new Δ with lineage, and move the aliases if it wins."""
    result = run_cycle(version, source, spec, run=prefect_step)
    get_run_logger().info("%s %s: %s (%s)", spec.family, version, result.status, result.gate or "no gate")
    return result.model_dump(mode="json")


@flow(name="watch-releases", log_prints=True)
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
