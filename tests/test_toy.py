"""Toy family, `recycler reproduce --fast` end to end, and the transferability pre-check.

One fast family is built per session and shared; the determinism test builds it a second time into
another folder. The whole module takes about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import typer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from recycler.cli.toy import register
from recycler.errors import IncompatibleCheckpoints
from recycler.settings import Settings, get_settings
from recycler.stages.evaluate.evaluators import load_task
from recycler.stages.finetune.data import load_sft_records
from recycler.stages.precheck import PrecheckError, precheck
from recycler.toy.family import build_family
from recycler.toy.findings import accuracy_noise, spearman, steps_or_inf
from recycler.toy.lora_costs import LoraPlan
from recycler.toy.reproduce import reproduce
from recycler.toy.tiny import build_tiny_model
from recycler.toy.world import WorldConfig, excluded_problems, task_problems, world_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def weight_digests(family) -> dict[str, str]:
    return {
        v: hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        for v, path in family.versions.items()
    }


LORA_RANKS = (1, 4)


@pytest.fixture(scope="session")
def fast_run(fast_family, toy_cache, tmp_path_factory):
    """`reproduce --fast --lora`, one seed, tracked to MLflow in its own home (OUTPUT/../tracking)."""
    out = tmp_path_factory.mktemp("reproduce") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECYCLER_TRACK", "1")
        mp.setenv("RECYCLER_HOME", str(out.parent / "tracking"))
        for var in ("RECYCLER_TRACKING_URI", "RECYCLER_REGISTRY_URI"):
            mp.delenv(var, raising=False)
        get_settings.cache_clear()
        try:
            lora = LoraPlan(ranks=LORA_RANKS)
            return reproduce(out, fast=True, seeds=1, cache=toy_cache, keep_work=True, lora=lora)
        finally:
            get_settings.cache_clear()


# ---- the family ---------------------------------------------------------------------------------------


def test_fast_family_layout(fast_family):
    assert list(fast_family.versions) == ["v1", "v2", "v3", "v4", "v5"]
    for path in fast_family.versions.values():
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(fast_family.versions["v5"])
    assert model.config.hidden_size == fast_family.config.hidden
    assert len(load_sft_records(fast_family.train)) == fast_family.config.n_train
    assert len(load_task(fast_family.test).examples) == fast_family.config.n_test
    assert fast_family.finetune_config.learning_rate == 1e-3


def test_task_problems_never_in_pretraining():
    cfg = world_config(fast=True)
    splits = task_problems(cfg)
    seen = {name: {(op, min(a, b), max(a, b)) for op, a, b in ps} for name, ps in splits.items()}
    assert not (seen["train"] & seen["test"]) and not (seen["dev"] & seen["test"])
    excluded = excluded_problems(splits)
    assert all((op, a, b) in excluded and (op, b, a) in excluded for op, a, b in splits["test"])
    assert task_problems(world_config(fast=True, seed=1)) != splits


def test_family_is_deterministic_and_cached(tmp_path):
    """Same seed, same bytes: two builds in separate folders of the fast configuration with a tenth of
    its pretraining (the same code path as the fast and full families, at a tenth of the test time)."""
    short = {"warmup_steps": 10, "stage1_steps": 60, "stage1_checkpoints": (20, 40, 60)}
    short |= {"stage2_steps": 30, "stage2_checkpoints": (15, 30)}
    config = WorldConfig(**{**world_config(fast=True).model_dump(), **short})
    first = build_family(tmp_path / "a", config)
    again = build_family(tmp_path / "b", config)
    assert weight_digests(again) == weight_digests(first)
    assert again.test.read_bytes() == first.test.read_bytes()
    assert again.train.read_bytes() == first.train.read_bytes()
    before = {p: p.stat().st_mtime_ns for p in again.versions.values()}
    reused = build_family(tmp_path / "b", config)  # cached: nothing rebuilt
    assert reused.root == again.root
    assert {p: p.stat().st_mtime_ns for p in reused.versions.values()} == before


# ---- reproduce --fast ----------------------------------------------------------------------------------


def test_reproduce_fast_writes_report(fast_run):
    out = fast_run.out
    for name in (
        "report.md",
        "results.json",
        "transfer.png",
        "convergence.png",
        "iterative.png",
        "precheck.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "smoke test" in report and "## 2. Transfer without training" in report
    results = json.loads((out / "results.json").read_text())
    run = results["runs"][0]
    V = run["versions"]
    assert len(V) == 3
    assert set(run["transfer"]) == set(V) and all(len(row) == len(V) - 1 for row in run["transfer"].values())
    assert set(run["recycled_curve"]) == set(V[1:]) and set(run["iter_ft"]) == {V[2]}
    assert set(run["precheck"]) == set(V)
    assert "precheck_spearman" in results["findings"]


def test_fast_finetuning_lifts_accuracy(fast_run):
    """Real behaviour, not just plumbing: fine-tuning the strongest fast version clearly helps."""
    run = json.loads((fast_run.out / "results.json").read_text())["runs"][0]
    last = run["versions"][-1]
    assert run["ft"][last] > run["base"][last] + 0.03, (run["base"], run["ft"])
    assert all(run["ft"][v] >= run["base"][v] for v in run["versions"])


# ---- reproduce --lora: what the adapter form costs --------------------------------------------------------


def test_lora_section_rank_table(fast_run):
    """The rank table is real: the error falls with rank and is 0 at full rank over the adapted matrices,
    where only the norm vectors' Δ (left out, reported) separates the adapter from the exact Δ."""
    run = json.loads((fast_run.out / "results.json").read_text())["runs"][0]
    lora, V = run["lora"], run["versions"]
    assert lora["target"] == V[-1] and set(lora["cases"]) == {"own", "recycled"}
    noise = accuracy_noise(0.5, run["n_test"])
    for case in lora["cases"].values():
        ranks = case["ranks"]
        assert list(ranks) == [*map(str, LORA_RANKS), "full"]
        errors = [r["error_matrices"] for r in ranks.values()]
        assert errors == sorted(errors, reverse=True) and errors[-2] > 0.01 and errors[-1] < 1e-5, errors
        full = ranks["full"]
        assert full["max_rank"] == run["family"]["config"]["hidden"]  # every matrix at min(rows, cols)
        assert 0 < full["dropped_share"] < 0.05
        assert full["error_all"] == pytest.approx(full["dropped_share"] ** 0.5, rel=1e-3)
        # a full-rank adapter keeps the exact Δ's accuracy within the noise floor
        assert abs(full["accuracy"] - case["exact"]) <= noise, case
    # M_i + Δ^iter_i is the iterative chain's fine-tune of M_i, M_i + Δ^iter_{i-1} its recycled start:
    # the exact Δs reproduce the cycle's own scores
    own, recycled = lora["cases"]["own"], lora["cases"]["recycled"]
    assert own["exact"] == run["iter_ft"][V[-1]] and recycled["exact"] == run["iter_start"][V[-1]]
    # and a rank-1 adapter of the fine-tune loses most of what it learned: the table tells ranks apart
    assert own["ranks"]["1"]["accuracy"] < own["exact"] - 4 * noise, own


def test_lora_section_finetuning_and_report(fast_run):
    run = json.loads((fast_run.out / "results.json").read_text())["runs"][0]
    lora = run["lora"]
    assert lora["finetune_config"]["r"] == LoraPlan().r
    curves = lora["ft_curve"]
    assert curves["base"][-1][0] == curves["recycled"][-1][0] == run["finetune_config"]["max_steps"]
    # the paper's finding with adapters: LoRA from M_i + Δ^iter ends above LoRA from M_i
    finding = fast_run.findings["lora_ft_recycled_ends_higher"]
    assert finding["per_seed"] == [lora["ft"]["recycled"] - lora["ft"]["base"]]
    assert lora["ft"]["recycled"] > lora["ft"]["base"] + finding["noise"], lora["ft"]
    report = (fast_run.out / "report.md").read_text()
    assert "## 6. LoRA adapters" in report and "![LoRA" in report
    assert "| M_i + rank-1 adapter | 1 |" in report and "| M_i + rank-full adapter |" in report
    assert (fast_run.out / "lora.png").stat().st_size > 10_000
    assert fast_run.plots["lora"] == fast_run.out / "lora.png"
    # logged to MLflow like the other figures, the LoRA finding as a metric
    from mlflow import MlflowClient

    client = MlflowClient(Settings(home=fast_run.out.parent / "tracking").tracking_uri)
    (logged,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'reproduce-fast'"
    )
    assert logged.data.params["lora"] == "True"
    assert logged.data.metrics["lora_ft_recycled_ends_higher"] == pytest.approx(finding["mean"])
    assert {"lora.png", "report.md"} <= {a.path for a in client.list_artifacts(logged.info.run_id)}


def test_reproduce_cli_refuses_bad_lora_ranks(tmp_path):
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(
        app, ["reproduce", "-o", str(tmp_path / "out"), "--lora", "--lora-ranks", "4,0"]
    )
    assert result.exit_code == 2 and "--lora-ranks" in result.output, result.output
    assert not (tmp_path / "out").exists()  # refused before anything ran


# ---- pre-check -----------------------------------------------------------------------------------------


def seed_work(fast_run) -> tuple[Path, dict[str, Path]]:
    """The kept work folder of seed 0 and the Δ of each version its direct chain registered."""
    work = fast_run.out / "work" / "seed-0"
    run = json.loads((fast_run.out / "results.json").read_text())["runs"][0]
    return work, {v: work / rel for v, rel in run["deltas"].items()}


def test_precheck_ranks_close_version_above_far(fast_run, fast_family):
    """Target v5: the Δ of v3 (its neighbour in the fast run) must outrank the Δ of v1 (farthest)."""
    _, delta = seed_work(fast_run)
    M = fast_family.versions
    result = precheck(
        M["v5"], [delta["v1"], delta["v3"]], bases=[M["v1"], M["v3"]], sample=fast_family.dev, n=32
    )
    ranked = [Path(c.diff) for c in result.candidates]
    assert ranked == [delta["v3"], delta["v1"]], result.model_dump()
    close, far = result.candidates
    assert close.relative_distance < far.relative_distance
    assert set(close.probe_loss) == {"0.5", "1"}
    # Without a sample the parameter-space signals alone rank them the same way.
    blind = precheck(M["v5"], [delta["v1"], delta["v3"]], bases=[M["v1"], M["v3"]])
    assert [Path(c.diff) for c in blind.candidates] == [delta["v3"], delta["v1"]]
    assert blind.signals == ["proximity", "cosine"]


def test_precheck_errors(fast_run, fast_family, tmp_path):
    _, delta = seed_work(fast_run)
    with pytest.raises(PrecheckError, match="nothing to score"):
        precheck(fast_family.versions["v5"], [delta["v1"]])
    with pytest.raises(PrecheckError, match="one --base per --diff"):
        precheck(fast_family.versions["v5"], [delta["v1"]], bases=[])
    other = build_tiny_model(tmp_path / "other")  # another architecture: cannot be the Δ's base
    with pytest.raises(IncompatibleCheckpoints, match="not the base|differ in shape"):
        precheck(fast_family.versions["v5"], [delta["v1"]], bases=[other])


def test_precheck_cli(fast_run, fast_family, tmp_path):
    app = typer.Typer()
    register(app)
    _, delta = seed_work(fast_run)
    M = fast_family.versions
    args = ["precheck", str(M["v5"]), "--diff", str(delta["v1"]), "--diff", str(delta["v3"])]
    args += ["--base", str(M["v1"]), "--base", str(M["v3"]), "--output", str(tmp_path / "pc.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ranked = json.loads((tmp_path / "pc.json").read_text())["candidates"]
    assert Path(ranked[0]["diff"]) == delta["v3"]


def test_toy_build_prints_a_spec_that_loads(fast_family, toy_cache):
    """Issue 19 item 10: the printed settings load as a family spec (they carried `eval_*` keys)."""
    from recycler.service.spec import build_spec

    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["toy", "build", "--fast", "-o", str(toy_cache)])
    assert result.exit_code == 0, result.output
    spec = build_spec(json.loads(result.stdout)["spec"], "printed")
    assert spec.finetune_config() == fast_family.finetune_config
    assert spec.evaluation.options() == fast_family.finetune_config.evaluation


# ---- small pure helpers ----------------------------------------------------------------------------------


def test_spearman_and_steps():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert steps_or_inf([[0, 0.0], [10, 0.5], [20, 0.9]], 0.5) == 10
    assert steps_or_inf([[0, 0.0], [10, 0.5]], 0.9) == float("inf")


def test_the_service_built_the_table_and_its_registry_agrees(fast_run):
    """The fine-tunes in the report are the release cycle's own: the registry reproduce leaves behind
    (OUTPUT/service/seed-0) holds one fine-tune per (chain, release, role), with the report's scores."""
    from recycler.registry.client import Registry
    from recycler.settings import Settings

    run = json.loads((fast_run.out / "results.json").read_text())["runs"][0]
    V = run["versions"]
    registry = Registry(Settings(home=Path(run["service_home"])).tracking_uri)

    def scores(family: str, role: str) -> dict[str, float]:
        found = [v for v in registry.versions("ft", family, "arith") if v.tags["role"] == role]
        return {v.tags["base_version"]: float(v.tags["eval.accuracy"]) for v in found}

    first = {V[0]: run["ft"][V[0]]}
    assert scores("toy-direct", "ft") == first == scores("toy-iterative", "ft")  # M*_1 = FT(M_1) in both
    assert scores("toy-direct", "ft-from-base") == {v: run["ft"][v] for v in V[1:]}
    assert scores("toy-direct", "recycled-ft") == run["recycled_ft"]
    iterative = scores("toy-iterative", "recycled-ft")
    assert {v: iterative[v] for v in run["iter_ft"]} == run["iter_ft"]
    assert iterative[V[1]] == run["recycled_ft"][V[1]]  # both chains start from M_2 + Δ_1
    diffs = {v.tags["base_version"]: v for v in registry.versions("diff", "toy-iterative", "arith")}
    assert [diffs[v].tags.get("diff_mode") for v in V] == ["direct", *["iterative"] * (len(V) - 1)]
    assert (fast_run.out / "service" / "seed-0" / "mlflow.db").is_file()
