"""Algorithm 1 of Lin et al. (2025), one base release at a time: the service's heartbeat, written once.

    M*_1 = FT(M_1);   for each new release M_i:   Δ^iter_{i−1} = M*_{i−1} − M_{i−1},   M*_i = FT(M_i + Δ^iter_{i−1})

`run_cycle` orders the steps of recycler.service.steps top to bottom; `decide` (recycler.stages.gate)
makes every decision. Each step is idempotent on its own, so a crashed cycle is finished by running it
again. `run` executes each step: directly (`run_locally`: tests, `recycler reproduce`) or as a Prefect
task (recycler_flows), which is all the orchestration layer adds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from recycler.crashpoints import crash_point
from recycler.errors import GateRefused
from recycler.registry.names import CHAMPION, NEXT_DIFF, Lineage, RegisteredVersion, champion_alias
from recycler.service import steps
from recycler.service.services import Services
from recycler.service.spec import CycleSpec
from recycler.service.summary import log_cycle, verdict
from recycler.service.workspace import Workspace
from recycler.stages.evaluate.curves import savings
from recycler.stages.gate import Decision, decide
from recycler.store.releases import check_version, open_source

T = TypeVar("T")
log = logging.getLogger(__name__)
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
    from recycler.registry.runs import keyed_run

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
    key, name = f"{spec.family}/{spec.variant}/{version}", f"cycle {spec.family}-{spec.variant}@{version}"
    with keyed_run(key, name, _params(spec, version, release.key, prev), settings=svc.settings) as run_id:
        c = _Cycle(svc, run, spec, ws, prev, run_id)
        # 3.–4. pre-check M_i + Δ^iter_{i−1} and make it the start (M_i itself on the first cycle)
        start, scores, precheck = c.start(base)
        # 5. M*_i = FT(start); with a baseline also FT(M_i), for the savings report and Δ^dir
        record, baseline = c.finetune(base, start, scores)
        # 6. decide: candidate, Δ source, promotion (against the champion before this cycle)
        champion = run("read champion", steps.champion_before, svc.registry, spec, version)
        decision = decide(scores, champion, spec, first=prev is None)
        # 7. Δ_i = M*_i − M_i: what the next release recycles
        tuned = ws.finetuned(decision.delta_source)
        delta = run("extract Δ", steps.extract_step, base, tuned, ws.delta, spec, parent_run=run_id)
        # 8. register the merged start, the fine-tune(s) and Δ_i with lineage; 9. promote if the gate says so
        registered = run("register cycle", register_cycle, svc, spec, ws, prev, decision, scores, delta, run_id, record, baseline)  # fmt: skip
        run("promote", promote, svc, spec, version, decision, registered)
        result = c.result(scores, champion, decision, precheck, record, baseline, registered)
        result.registered["base"] = base_v.reference
        run("log cycle", log_cycle, svc, result, record, baseline)
    _report(result)
    (ws.root / "result.json").write_text(result.model_dump_json(indent=1) + "\n")
    return result


def _report(result: CycleResult) -> None:
    """The cycle's outcome in the log (the Prefect flow run's log, the CLI's stderr)."""
    scores = ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.scores.items())
    log.info("cycle %s %s: accuracy %s", result.family, result.version, scores)
    champion = "none" if result.champion_before is None else f"{100 * result.champion_before:.1f}%"
    log.info("gate: %s (%s; champion before: %s)", verdict(result), result.gate, champion)
    registered = ", ".join(f"{v} ({k})" for k, v in result.registered.items() if v)
    log.info("registered %s", registered)


def _params(spec: CycleSpec, version: str, release: str, prev: RegisteredVersion | None) -> dict:
    mode = spec.mode if prev else "first"
    return {"family": spec.family, "variant": spec.variant, "version": version, "release": release, "mode": mode,
            "parent_diff": prev.reference if prev else "", "alpha": spec.alpha, "gate_margin": spec.gate_margin}  # fmt: skip


@dataclass
class _Cycle:
    """The parts of one cycle that its steps share (services, runner, workspace, parent Δ, MLflow run)."""

    svc: Services
    run: StepRunner
    spec: CycleSpec
    ws: Workspace
    prev: RegisteredVersion | None
    run_id: str | None

    def evaluate(self, label: str, model: Path, name: str) -> float:
        ev = self.spec.evaluation
        return self.run(
            label,
            steps.evaluate_cached,
            self.svc,
            model,
            ev,
            self.ws.evals,
            name=name,
            parent_run=self.run_id,
        )

    def start(self, base: Path) -> tuple[Path, dict[str, float], dict | None]:
        scores = {"base": self.evaluate("evaluate base", base, "base")}
        if self.prev is None:
            return base, scores, None
        run, spec, ws = self.run, self.spec, self.ws
        diff = run(
            f"fetch Δ {self.prev.reference}",
            steps.fetch_verified,
            self.svc.store,
            self.prev.artifact,
            ws.prev_diff,
        )
        precheck = None
        if spec.precheck_sample is not None:  # stop before spending GPU hours on a Δ that will not transfer
            precheck = run("pre-check M_i + Δ", steps.precheck_step, base, diff, spec)
            _stop_if_below(precheck, spec, self.prev, ws.version)
        name = f"apply Δ {self.prev.reference} to base {ws.version}"
        start = run(
            name, steps.apply_step, base, diff, ws.merged, spec.alpha, parent_run=self.run_id, name=name
        )
        scores["merged"] = self.evaluate("evaluate merged", start, "merged")
        return start, scores, precheck

    def finetune(self, base: Path, start: Path, scores: dict[str, float]) -> tuple[dict, dict | None]:
        run, spec, ws, first = self.run, self.spec, self.ws, self.prev is None
        label = "finetune from base" if first else "finetune from M+Δ"
        record = run(
            label, steps.finetune_step, self.svc, start, ws.ft, spec, role="ft", parent_run=self.run_id
        )
        scores["ft"] = self.evaluate("evaluate fine-tune", ws.ft, "ft")
        if not spec.baseline or first:  # on the first cycle FT(M_1) *is* the fine-tune
            return record, None
        label = "finetune from base (baseline)"
        baseline = run(
            label,
            steps.finetune_step,
            self.svc,
            base,
            ws.baseline,
            spec,
            role="ft-from-base",
            parent_run=self.run_id,
        )
        scores["ft_from_base"] = self.evaluate("evaluate baseline", ws.baseline, "ft-from-base")
        return record, baseline

    def result(
        self, scores, champion, decision: Decision, precheck, record, baseline, registered
    ) -> CycleResult:  # type: ignore[no-untyped-def]
        prev = self.prev
        return CycleResult(
            family=self.spec.family, version=self.ws.version, mode=self.spec.mode if prev else "first",
            parent_diff=prev.reference if prev else None, scores=scores, champion_before=champion,
            promoted=decision.promote, gate=decision.reason, precheck=precheck,
            candidate="first" if prev is None else ("recycled" if decision.candidate == "ft" else "from-base"),
            savings=savings(record, baseline) if baseline else {}, steps=record.get("steps"),
            wall_time_s=record.get("wall_time_s"), run_id=self.run_id,
            registered={k: v.reference if v else None for k, v in registered.items()},
        )  # fmt: skip


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
    record: dict,
    baseline_record: dict | None,
) -> dict[str, RegisteredVersion | None]:
    """Merged start → fine-tune(s) → Δ, each pointing at what it came from (a fine-tune at the run that
    trained it); the gate's decision is recorded on the fine-tunes before any alias moves (see
    steps.champion_before), so every later read, and a re-run, sees the same decision."""
    version, parent, fam, var = ws.version, prev.reference if prev else None, spec.family, spec.variant
    champ = "none" if decision.champion_before is None else f"{decision.champion_before:.6g}"
    gate = {"gate": decision.gate, "gate_champion_before": champ}
    register = steps.publish_and_register
    merged = None
    if prev is not None:
        lineage = Lineage(parent_diff=parent, run_id=run_id)
        merged = register(
            svc, ws.merged, "merged", fam, var, version, lineage=lineage, score=scores["merged"]
        )
    lineage = Lineage(
        parent_diff=parent, source_merged=merged.reference if merged else None, role="recycled-ft" if prev else "ft",
        run_id=record.get("mlflow_run_id") or run_id,
    )  # fmt: skip
    ft = register(svc, ws.ft, "ft", fam, var, version, lineage=lineage, score=scores["ft"], status=gate)
    crash_point("cycle:registered-ft")
    baseline = None
    if baseline_record is not None:
        lineage = Lineage(role="ft-from-base", run_id=baseline_record.get("mlflow_run_id") or run_id)
        baseline = register(svc, ws.baseline, "ft", fam, var, version, lineage=lineage, score=scores["ft_from_base"], status=gate)  # fmt: skip
    source = baseline if decision.delta_source == "ft-from-base" else ft
    lineage = Lineage(
        source_ft=source.reference, diff_mode=decision.diff_mode, cycle_parent_diff=parent, run_id=run_id
    )
    diff = register(svc, delta, "diff", fam, var, version, lineage=lineage)
    crash_point("cycle:registered-diff")
    return {"merged": merged, "ft": ft, "baseline": baseline, "diff": diff}


def promote(
    svc: Services,
    spec: CycleSpec,
    version: str,
    decision: Decision,
    registered: dict[str, RegisteredVersion | None],
) -> None:
    """Move approved-<version>, champion and next-diff if the gate promoted; then mark the cycle complete
    (last: a crash before it re-runs only this cheap tail)."""
    reg, fam, var = svc.registry, spec.family, spec.variant
    candidate = registered["baseline"] if decision.candidate == "ft-from-base" else registered["ft"]
    if decision.promote:
        reg.set_alias("ft", fam, var, champion_alias(version), candidate.version)
        reg.set_alias("ft", fam, var, CHAMPION, candidate.version)  # last: newest in the server's order
        crash_point("cycle:aliases-half-moved")
        reg.set_alias("diff", fam, var, NEXT_DIFF, registered["diff"].version)
        log.info("champion → %s, next-diff → %s", candidate.reference, registered["diff"].reference)
    reg.set_tags(registered["ft"], {"cycle_status": steps.CYCLE_COMPLETE})
