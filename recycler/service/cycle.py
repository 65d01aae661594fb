"""Algorithm 1 of Lin et al. (2025), one base release at a time: the service's heartbeat, written once.

    M*_1 = FT(M_1);   for each new release M_i:   Δ^iter_{i−1} = M*_{i−1} − M_{i−1},   M*_i = FT(M_i + Δ^iter_{i−1})

`run_cycle` orders the steps of recycler.service.steps top to bottom; `decide` (recycler.stages.gate)
makes every decision. Each step is idempotent on its own, so a crashed cycle is finished by running it
again. `run` executes each step: directly (`run_locally`: tests, `recycler reproduce`) or as a Prefect
task (recycler_flows), which is all the orchestration layer adds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from recycler.crashpoints import crash_point
from recycler.errors import GateRefused
from recycler.registry.names import CHAMPION, NEXT_DIFF, Lineage, RegisteredVersion, champion_alias
from recycler.service import steps
from recycler.service.services import Services
from recycler.service.spec import CycleSpec
from recycler.service.workspace import Workspace
from recycler.stages.evaluate.curves import savings
from recycler.stages.gate import Decision, decide
from recycler.store.releases import check_version, open_source

T = TypeVar("T")
StepRunner = Callable[..., Any]  # run(label, fn, *args, **kwargs) → fn(*args, **kwargs)


def run_locally(label: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a step in this process, as it is (the Prefect flows wrap each step in a task instead)."""
    return fn(*args, **kwargs)


class CycleResult(BaseModel):
    """What a cycle did: scores, the gate's decision, and the versions it registered."""

    family: str
    version: str
    status: Literal["complete", "already-complete"] = "complete"
    mode: Literal["first", "iterative", "direct"] | None = None
    parent_diff: str | None = None
    scores: dict[str, float] = {}
    champion_before: float | None = None
    promoted: bool = False
    candidate: Literal["first", "recycled", "from-base"] | None = None
    gate: str = ""
    precheck: dict | None = None
    savings: dict = {}
    steps: int | None = None
    wall_time_s: float | None = None
    registered: dict[str, str | None] = {}
    run_id: str | None = None


def run_cycle(
    version: str,
    source: str,
    spec: CycleSpec,
    *,
    services: Services | None = None,
    run: StepRunner = run_locally,
) -> CycleResult:
    """Algorithm 1 for the base release `version` of `source`: apply the family's Δ^iter, fine-tune,
    evaluate, decide, extract the new Δ^iter, register everything with lineage, promote if it wins."""
    check_version(version)  # before any I/O
    svc = services or Services.from_settings()
    # 0. a cycle that finished (recorded in the registry, not in a watcher) is a no-op
    if done := run("check for a finished cycle", steps.completed_cycle, svc.registry, spec, version):
        return CycleResult(family=spec.family, version=version, status="already-complete", registered={"ft": done.reference},
                           scores={"ft": done.score() or 0.0}, promoted=done.tags.get("gate") == "promoted")  # fmt: skip
    # 1. detect M_i: the release exists; stage, publish and register it
    releases = open_source(source, spec.family, endpoint_url=svc.settings.s3_endpoint_url)
    release = run(f"find release {version}", steps.find_release, releases, version)
    ws = Workspace.for_release(svc.settings.home, spec.family, spec.variant, version)
    base = run(f"stage base {version}", steps.stage_base, releases, release, ws.download, ws.base)
    base_v = run(
        f"register base {version}",
        steps.publish_and_register,
        svc,
        base,
        "base",
        spec.family,
        spec.variant,
        version,
    )
    # 2. Δ^iter_{i−1}: the family's next-diff (none on the first cycle)
    prev = run("resolve next-diff", steps.previous_diff, svc.registry, spec, version)
    from recycler.registry.runs import cycle_run

    params = {"family": spec.family, "variant": spec.variant, "version": version, "release": release.key,
              "mode": spec.mode if prev else "first", "parent_diff": prev.reference if prev else ""}  # fmt: skip
    with cycle_run(
        f"{spec.family}/{spec.variant}/{version}", f"cycle {spec.family} {version}", params
    ) as run_id:
        result = _train_decide_register(svc, run, spec, ws, base, prev, run_id)
    result.registered["base"] = base_v.reference
    (ws.root / "result.json").write_text(result.model_dump_json(indent=1) + "\n")
    return result


def _train_decide_register(
    svc: Services, run: StepRunner, spec: CycleSpec, ws: Workspace, base: Path, prev: RegisteredVersion | None, run_id: str | None
) -> CycleResult:  # fmt: skip
    version, first = ws.version, prev is None
    scores = {
        "base": run("evaluate base", steps.evaluate_cached, svc, base, spec.evaluation, ws.evals, name="base")
    }
    start, precheck = base, None
    if prev is not None:
        diff = run(f"fetch Δ {prev.reference}", steps.fetch_verified, svc.store, prev.artifact, ws.prev_diff)
        # 3. pre-check: stop before spending GPU hours on a Δ that will not transfer
        if spec.precheck_sample is not None:
            precheck = run("pre-check M_i + Δ", steps.precheck_step, base, diff, spec)
            _stop_if_below(precheck, spec, prev, version)
        # 4. the recycled start M_i + Δ^iter_{i−1}
        start = run("apply Δ to base", steps.apply_step, base, diff, ws.merged, spec.alpha)
        scores["merged"] = run(
            "evaluate merged", steps.evaluate_cached, svc, start, spec.evaluation, ws.evals, name="merged"
        )
    # 5. M*_i = FT(start); with a baseline also FT(M_i), for the savings report and Δ^dir
    label = "finetune from base" if first else "finetune from M+Δ"
    record = run(label, steps.finetune_step, svc, start, ws.ft, spec, role="ft")
    scores["ft"] = run(
        "evaluate fine-tune", steps.evaluate_cached, svc, ws.ft, spec.evaluation, ws.evals, name="ft"
    )
    baseline = None
    if spec.baseline and not first:  # on the first cycle FT(M_1) *is* the fine-tune
        baseline = run(
            "finetune from base (baseline)",
            steps.finetune_step,
            svc,
            base,
            ws.baseline,
            spec,
            role="ft-from-base",
        )
        scores["ft_from_base"] = run("evaluate baseline", steps.evaluate_cached, svc, ws.baseline, spec.evaluation, ws.evals, name="ft-from-base")  # fmt: skip
    # 6. decide: candidate, Δ source, promotion (against the champion before this cycle)
    champion = run("read champion", steps.champion_before, svc.registry, spec, version)
    decision = decide(scores, champion, spec, first=first)
    # 7. Δ_i = M*_i − M_i: what the next release recycles
    delta = run("extract Δ", steps.extract_step, base, ws.finetuned(decision.delta_source), ws.delta, spec)
    # 8. register merged start, fine-tune(s) and Δ with lineage; 9. promote if the gate says so
    registered = run("register cycle", register_cycle, svc, spec, ws, prev, decision, scores, delta, run_id)
    run("promote", promote, svc, spec, version, decision, registered)
    result = CycleResult(
        family=spec.family, version=version, mode=spec.mode if prev else "first", parent_diff=prev.reference if prev else None,
        scores=scores, champion_before=champion, promoted=decision.promote, gate=decision.reason, precheck=precheck,
        candidate="first" if first else ("recycled" if decision.candidate == "ft" else "from-base"),
        savings=savings(record, baseline) if baseline else {}, steps=record.get("steps"), wall_time_s=record.get("wall_time_s"),
        registered={k: v.reference if v else None for k, v in registered.items()}, run_id=run_id,
    )  # fmt: skip
    run("log cycle", log_cycle, svc, result, record, baseline, registered["diff"])
    return result


def _stop_if_below(precheck: dict, spec: CycleSpec, prev: RegisteredVersion, version: str) -> None:
    if spec.precheck_min_score is not None and precheck["score"] < spec.precheck_min_score:
        raise GateRefused(
            f"pre-check score {precheck['score']:.4f} of {prev.reference} on {version} is below "
            f"{spec.precheck_min_score}; the cycle stops before fine-tuning"
        )


def register_cycle(
    svc: Services,
    spec: CycleSpec,
    ws: Workspace,
    prev: RegisteredVersion | None,
    decision: Decision,
    scores: dict[str, float],
    delta: Path,
    run_id: str | None,
) -> dict[str, RegisteredVersion | None]:
    """Merged start → fine-tune(s) → Δ, each pointing at what it came from; the gate's decision is
    recorded on the fine-tunes before any alias moves (see steps.champion_before)."""
    version, parent = ws.version, prev.reference if prev else None
    gate = {"gate": decision.gate, "gate_champion_before": "none" if decision.champion_before is None else f"{decision.champion_before:.6g}"}  # fmt: skip
    register = steps.publish_and_register
    merged = None
    if prev is not None:
        merged = register(svc, ws.merged, "merged", spec.family, spec.variant, version, lineage=Lineage(parent_diff=parent, run_id=run_id), score=scores["merged"])  # fmt: skip
    lineage = Lineage(parent_diff=parent, source_merged=merged.reference if merged else None, role="recycled-ft" if prev else "ft", run_id=run_id)  # fmt: skip
    ft = register(
        svc, ws.ft, "ft", spec.family, spec.variant, version, lineage=lineage, score=scores["ft"], status=gate
    )
    crash_point("cycle:registered-ft")
    baseline = None
    if "ft_from_base" in scores:
        lineage = Lineage(role="ft-from-base", run_id=run_id)
        baseline = register(svc, ws.baseline, "ft", spec.family, spec.variant, version, lineage=lineage, score=scores["ft_from_base"], status=gate)  # fmt: skip
    source = baseline if decision.delta_source == "ft-from-base" else ft
    lineage = Lineage(
        source_ft=source.reference, diff_mode=decision.diff_mode, cycle_parent_diff=parent, run_id=run_id
    )
    diff = register(svc, delta, "diff", spec.family, spec.variant, version, lineage=lineage)
    crash_point("cycle:registered-diff")
    return {"merged": merged, "ft": ft, "baseline": baseline, "diff": diff}


def promote(
    svc: Services,
    spec: CycleSpec,
    version: str,
    decision: Decision,
    registered: dict[str, RegisteredVersion | None],
) -> None:
    """Move champion, champion-<version> and next-diff if the gate promoted; then mark the cycle complete
    (last: a crash before it re-runs only this cheap tail)."""
    reg, fam, var = svc.registry, spec.family, spec.variant
    candidate = registered["baseline"] if decision.candidate == "ft-from-base" else registered["ft"]
    if decision.promote:
        reg.set_alias("ft", fam, var, CHAMPION, candidate.version)
        reg.set_alias("ft", fam, var, champion_alias(version), candidate.version)
        crash_point("cycle:aliases-half-moved")
        reg.set_alias("diff", fam, var, NEXT_DIFF, registered["diff"].version)
    reg.set_tags(registered["ft"], {"cycle_status": steps.CYCLE_COMPLETE})


def log_cycle(
    svc: Services, result: CycleResult, record: dict, baseline: dict | None, diff: RegisteredVersion
) -> None:
    """Scores, savings, curves and the lineage picture into the cycle's MLflow run (if tracking is on)."""
    from recycler.registry import runs

    if (run_id := result.run_id) is None:
        return
    metrics = {f"accuracy_{k}": v for k, v in result.scores.items()}
    metrics |= {f"precheck_{k}": v for k, v in (result.precheck or {}).items()}
    metrics |= {f"savings_{k}": v for k, v in result.savings.items()}
    runs.log_metrics(metrics, run_id=run_id)
    runs.log_curve("eval_curve_ft", [tuple(p) for p in record.get("curve") or []], run_id=run_id)
    if baseline:
        runs.log_curve(
            "eval_curve_ft_from_base", [tuple(p) for p in baseline.get("curve") or []], run_id=run_id
        )
        runs.log_figure(
            runs.convergence_figure(record, baseline, result.version), "savings.png", run_id=run_id
        )
    runs.log_lineage(svc.registry, diff, run_id=run_id)
