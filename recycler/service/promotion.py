"""The end of a release cycle: register what it made, with lineage, then move the aliases.

Registration comes first and carries the gate's decision (and which champion it compared against),
so a re-run decides exactly as the first attempt did; the alias moves come last, as a
compare-and-set against what the decision saw, under the family's turn.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from recycler.crashpoints import crash_point
from recycler.errors import ChainConflict
from recycler.registry.names import CHAMPION, NEXT_DIFF, Lineage, RegisteredVersion, champion_alias
from recycler.service import steps
from recycler.service.services import Services
from recycler.service.spec import CycleSpec
from recycler.service.workspace import Workspace
from recycler.stages.gate import Decision, Evidence
from recycler.store.releases import Release

log = logging.getLogger(__name__)


def register_cycle(
    svc: Services,
    spec: CycleSpec,
    ws: Workspace,
    prev: RegisteredVersion | None,
    decision: Decision,
    evidence: dict[str, Evidence],
    delta: Path,
    run_id: str | None,
    record: dict,
    baseline_record: dict | None,
    release: Release,
    champion: RegisteredVersion | None,
) -> dict[str, RegisteredVersion | None]:
    """Merged start → fine-tune(s) → Δ, each pointing at what it came from (a fine-tune at the run that
    trained it) and carrying the release's fingerprint; the gate's decision, and which champion it
    compared against, are recorded on the fine-tunes before any alias moves (see
    steps.champion_before), so every later read, and a re-run, sees the same decision."""
    version, parent, fam, var = ws.version, prev.reference if prev else None, spec.family, spec.variant
    champ = "none" if decision.champion_before is None else f"{decision.champion_before:.6g}"
    gate = {"gate": decision.gate, "gate_champion_before": champ, "gate_champion": champion.reference if champion else "none",
            "gate_evidence": f"{decision.rule}: " + "; ".join(c.text() for c in decision.comparisons)}  # fmt: skip
    other = {**gate, "gate": f"not the candidate ({'FT(M_i)' if decision.candidate == 'ft-from-base' else 'FT(M_i + Δ)'} was)"}  # fmt: skip
    register = partial(steps.publish_and_register, fingerprint=release.fingerprint)
    merged = None
    if prev is not None:
        lineage = Lineage(parent_diff=parent, run_id=run_id)
        merged = register(
            svc, ws.merged, "merged", fam, var, version, lineage=lineage, score=evidence["merged"]
        )
    lineage = Lineage(
        parent_diff=parent, source_merged=merged.reference if merged else None, role="recycled-ft" if prev else "adopted" if record.get("adopted") else "ft",
        run_id=record.get("mlflow_run_id") or run_id,
    )  # fmt: skip
    ft_status = gate if decision.candidate == "ft" else other
    ft = register(
        svc, ws.ft, "ft", fam, var, version, lineage=lineage, score=evidence["ft"], status=ft_status
    )
    crash_point("cycle:registered-ft")
    baseline = None
    if baseline_record is not None:
        lineage = Lineage(role="ft-from-base", run_id=baseline_record.get("mlflow_run_id") or run_id)
        status = gate if decision.candidate == "ft-from-base" else other
        baseline = register(svc, ws.baseline, "ft", fam, var, version, lineage=lineage, score=evidence["ft_from_base"], status=status)  # fmt: skip
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
    release: Release,
    decision: Decision,
    registered: dict[str, RegisteredVersion | None],
    champion: RegisteredVersion | None,
    prev: RegisteredVersion | None,
) -> None:
    """Move approved-<version>, champion and next-diff if the gate promoted, as a compare-and-set
    against what the decision saw (`champion`, `prev`); then mark the cycle complete (last: a crash
    before it re-runs only this cheap tail).

    Alias moves are made only by the holder of the family's turn, so the compare and the set cannot
    interleave with another cycle's; an alias that moved anyway (by hand) stops the cycle with
    ChainConflict and nothing moved. A re-run finds its own earlier attempt's move (whole, or half:
    champion on one of its fine-tunes, next-diff not yet on its Δ) and finishes it, or takes it back
    when it now decides not to promote (an edited task file re-scored everything): `champion` and
    `next-diff` always end up from the same cycle.
    """
    reg, fam, var = svc.registry, spec.family, spec.variant
    candidate = registered["baseline"] if decision.candidate == "ft-from-base" else registered["ft"]
    diff = registered["diff"]
    assert candidate is not None and diff is not None
    mine = {v.version for v in (registered["ft"], registered["baseline"]) if v is not None}
    now_champ, now_next = reg.get_alias("ft", fam, var, CHAMPION), reg.get_alias("diff", fam, var, NEXT_DIFF)
    moved_by_us = _ver(now_champ) in mine and _ver(now_next) in (_ver(prev), diff.version)
    if (_ver(now_champ), _ver(now_next)) != (_ver(champion), _ver(prev)) and not moved_by_us:
        raise ChainConflict(
            f"{fam}-{var}: the aliases moved since this cycle decided (champion {_ref(now_champ)}, "
            f"next-diff {_ref(now_next)}; expected {_ref(champion)}, {_ref(prev)}); nothing was promoted. "
            f"Re-run the cycle of {release.version} to re-decide against the current champion"
        )
    if decision.promote:
        reg.set_alias("ft", fam, var, champion_alias(release.version), candidate.version)
        reg.set_alias("ft", fam, var, CHAMPION, candidate.version)  # last: newest in the server's order
        crash_point("cycle:aliases-half-moved")
        reg.set_alias("diff", fam, var, NEXT_DIFF, diff.version)
        log.info("champion → %s, next-diff → %s", candidate.reference, diff.reference)
    elif moved_by_us:  # an earlier attempt promoted; this one does not: take the move back
        reg.delete_alias("ft", fam, var, champion_alias(release.version))
        _restore(reg, "diff", fam, var, NEXT_DIFF, prev)
        _restore(reg, "ft", fam, var, CHAMPION, champion)
        log.info(
            "an earlier attempt's promotion taken back: champion %s, next-diff %s", _ref(champion), _ref(prev)
        )
    reg.set_tags(registered["ft"], {"cycle_status": steps.CYCLE_COMPLETE})
    crash_point("cycle:complete-tagged")


def _restore(reg, kind: str, fam: str, var: str, alias: str, to: RegisteredVersion | None) -> None:  # type: ignore[no-untyped-def]
    if to is None:
        reg.delete_alias(kind, fam, var, alias)
    else:
        reg.set_alias(kind, fam, var, alias, to.version)


def _ver(v: RegisteredVersion | None) -> str | None:
    return v.version if v is not None else None


def _ref(v: RegisteredVersion | None) -> str:
    return v.reference if v is not None else "none"
