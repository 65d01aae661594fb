"""Every branch of the release cycle (recycler.service.cycle.run_cycle) with a fake trainer and scorer:
no training, no servers (MLflow on a SQLite file, a local artifact store), seconds per cycle.

The fakes (tests/fakes.py) write real HF folders, so staging, apply, extract, publish and registration
all run for real; only the fine-tune is a perturbation and the scores come from a table.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakes import aliases, services

from recycler.errors import ChainBlocked, GateRefused
from recycler.registry.chain import ChainLedger
from recycler.service import steps
from recycler.service.chain import operator_update
from recycler.service.cycle import run_cycle, run_locally
from recycler.service.services import Services
from recycler.settings import Settings
from recycler.stages.gate import decide
from recycler.store.releases import Release

FIRST = {("v1", "ft"): 0.6}
SECOND = {**FIRST, ("v2", "merged"): 0.4, ("v2", "ft"): 0.7, ("v2", "ft_from_base"): 0.65}


# ---- the decision, as a pure function ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "champion", "kw", "first", "expected"),
    [
        ({"base": 0.1, "ft": 0.6}, None, {}, True, ("ft", "ft", "direct", True)),
        ({"base": 0.1, "merged": 0.4, "ft": 0.7}, 0.6, {}, False, ("ft", "ft", "iterative", True)),
        (
            {"base": 0.1, "ft": 0.7, "ft_from_base": 0.8},
            0.6,
            {},
            False,
            ("ft-from-base", "ft-from-base", "direct", True),
        ),
        (
            {"base": 0.1, "ft": 0.7, "ft_from_base": 0.8},
            0.6,
            {"pick_best": False},
            False,
            ("ft", "ft", "iterative", True),
        ),
        (
            {"base": 0.1, "ft": 0.8, "ft_from_base": 0.7},
            0.6,
            {"mode": "direct", "baseline": True},
            False,
            ("ft", "ft-from-base", "direct", True),
        ),
        ({"base": 0.1, "ft": 0.62}, 0.6, {"gate_margin": 0.05}, False, ("ft", "ft", "iterative", False)),
        ({"base": 0.5, "ft": 0.5}, None, {}, True, ("ft", "ft", "direct", False)),  # a tie never promotes
        ({"base": 0.5, "ft": 0.49}, None, {}, True, ("ft", "ft", "direct", False)),
    ],
)
def test_decide(world, scores, champion, kw, first, expected):
    spec = world[3](**kw)
    d = decide(scores, champion, spec, first=first)
    assert (d.candidate, d.delta_source, d.diff_mode, d.promote) == expected
    assert d.champion_before == champion
    assert d.gate == "promoted" if d.promote else d.gate.startswith("refused: ")


# ---- cycles ----------------------------------------------------------------------------------------------


def test_first_cycle_fine_tunes_the_base_and_registers_ft_and_its_delta(world):
    releases, settings, publish, spec = world
    publish("v1")
    svc = services(settings, FIRST)
    out = run_cycle("v1", str(releases), spec(), services=svc)
    assert (out.mode, out.candidate, out.promoted, out.parent_diff) == ("first", "first", True, None)
    assert out.registered["merged"] is None and out.scores == {"base": 0.0, "ft": 0.6}
    ((start, dest),) = svc.trainer.calls
    assert start.name == "base" and dest.name == "ft"
    ft, diff = svc.registry.resolve(out.registered["ft"]), svc.registry.resolve(out.registered["diff"])
    assert ft.tags["role"] == "ft" and ft.tags["cycle_status"] == "complete" and ft.tags["gate"] == "promoted"
    assert ft.tags["gate_champion_before"] == "none" and "parent_diff" not in ft.tags
    assert diff.tags["source_ft"] == ft.reference and "cycle_parent_diff" not in diff.tags
    assert aliases(svc, "ft:fam:inst") == {"champion": ft.version, "approved-v1": ft.version}
    assert aliases(svc, "diff:fam:inst") == {"next-diff": diff.version}
    # a finished cycle is a no-op: nothing trained, nothing registered again
    again = run_cycle("v1", str(releases), spec(), services=svc)
    assert again.status == "already-complete" and len(svc.trainer.calls) == 1


def test_iterative_cycle_fine_tunes_from_base_plus_delta(world):
    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, SECOND)
    first = run_cycle("v1", str(releases), spec(), services=svc)
    out = run_cycle("v2", str(releases), spec(), services=svc)
    assert (out.mode, out.candidate, out.parent_diff) == ("iterative", "recycled", first.registered["diff"])
    assert out.scores["merged"] == 0.4 and "ft_from_base" not in out.scores  # no baseline asked for
    start, dest = svc.trainer.calls[-1]
    assert start.name == "merged" and dest.parent.name == "v2"
    merged = svc.registry.resolve(out.registered["merged"])
    ft = svc.registry.resolve(out.registered["ft"])
    diff = svc.registry.resolve(out.registered["diff"])
    assert merged.tags["parent_diff"] == first.registered["diff"]
    assert ft.tags["source_merged"] == merged.reference and ft.tags["role"] == "recycled-ft"
    assert diff.tags["diff_mode"] == "iterative" and diff.tags["source_ft"] == ft.reference
    assert diff.tags["cycle_parent_diff"] == first.registered["diff"]
    assert aliases(svc, "diff:fam:inst")["next-diff"] == diff.version
    assert aliases(svc, "ft:fam:inst")["champion"] == ft.version


def test_direct_mode_recycles_the_baseline_delta(world):
    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, SECOND)
    run_cycle("v1", str(releases), spec(mode="direct", baseline=True), services=svc)
    out = run_cycle("v2", str(releases), spec(mode="direct", baseline=True), services=svc)
    assert out.mode == "direct" and out.scores["ft_from_base"] == 0.65 and out.candidate == "recycled"
    assert [d.name for _, d in svc.trainer.calls] == ["ft", "ft", "ft-from-base"]
    diff = svc.registry.resolve(out.registered["diff"])
    baseline = svc.registry.resolve(out.registered["baseline"])
    assert diff.tags["diff_mode"] == "direct" and diff.tags["source_ft"] == baseline.reference
    assert baseline.tags["role"] == "ft-from-base"
    assert (
        out.savings["steps_to_target"] == 30 and out.savings["baseline_steps"] == 30
    )  # 0.7·s/30 ≥ 0.65 at s=30


def test_baseline_wins_with_pick_best_and_becomes_champion(world):
    releases, settings, publish, spec = world
    publish("v1", "v2")
    scores = {**SECOND, ("v2", "ft_from_base"): 0.9}
    svc = services(settings, scores)
    run_cycle("v1", str(releases), spec(baseline=True), services=svc)
    out = run_cycle("v2", str(releases), spec(baseline=True), services=svc)
    assert out.candidate == "from-base" and out.promoted
    baseline = svc.registry.resolve(out.registered["baseline"])
    diff = svc.registry.resolve(out.registered["diff"])
    assert aliases(svc, "ft:fam:inst")["champion"] == baseline.version
    assert diff.tags["source_ft"] == baseline.reference and diff.tags["diff_mode"] == "direct"
    # without pick_best the recycled fine-tune stays the candidate whatever the baseline scores
    publish("v3")
    scores[("v3", "ft")], scores[("v3", "ft_from_base")] = 0.95, 0.99
    out3 = run_cycle("v3", str(releases), spec(baseline=True, pick_best=False), services=svc)
    assert out3.candidate == "recycled"
    assert svc.registry.resolve(out3.registered["diff"]).tags["diff_mode"] == "iterative"


def test_refused_gate_moves_no_alias_but_completes_the_cycle(world):
    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, {**SECOND, ("v2", "ft"): 0.61})
    first = run_cycle("v1", str(releases), spec(), services=svc)
    out = run_cycle("v2", str(releases), spec(gate_margin=0.05), services=svc)
    assert (
        not out.promoted
        and "vs champion, interval" in out.gate
        and "not above +0.05 (superiority)" in out.gate
    )
    ft = svc.registry.resolve(out.registered["ft"])
    assert ft.tags["gate"].startswith("refused") and ft.tags["cycle_status"] == "complete"
    assert aliases(svc, "ft:fam:inst") == {"champion": "1", "approved-v1": "1"}
    assert aliases(svc, "diff:fam:inst") == {
        "next-diff": svc.registry.resolve(first.registered["diff"]).version
    }
    # v3 therefore recycles v1's Δ, not the refused cycle's
    publish("v3")
    v3 = Release("fam", "v3", "", "0" * 64)  # the next release applies the last promoted Δ
    assert steps.previous_diff(svc.registry, spec(), v3).reference == first.registered["diff"]


def test_precheck_below_threshold_stops_before_fine_tuning(world, tiny_releases):
    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, SECOND)
    run_cycle("v1", str(releases), spec(), services=svc)
    strict = spec(precheck_sample=tiny_releases["sample"], precheck_min_score=10.0)  # unreachable
    with pytest.raises(GateRefused, match="pre-check score .* is below 10.0"):
        run_cycle("v2", str(releases), strict, services=svc)
    assert len(svc.trainer.calls) == 1  # only v1's
    assert [v.tags["base_version"] for v in svc.registry.versions("ft", "fam", "inst")] == ["v1"]
    (entry,) = [e for e in ChainLedger(svc.registry, "fam", "inst").entries().values() if e.version == "v2"]
    assert entry.state == "refused" and "pre-check score" in entry.reason  # terminal, with its reason
    with pytest.raises(ChainBlocked, match="v2 is refused .*recycler chain retry v2"):  # not re-checked
        run_cycle("v2", str(releases), strict, services=svc)
    operator_update(svc, strict, "v2", "retry")  # an operator lowers the bar and asks again
    out = run_cycle(
        "v2",
        str(releases),
        spec(precheck_sample=tiny_releases["sample"], precheck_min_score=-10.0),
        services=svc,
    )
    assert set(out.precheck) == {"score", "probe_gain", "target_loss"} and out.promoted


def test_rerun_after_aliases_half_moved_decides_as_the_first_attempt(world):
    """A crash between moving `champion` and `next-diff`: the re-run must compare against the champion
    *before* the cycle (recorded on its fine-tune), not against its own candidate, and finish the move."""
    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, SECOND)
    run_cycle("v1", str(releases), spec(), services=svc)

    def crash_in_promote(label, fn, *args, **kwargs):
        if label == "promote":
            registered = args[4]
            svc.registry.set_alias("ft", "fam", "inst", "champion", registered["ft"].version)  # half moved
            raise RuntimeError("killed")
        return run_locally(label, fn, *args, **kwargs)

    margin = spec(gate_margin=0.05)  # 0.7 beats 0.6 + 0.05, but not itself + 0.05
    with pytest.raises(RuntimeError, match="killed"):
        run_cycle("v2", str(releases), margin, services=svc, run=crash_in_promote)
    out = run_cycle("v2", str(releases), margin, services=svc)
    assert out.promoted and out.champion_before == 0.6
    assert aliases(svc, "diff:fam:inst")["next-diff"] == svc.registry.resolve(out.registered["diff"]).version
    assert [len(svc.registry.versions(k, "fam", "inst")) for k in ("ft", "diff", "merged")] == [2, 2, 1]


def test_invalid_or_missing_release_is_refused_before_any_write(world):
    releases, settings, publish, spec = world
    publish("v1")
    svc = services(settings, FIRST)
    for bad in ("../v1", "v1/../../etc", "", "v1 ; rm -rf /"):
        with pytest.raises(Exception, match="invalid version"):
            run_cycle(bad, str(releases), spec(), services=svc)
    with pytest.raises(Exception, match=r"no release 'v9' .* \(it has: v1\)"):
        run_cycle("v9", str(releases), spec(), services=svc)
    assert not (settings.home / "work" / "fam" / "inst" / "v9").exists()
    assert not Path(settings.artifact_store).exists()


# ---- manual transfers ---------------------------------------------------------------------------------


def test_backport_result_depends_on_every_input_and_is_never_reused_for_others(world):
    """α, the Δ and the base each change the result; the same request again changes nothing."""
    from recycler.service.transfer import TransferRequest, run_transfer

    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, {**SECOND, ("v1", "backport"): 0.5, ("v2", "backport"): 0.55})
    first = run_cycle("v1", str(releases), spec(), services=svc)
    run_cycle("v2", str(releases), spec(), services=svc)

    def backport(diff: str, target: str, alpha: float) -> str:
        request = TransferRequest.of(spec(), alpha=alpha)
        out = run_transfer("backport", diff, target, request, services=svc)
        return svc.registry.resolve(out.registered).digest

    a = backport("fam-inst-diff@next-diff", "v1", 1.0)
    assert backport("fam-inst-diff@next-diff", "v1", 1.0) == a  # the same request: the same version
    results = {
        "alpha": backport("fam-inst-diff@next-diff", "v1", 0.5),
        "delta": backport(first.registered["diff"], "v1", 1.0),
        "base": backport("fam-inst-diff@next-diff", "v2", 1.0),
    }
    assert len({a, *results.values()}) == 4, results  # every input changed the weights
    merged = svc.registry.versions("merged", "fam", "inst")
    assert len(merged) == 1 + 4  # v2's cycle start, then one per distinct backport
    assert {v.tags.get("transfer") for v in merged[1:]} == {"backport"}
    with pytest.raises(Exception, match="needs the family's spec"):
        TransferRequest.of(None, family="fam")


def test_the_same_backport_from_two_homes_is_one_artifact_and_one_version(world, tmp_path):
    """Two workers with different RECYCLER_HOMEs (different mounts) sharing a store and a registry:
    content addresses depend on content only, so identical weights get one address, one version."""
    from recycler.service.transfer import TransferRequest, run_transfer

    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, SECOND)
    run_cycle("v1", str(releases), spec(), services=svc)
    run_cycle("v2", str(releases), spec(), services=svc)
    other_home = Settings(
        home=tmp_path / "elsewhere",
        tracking_uri=settings.tracking_uri,
        artifact_store=settings.artifact_store,
    )
    other = Services(other_home, svc.store, svc.registry, svc.trainer, svc.scorer)
    outs = [
        run_transfer("backport", "fam-inst-diff@next-diff", "v1", TransferRequest.of(spec()), services=s)
        for s in (svc, other)
    ]
    assert outs[0].registered == outs[1].registered
    assert len([v for v in svc.registry.versions("merged", "fam", "inst") if v.tags.get("transfer")]) == 1
    assert len(svc.store.list("model")) == len(
        {v.digest for k in ("ft", "merged") for v in svc.registry.versions(k, "fam", "inst")}
    )


def test_cli_cycle_for_a_missing_release_answers_in_one_line_and_writes_nothing(world, tmp_path):
    """Before: a 40-line traceback after a Prefect server start, and a new MLflow database."""
    import subprocess
    import sys

    import yaml

    releases, settings, publish, spec = world
    publish("v1", "v2")
    spec_file = tmp_path / "family.yaml"
    spec_file.write_text(yaml.safe_dump(spec().model_dump(mode="json")))
    env = {**os.environ, "RECYCLER_HOME": str(settings.home), "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run(
        [sys.executable, "-m", "recycler.cli", "cycle", "v9", str(releases), "--spec", str(spec_file)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 8, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: no release 'v9' of family 'fam' in the release source (it has: v1, v2)"
    ]
    assert not (settings.home / "mlflow.db").exists() and not (tmp_path / "prefect").exists()
