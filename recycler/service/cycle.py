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
from recycler.errors import ChainBlocked, GateRefused
from recycler.registry.names import Lineage, RegisteredVersion
from recycler.service import steps
from recycler.service.adapters import publish_adapter
from recycler.service.adopt import adopt_step
from recycler.service.chain import ChainTurn, mark_complete
from recycler.service.promotion import promote, register_cycle
from recycler.service.services import Services
from recycler.service.spec import CycleSpec
from recycler.service.summary import log_cycle, verdict
from recycler.service.workspace import Workspace
from recycler.stages.evaluate.curves import savings
from recycler.stages.gate import Decision, Evidence, decide
from recycler.store.releases import Release, check_version

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
    evidence: list[str] = []  # the gate's paired comparisons, with their confidence intervals
    gate_rule: str = ""


def run_cycle(
    version: str,
    source: str,
    spec: CycleSpec,
    *,
    services: Services | None = None,
    run: StepRunner = run_locally,
    attempt: int | None = None,
    fingerprint: str | None = None,
    wait: float | None = None,
) -> CycleResult:
    """Algorithm 1 for the base release `version` of `source`: apply the family's Δ^iter, fine-tune,
    evaluate, decide, extract the new Δ^iter, register everything with lineage, promote if it wins.

    The cycle holds the family's turn (recycler.service.chain) from start to end: it starts only when
    every earlier release is terminal, and waits up to `wait` seconds (default: the turn's ttl, so a
    dead holder's turn is taken over) for a cycle running elsewhere. `attempt` and `fingerprint` are
    given by a watcher that dispatched this run as a deployment: the attempt it recorded, and the
    release content it dispatched for (a release re-published since is not processed under it).
    """
    from recycler.registry.runs import keyed_run

    check_version(version)  # before any I/O
    svc = services or Services.from_settings()
    source_of = steps.open_releases(svc, source, spec)
    listing = run("list releases", steps.list_releases, source_of)
    release = steps.find_release(source_of, version, listing)
    if fingerprint and release.fingerprint[: len(fingerprint)] != fingerprint:
        raise ChainBlocked(
            f"{version} was re-published ({release.fingerprint[:12]}) since this run was started for {fingerprint[:12]}"
        )
    # 0. a cycle that finished (recorded in the registry, not in a watcher) is a no-op
    if done := run("check for a finished cycle", steps.completed_cycle, svc.registry, spec, release):
        return _already_complete(svc, spec, release, done)
    key = steps.cycle_key(spec, release)
    turn = ChainTurn(svc, spec, release, listing, attempt=attempt, wait=svc.settings.chain_lease_ttl + 10 if wait is None else wait)  # fmt: skip
    with turn:
        if turn.done:
            return _already_complete(svc, spec, release, steps.completed_cycle(svc.registry, spec, release))
        crash_point("cycle:turn-taken")
        # 1. detect M_i: the release exists; stage, publish and register it
        ws = Workspace.for_release(svc.settings.home, spec.family, spec.variant, version)
        base = run(f"stage base {version}", steps.stage_base, source_of, release, ws.download, ws.base)
        base_v = run(f"register base {version}", steps.publish_and_register, svc, base, "base", spec.family,
                     spec.variant, version, fingerprint=release.fingerprint)  # fmt: skip
        # 2. Δ^iter_{i−1}: the family's next-diff (none on the first cycle)
        prev = run("resolve next-diff", steps.previous_diff, svc.registry, spec, release)
        name = f"cycle {spec.family}-{spec.variant}@{version}"
        with keyed_run(key, name, _params(spec, version, release.key, prev), settings=svc.settings) as run_id:
            c = _Cycle(svc, run, spec, ws, prev, run_id, release)
            try:
                result = c.body(base, base_v, turn)
            except Exception as e:
                note_failure(run_id, spec, release, e, turn)
                raise
        turn.complete(f"{verdict(result)}: {result.gate}")
        crash_point("cycle:chain-complete")
    _report(result)
    (ws.root / "result.json").write_text(result.model_dump_json(indent=1) + "\n")
    return result


def _already_complete(svc: Services, spec: CycleSpec, release: Release, done: RegisteredVersion | None) -> CycleResult:  # fmt: skip
    """The result of a finished cycle, read back; its chain entry and MLflow run are brought to
    `complete`/FINISHED if a crash came between the last registry write and those."""
    from recycler.registry.runs import finish_keyed_run

    assert done is not None
    mark_complete(svc, spec, release, done)
    finish_keyed_run(
        steps.cycle_key(spec, release), svc.settings, f"complete (gate: {done.tags.get('gate', '?')})"
    )
    return CycleResult(family=spec.family, version=release.version, status="already-complete",
                       registered={"ft": done.reference}, scores={"ft": done.score() or 0.0},
                       promoted=done.tags.get("gate") == "promoted")  # fmt: skip


def note_failure(run_id: str | None, spec: CycleSpec, release: Release, error: Exception, turn: ChainTurn) -> None:  # fmt: skip
    """The cycle's run says how it ended when it did not complete (the run itself ends FAILED)."""
    from recycler.registry.runlog import set_note

    first = (str(error).splitlines() or [type(error).__name__])[0]
    what = "refused" if isinstance(error, GateRefused) else "failed"
    attempt = turn.entry.attempts if turn.entry else "?"
    again = (
        ""
        if what == "refused"
        else f" Attempt {attempt} of {spec.max_attempts}; a re-run resumes from the verified outputs."
    )
    set_note(
        run_id,
        f"**Release cycle {spec.family} {release.version}: {what}.** {type(error).__name__}: {first}.{again}\n",
    )


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
    release: Release

    def body(self, base: Path, base_v: RegisteredVersion, turn: ChainTurn) -> CycleResult:
        run, svc, spec, ws, prev, release = self.run, self.svc, self.spec, self.ws, self.prev, self.release
        # 3.–4. pre-check M_i + Δ^iter_{i−1} and make it the start (M_i itself on the first cycle)
        start, evidence, precheck = self.start(base)
        # 5. M*_i = FT(start); with a baseline also FT(M_i), for the savings report and Δ^dir
        record, baseline = self.finetune(base, start, evidence)
        crash_point("cycle:finetuned")
        # 6. decide: candidate, Δ source, promotion, against the champion before this cycle, measured
        #    like this cycle's models (re-scored when its recorded score measured something else)
        champ_v = run("read champion", steps.champion_before, svc.registry, spec, release)
        champion = self.champion_evidence(champ_v)
        decision = decide(evidence, champion, spec, first=prev is None)
        # 7. Δ_i = M*_i − M_i: what the next release recycles
        tuned = ws.finetuned(decision.delta_source)
        delta = run("extract Δ", steps.extract_step, base, tuned, ws.delta, spec, parent_run=self.run_id)
        crash_point("cycle:extracted")
        # 8. register the merged start, the fine-tune(s) and Δ_i with lineage; 9. promote if the gate says so
        turn.check()
        registered = run("register cycle", register_cycle, svc, spec, ws, prev, decision, evidence, delta, self.run_id, record, baseline, release, champ_v)  # fmt: skip
        if spec.adapter is not None:  # Δ_i's adapter form too, scored next to it (before the cycle completes)
            registered["lora"], evidence["lora"] = publish_adapter(
                svc, run, delta_v=registered["diff"], delta=delta, base=base, folder=ws.lora, form=spec.adapter,
                evaluation=spec.evaluation, evals=ws.evals, lineage=Lineage(run_id=self.run_id),
                release_fingerprint=release.fingerprint, parent_run=self.run_id,
            )  # fmt: skip
        turn.check()
        run("promote", promote, svc, spec, release, decision, registered, champ_v, prev)
        scores = {k: e.score for k, e in evidence.items()}
        result = self.result(scores, decision, precheck, record, baseline, registered)
        result.registered["base"] = base_v.reference
        run("log cycle", log_cycle, svc, result, record, baseline)
        return result

    def evaluate(self, label: str, model: Path, name: str) -> Evidence:
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

    def champion_evidence(self, champ: RegisteredVersion | None) -> Evidence | None:
        """The champion's score under this cycle's evaluation: its registered one if it measured the
        same thing (same provenance, with per-example outcomes), else the champion re-scored now."""
        if champ is None:
            return None
        recorded = steps.registered_evidence(champ)
        if (
            recorded is not None
            and recorded.provenance == self.spec.evaluation.provenance()
            and recorded.outcomes
        ):
            return recorded
        folder = self.ws.root / f"champion-{champ.digest[:16]}"
        fetched = self.run(f"fetch champion {champ.reference}", steps.fetch_verified, self.svc.store, champ.artifact, folder)  # fmt: skip
        return self.evaluate(f"re-score champion {champ.reference}", fetched, "champion")

    def start(self, base: Path) -> tuple[Path, dict[str, Evidence], dict | None]:
        evidence = {"base": self.evaluate("evaluate base", base, "base")}
        if self.prev is None:
            return base, evidence, None
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
        evidence["merged"] = self.evaluate("evaluate merged", start, "merged")
        return start, evidence, precheck

    def finetune(self, base: Path, start: Path, evidence: dict[str, Evidence]) -> tuple[dict, dict | None]:
        run, spec, ws, first = self.run, self.spec, self.ws, self.prev is None
        if first and spec.initial_finetune is not None:  # the family's existing fine-tune is M*_1
            record = run(
                f"adopt {spec.initial_finetune.name}", adopt_step, base, spec.initial_finetune, ws.ft, spec
            )
        else:
            label = "finetune from base" if first else "finetune from M+Δ"
            record = run(label, steps.finetune_step, self.svc, start, ws.ft, spec, role="ft", parent_run=self.run_id)  # fmt: skip
        evidence["ft"] = self.evaluate("evaluate fine-tune", ws.ft, "ft")
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
        evidence["ft_from_base"] = self.evaluate("evaluate baseline", ws.baseline, "ft-from-base")
        return record, baseline

    def result(self, scores, decision: Decision, precheck, record, baseline, registered) -> CycleResult:  # type: ignore[no-untyped-def]
        prev = self.prev
        gate = decision.reason
        return CycleResult(
            family=self.spec.family, version=self.ws.version, mode=self.spec.mode if prev else "first",
            parent_diff=prev.reference if prev else None, scores=scores, champion_before=decision.champion_before,
            promoted=decision.promote, gate=gate, precheck=precheck,
            candidate="first" if prev is None else ("recycled" if decision.candidate == "ft" else "from-base"),
            savings=savings(record, baseline) if baseline else {}, steps=record.get("steps"),
            wall_time_s=record.get("wall_time_s"), run_id=self.run_id,
            evidence=[c.text() for c in decision.comparisons], gate_rule=decision.rule,
            registered={k: v.reference if v else None for k, v in registered.items()},
        )  # fmt: skip


def _stop_if_below(precheck: dict, spec: CycleSpec, prev: RegisteredVersion, version: str) -> None:
    if spec.precheck_min_score is not None and precheck["score"] < spec.precheck_min_score:
        raise GateRefused(
            f"pre-check score {precheck['score']:.4f} of {prev.reference} on {version} is below "
            f"{spec.precheck_min_score}; the cycle stops before fine-tuning"
        )
