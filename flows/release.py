"""The service's flows: the release cycle (Algorithm 1), the release watcher, and manual transfers.

Flows are thin: one task per library call in `recycler.cycle`, which owns the data path and makes
every step idempotent (verified workspace outputs, content-addressed artifacts, registration deduped
by manifest digest). Tasks therefore use no Prefect result cache: a re-run on another worker could
not read a local cache anyway, and the registry plus artifact store are the state that matters.

Deployments (infra/prefect.yaml): `watch-releases/watcher` (CPU pool, scheduled), `release-cycle/gpu`
(A100 pool; started by the watcher with an idempotency key per release), `backport/manual` and
`recycle/manual` (CPU pool, triggered by hand).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from pydantic import BaseModel

from recycler import cycle as cy
from recycler.crashpoints import crash_point
from recycler.cycle import CycleSpec, Services, Workspace
from recycler.errors import RecyclerError
from recycler.finetune_config import FinetuneConfig
from recycler.registry import CHAMPION, NEXT_DIFF, RegisteredVersion, Registry, champion_alias
from recycler.releases import InvalidReleaseId, Release, check_id, check_version, open_source, version_key

RELEASE_CYCLE_DEPLOYMENT = "release-cycle/gpu"


def _transient(task: object, task_run: object, state: State) -> bool:
    """Retry I/O that may succeed next time; a RecyclerError (bad id, bad file, refused) never will."""
    return not isinstance(state.result(raise_on_failure=False), RecyclerError)


io_task = task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)
compute_task = task(cache_policy=NO_CACHE)  # deterministic local work: retried by re-running the flow


# ---------------------------------------------------------------------------------------------- tasks


@io_task
def find_release(source: str, spec: CycleSpec, version: str) -> Release:
    return cy.find_release(open_source(source, spec.family), version)


@io_task
def stage_release(source: str, spec: CycleSpec, release: Release, workdir: str) -> str:
    ws = Workspace(Path(workdir))
    local = open_source(source, spec.family).materialize(release, ws.download)
    return str(cy.stage_base(release, local, ws.base))


@io_task
def publish(folder: str, kind: str) -> dict[str, str]:
    ref = Services.from_settings().store.publish(Path(folder), kind)
    return {"kind": ref.kind, "digest": ref.digest, "uri": ref.uri}


@io_task
def register(kind: str, spec: CycleSpec, ref: dict[str, str], **kw: Any) -> RegisteredVersion:
    from recycler.store import ArtifactRef

    variant = None if kind == "base" else spec.variant
    return Services.from_settings().registry.register(kind, spec.family, variant, ArtifactRef(**ref), **kw)


@io_task
def fetch(version: RegisteredVersion, dest: str) -> str:
    return str(cy.fetch_verified(Services.from_settings().store, version.artifact, Path(dest)))


@compute_task
def apply_delta(base: str, diff: str, dest: str, spec: CycleSpec) -> str:
    return str(cy.apply_step(Path(base), Path(diff), Path(dest), spec))


@compute_task
def finetune(start: str, dest: str, spec: CycleSpec, role: str) -> dict:
    return cy.finetune_step(Path(start), Path(dest), spec, role=role)


@compute_task
def evaluate(model: str, spec: CycleSpec, cache: str, name: str) -> float:
    return cy.evaluate_cached(Path(model), spec, Path(cache), name=name)


@compute_task
def extract_delta(base: str, tuned: str, dest: str, spec: CycleSpec) -> str:
    return str(cy.extract_step(Path(base), Path(tuned), Path(dest), spec))


@compute_task
def precheck_delta(target: str, diff: str, spec: CycleSpec) -> dict:
    from recycler.precheck import precheck

    result = precheck(Path(target), [Path(diff)], alphas=(spec.alpha,), sample=spec.precheck_sample, n=32)
    best = result.candidates[0]
    return {"score": best.score, "probe_gain": best.probe_gain, "target_loss": result.target_loss}


# ---------------------------------------------------------------------------------------------- tracking


@contextmanager
def cycle_run(key: str, name: str, params: dict[str, Any]) -> Iterator[str | None]:
    """One MLflow run per release cycle, resumed (not duplicated) when the cycle is re-run."""
    import mlflow

    from recycler.settings import get_settings
    from recycler.tracking import install_redaction, scrub, tracking_enabled

    if not tracking_enabled(os.environ.get("RECYCLER_TRACK", "1") != "0"):
        yield None
        return
    install_redaction()
    settings = get_settings()
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)
    from recycler.tracking import _experiment_id

    exp = _experiment_id(settings)
    found = mlflow.search_runs(
        [exp], filter_string=f"tags.`recycler.cycle` = '{key}'", output_format="list", max_results=1
    )
    run_id = found[0].info.run_id if found else None
    with mlflow.start_run(
        run_id=run_id, run_name=None if run_id else name, experiment_id=exp, tags={"recycler.cycle": key}
    ) as run:
        if not run_id:
            mlflow.log_params(scrub(params))
        yield run.info.run_id


def _log_metrics(metrics: dict[str, float | int | None]) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})


# ---------------------------------------------------------------------------------------------- flows


@flow(name="release-cycle", log_prints=True)
def release_cycle(version: str, source: str, spec: CycleSpec) -> dict[str, Any]:
    """Algorithm 1 for one new base release: apply the family's Δ^iter, fine-tune, evaluate, gate,
    register the fine-tune and its new Δ with lineage, and move the aliases if it wins."""
    log = get_run_logger()
    check_version(version)  # before any I/O
    svc = Services.from_settings()
    if done := cy.completed_cycle(svc.registry, spec, version):
        log.info("%s %s: already processed (%s); nothing to do", spec.family, version, done.reference)
        return _summary_from(done)
    release = find_release(source, spec, version)  # nothing is written for a release that is not there
    ws = Workspace.for_release(svc.settings.home, spec, version)
    base = stage_release(source, spec, release, str(ws.root))
    base_v = register("base", spec, publish(base, "base"), base_version=version)
    prev = cy.previous_diff(svc.registry, spec, version)
    mode = spec.mode if prev else "first"
    log.info("%s: %s", release.key, f"applying {prev.reference}" if prev else "first cycle: FT from base")
    params = {"family": spec.family, "variant": spec.variant, "version": version, "mode": mode}
    params |= {"parent_diff": prev.reference if prev else "", "release": release.key}
    with cycle_run(
        f"{spec.family}/{spec.variant}/{version}", f"cycle {spec.family} {version}", params
    ) as run_id:
        summary = _cycle_body(spec, version, ws, base, base_v, prev, run_id)
    (ws.root / "result.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _cycle_body(
    spec: CycleSpec,
    version: str,
    ws: Workspace,
    base: str,
    base_v: RegisteredVersion,
    prev: RegisteredVersion | None,
    run_id: str | None,
) -> dict[str, Any]:
    svc, log = Services.from_settings(), get_run_logger()
    scores: dict[str, float] = {"base": evaluate(base, spec, str(ws.evals), "base")}
    start, merged_v, precheck = base, None, None
    if prev is not None:
        diff = fetch(prev, str(ws.prev_diff))
        if spec.precheck_sample is not None:
            precheck = precheck_delta(base, diff, spec)
            _log_metrics({f"precheck_{k}": v for k, v in precheck.items()})
            if spec.precheck_min_score is not None and precheck["score"] < spec.precheck_min_score:
                raise cy.GateRefused(
                    f"pre-check score {precheck['score']:.4f} of {prev.reference} on {version} is below "
                    f"{spec.precheck_min_score}; the cycle stops before fine-tuning"
                )
        start = apply_delta(base, diff, str(ws.merged), spec)
        scores["merged"] = evaluate(start, spec, str(ws.evals), "merged")
    record = finetune(start, str(ws.ft), spec, "ft")
    scores["ft"] = evaluate(str(ws.ft), spec, str(ws.evals), "ft")
    baseline = None
    if spec.baseline and prev is not None:  # on the first cycle FT(base) *is* the fine-tune
        baseline = finetune(base, str(ws.baseline), spec, "ft-from-base")
        scores["ft_from_base"] = evaluate(str(ws.baseline), spec, str(ws.evals), "ft-from-base")
    metric = "accuracy"
    _log_metrics({f"{metric}_{k}": v for k, v in scores.items()})
    from recycler.tracking import log_curve

    log_curve("eval_curve_ft", [tuple(p) for p in record.get("curve") or []])
    if baseline:
        log_curve("eval_curve_ft_from_base", [tuple(p) for p in baseline.get("curve") or []])

    # register: merged (if any) → fine-tune(s) → Δ, each pointing at what it came from
    lineage = {"parent_diff": prev.reference} if prev else {}
    if prev is not None:
        merged_v = register(
            "merged", spec, publish(start, "model"), base_version=version, run_id=run_id,
            metrics={metric: scores["merged"]}, **lineage,
        )  # fmt: skip
    extra = {"source_merged": merged_v.reference} if merged_v else {}
    ft_v = register(
        "ft", spec, publish(str(ws.ft), "model"), base_version=version, run_id=run_id,
        metrics={metric: scores["ft"]}, extra_tags={"role": "recycled-ft" if prev else "ft", **extra}, **lineage,
    )  # fmt: skip
    crash_point("cycle:registered-ft")
    winner, winner_score, winner_dir = ft_v, scores["ft"], str(ws.ft)
    delta_source, delta_dir = ft_v, str(ws.ft)
    if baseline is not None:
        baseline_v = register(
            "ft", spec, publish(str(ws.baseline), "model"), base_version=version, run_id=run_id,
            metrics={metric: scores["ft_from_base"]}, extra_tags={"role": "ft-from-base"},
        )  # fmt: skip
        if spec.pick_best and scores["ft_from_base"] > scores["ft"]:
            winner, winner_score, winner_dir = baseline_v, scores["ft_from_base"], str(ws.baseline)
        # direct mode recycles FT(M_i) − M_i (the paper's Δ^dir); iterative the better fine-tune's Δ
        delta_source, delta_dir = (
            (baseline_v, str(ws.baseline)) if spec.mode == "direct" else (winner, winner_dir)
        )
    delta = extract_delta(base, delta_dir, str(ws.delta), spec)
    cycle_parent = {"cycle_parent_diff": prev.reference} if prev else {}
    diff_mode = "iterative" if prev and delta_source is ft_v else "direct"
    diff_v = register(
        "diff", spec, publish(delta, "diff"), base_version=version, run_id=run_id,
        source_ft=delta_source.reference, diff_mode=diff_mode, extra_tags=cycle_parent,
    )  # fmt: skip

    crash_point("cycle:registered-diff")
    # gate, aliases, completion mark (last: a crash before it re-runs the cheap tail only)
    champion = cy.champion_score(svc.registry, spec, metric)
    promoted, reason = cy.gate(winner_score, scores["base"], champion, spec.gate_margin)
    reg = svc.registry
    if promoted:
        reg.set_alias("ft", spec.family, spec.variant, CHAMPION, winner.version)
        reg.set_alias("ft", spec.family, spec.variant, champion_alias(version), winner.version)
        crash_point("cycle:aliases-half-moved")
        reg.set_alias("diff", spec.family, spec.variant, NEXT_DIFF, diff_v.version)
    log.info("gate: %s (candidate %s)", reason, winner.reference)
    savings = cy.savings(record, baseline) if baseline else {}
    if savings:
        _log_metrics({f"savings_{k}": v for k, v in savings.items()})
        _log_savings_plot(record, baseline, version)
    if run_id:
        _log_lineage(reg, diff_v)
    reg.set_tags(
        ft_v, {"cycle_status": cy.CYCLE_COMPLETE, "gate": "promoted" if promoted else f"refused: {reason}"}
    )
    return {
        "family": spec.family,
        "version": version,
        "mode": spec.mode if prev else "first",
        "parent_diff": prev.reference if prev else None,
        "scores": scores,
        "champion_before": champion,
        "promoted": promoted,
        "candidate": "recycled" if winner is ft_v else "from-base",
        "gate": reason,
        "precheck": precheck,
        "savings": savings,
        "steps": record.get("steps"),
        "wall_time_s": record.get("wall_time_s"),
        "registered": {
            "base": base_v.reference,
            "merged": merged_v.reference if merged_v else None,
            "ft": ft_v.reference,
            "diff": diff_v.reference,
        },
    }


def _log_lineage(registry: Registry, diff: RegisteredVersion) -> None:
    """Draw the new Δ's lineage (its fine-tune, the merged start, the parent Δs, the bases) into the
    cycle's run, so the MLflow UI shows the whole chain of cycles as a picture beside the metrics."""
    from recycler.lineage_plot import lineage_figure
    from recycler.tracking import log_figure, log_text_artifact

    tree = registry.lineage(diff.name, diff.version, max_depth=8)  # this cycle and the ones before
    log_figure(lineage_figure(tree), "lineage.png")
    log_text_artifact(tree.to_mermaid(), "lineage.mmd")


def _summary_from(ft: RegisteredVersion) -> dict[str, Any]:
    return {
        "family": ft.family,
        "version": ft.tags.get("base_version"),
        "status": "already-complete",
        "scores": {"ft": float(ft.tags["eval.accuracy"])} if "eval.accuracy" in ft.tags else {},
        "promoted": ft.tags.get("gate") == "promoted",
        "registered": {"ft": ft.reference},
    }


def _log_savings_plot(recycled: dict, baseline: dict, version: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from recycler.tracking import log_figure

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
    log_figure(fig, "savings.png")


@flow(name="watch-releases", log_prints=True)
def watch_releases(
    source: str,
    spec: CycleSpec,
    dispatch: Literal["inline", "deployment"] = "inline",
    deployment: str = RELEASE_CYCLE_DEPLOYMENT,
) -> list[dict[str, Any]]:
    """Start one release cycle per base release not yet processed, oldest first.

    State lives in the registry (a release is processed once its fine-tune is registered as complete),
    never in the watcher. `inline` runs each cycle as a subflow under a per-release lock (the embedded
    default: one machine); `deployment` starts `release-cycle/gpu` with the release's idempotency key,
    so any number of watchers on any machines start one run per release, and waits for it (each cycle
    needs the Δ the previous one registers).
    """
    log = get_run_logger()
    svc = Services.from_settings()
    releases = sorted(open_source(source, spec.family).list(), key=lambda r: version_key(r.version))
    results = []
    for release in releases:
        if cy.completed_cycle(svc.registry, spec, release.version):
            continue
        log.info("new release %s", release.key)
        if dispatch == "deployment":
            results.append(_dispatch(deployment, release, source, spec))
            continue
        with _release_lock(svc.settings.home, release.key) as acquired:
            if not acquired or cy.completed_cycle(svc.registry, spec, release.version):
                log.info("%s is being (or was) processed by another watcher", release.key)
                continue
            results.append(release_cycle(release.version, source, spec))
    return results


def _dispatch(deployment: str, release: Release, source: str, spec: CycleSpec) -> dict[str, Any]:
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


@contextmanager
def _release_lock(home: Path, key: str) -> Iterator[bool]:
    """A non-blocking per-release OS lock: released by the kernel when its holder dies, so a crashed
    watcher never blocks the next one (the registry lease would need renewing over hours of FT)."""
    import hashlib

    locks = Path(home) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _transfer(
    diff: str,
    target_version: str,
    family: str,
    variant: str,
    eval_task: str,
    how: str,
    evaluation: EvalOptions,
) -> dict:
    """Apply a registered Δ to a registered base version and register the result as a merged model."""
    check_id(family)
    check_id(variant, "variant")
    check_version(target_version)
    svc = Services.from_settings()
    reg = svc.registry
    delta_v = reg.resolve(diff)
    if delta_v.kind != "diff":
        raise RecyclerError(f"{diff} is a {delta_v.kind!r} version, not a Δ")
    bases = [v for v in reg.versions("base", family) if v.tags.get("base_version") == target_version]
    if not bases:
        raise InvalidReleaseId(
            f"base {target_version!r} of {family!r} is not registered; run its cycle first"
        )
    ft = FinetuneConfig(eval_extract=evaluation.extract, eval_max_new_tokens=evaluation.max_new_tokens)
    spec = CycleSpec(
        family=family, variant=variant, train=Path(eval_task), eval_task=Path(eval_task), finetune=ft,
        alpha=evaluation.alpha, eval_limit=evaluation.limit,
    )  # fmt: skip
    ws = Workspace.for_release(svc.settings.home, spec, target_version)
    base = fetch(bases[0], str(ws.root / "base-fetched"))
    diff_dir = fetch(delta_v, str(ws.root / f"{how}-diff-{delta_v.version}"))
    out = apply_delta(base, diff_dir, str(ws.root / f"{how}-{delta_v.version}"), spec)
    scores = {
        "base": evaluate(base, spec, str(ws.evals), "base"),
        "merged": evaluate(out, spec, str(ws.evals), how),
    }
    merged_v = register(
        "merged", spec, publish(out, "model"), base_version=target_version, parent_diff=delta_v.reference,
        metrics={"accuracy": scores["merged"]}, extra_tags={"transfer": how, "diff_base_version": delta_v.tags.get("base_version", "")},
    )  # fmt: skip
    return {
        "diff": delta_v.reference,
        "target": target_version,
        "scores": scores,
        "registered": merged_v.reference,
    }


class EvalOptions(BaseModel):
    """How a manual transfer is scaled and evaluated (the cycle takes these from its spec)."""

    alpha: float = 1.0
    extract: Literal["number", "text"] = "number"
    max_new_tokens: int = 256
    limit: int | None = None


@flow(name="backport", log_prints=True)
def backport(
    diff: str,
    target_version: str,
    family: str,
    eval_task: str,
    variant: str = "instruct",
    evaluation: EvalOptions | None = None,
) -> dict:
    """Apply a newer Δ (e.g. `fam-instruct-diff@next-diff`) to an older registered base, no training."""
    return _transfer(
        diff, target_version, family, variant, eval_task, "backport", evaluation or EvalOptions()
    )


@flow(name="recycle", log_prints=True)
def recycle(
    diff: str,
    target_version: str,
    family: str,
    eval_task: str,
    variant: str = "instruct",
    evaluation: EvalOptions | None = None,
) -> dict:
    """Apply a Δ to another registered base (typically a newer one), no training."""
    return _transfer(diff, target_version, family, variant, eval_task, "recycle", evaluation or EvalOptions())
