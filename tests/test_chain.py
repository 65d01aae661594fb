"""The release chain under ordinary operations (issue 18): a second watcher, a release caught mid-copy,
a re-published version, a crashed or failing GPU run, an edited evaluation file. Each scenario that
broke the chain without an error, or stalled it, is a regression test here; the fakes (tests/fakes.py)
train nothing, everything else (staging, apply, extract, publish, registry, chain, lease) is real.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from fakes import aliases, services

from recycler import crashpoints
from recycler.doctor.registry import check_chains
from recycler.errors import ChainBlocked, ChainConflict, FinetuneFailed, LeaseBusy
from recycler.registry.chain import ChainEntry, ChainLedger
from recycler.registry.lease import acquire, held_lease
from recycler.registry.names import ALIAS, champion_alias
from recycler.service import steps
from recycler.service.chain import chain_key, operator_update
from recycler.service.cycle import run_cycle
from recycler.service.watch import watch
from recycler.settings import Settings
from recycler.store.releases import LocalFolderSource
from recycler.toy.tiny import perturb_model

SCORES = {
    ("v1", "ft"): 0.6,
    ("v2", "merged"): 0.4,
    ("v2", "ft"): 0.7,
    ("v3", "merged"): 0.5,
    ("v3", "ft"): 0.8,
    ("v2", "champion"): 0.6,
    ("v3", "champion"): 0.7,
}


class SimulatedCrash(BaseException):
    """A crash at a crash point: nothing after it runs, and no `except Exception` records it."""


def crash_at(point: str, *, times: int = 1):
    """A crash-point hook that crashes the first `times` times `point` is reached."""
    left = {"n": times}

    def hook(name: str) -> None:
        if name == point and left["n"] > 0:
            left["n"] -= 1
            raise SimulatedCrash(point)

    return hook


@pytest.fixture(autouse=True)
def _no_hook():
    yield
    crashpoints.set_hook(None)


def watcher(releases: Path, spec, svc, said: list[str] | None = None, **kw):
    """`recycler watch` inline, as the flow runs it: a cycle never waits for the turn."""
    say = said.append if said is not None else (lambda _m: None)

    def start(r, _attempt, _key):
        return run_cycle(r.version, str(releases), spec, services=svc, wait=0.0, **kw).model_dump()

    return watch(str(releases), spec, start, services=svc, say=say)


def entries(svc, spec) -> dict[str, tuple[str, int]]:
    """version → (state, attempts) of the newest entry of each version."""
    found = sorted(
        ChainLedger(svc.registry, spec.family, spec.variant).entries().values(), key=lambda e: e.updated
    )
    return {e.version: (e.state, e.attempts) for e in found}


def fts(svc) -> list:
    return svc.registry.versions("ft", "fam", "inst")


def parent_of(svc, version: str) -> str | None:
    (ft,) = [
        v for v in fts(svc) if v.tags["base_version"] == version and v.tags.get("role") != "ft-from-base"
    ]
    return ft.tags.get("parent_diff")


def diff_of(svc, version: str) -> str:
    (d,) = [v for v in svc.registry.versions("diff", "fam", "inst") if v.tags["base_version"] == version]
    return d.reference


# ---- a second watcher --------------------------------------------------------------------------------


@pytest.mark.parametrize("homes", ["same home", "two homes"])
def test_a_second_watcher_stops_instead_of_skipping_ahead(world, tmp_path, homes):
    releases, settings, publish, spec = world
    publish("v1", "v2", "v3")
    svc = services(settings, SCORES)
    other_settings = settings
    if homes == "two homes":  # another host: its own home, the same registry and store
        other_settings = Settings(home=tmp_path / "home-b", tracking_uri=settings.tracking_uri,
                                  artifact_store=settings.artifact_store)  # fmt: skip
    other = services(other_settings, SCORES)
    seen: dict[str, object] = {}

    def second_watcher(name: str) -> None:  # runs while the first is fine-tuning v2
        if name == "cycle:finetuned" and "b" not in seen and len(fts(svc)) == 1:
            said: list[str] = []
            t = threading.Thread(
                target=lambda: seen.update(b=watcher(releases, spec(), other, said), said=said)
            )
            t.start()
            t.join()
            with pytest.raises(ChainBlocked, match="another cycle has the turn"):
                run_cycle("v3", str(releases), spec(), services=other, wait=0.0)

    crashpoints.set_hook(second_watcher)
    first = watcher(releases, spec(), svc)
    assert seen["b"] == [] and any("stopping" in m for m in seen["said"])  # it stopped; it ran nothing
    assert [r["version"] for r in first] == ["v1", "v2", "v3"]
    assert parent_of(svc, "v2") == diff_of(svc, "v1") and parent_of(svc, "v3") == diff_of(svc, "v2")
    assert len(fts(svc)) == 3 and len(svc.registry.versions("diff", "fam", "inst")) == 3
    assert entries(svc, spec()) == {v: ("complete", 1) for v in ("v1", "v2", "v3")}


def test_a_later_release_waits_for_an_earlier_one_that_failed(world):
    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, SCORES, failures={"v1": 1})
    with pytest.raises(FinetuneFailed):
        watcher(releases, spec(), svc)
    assert entries(svc, spec()) == {"v1": ("failed", 1)}
    with pytest.raises(ChainBlocked, match="v2 must wait: v1 comes first in the chain"):
        run_cycle("v2", str(releases), spec(), services=svc, wait=0.0)
    assert [r["version"] for r in watcher(releases, spec(), svc)] == ["v1", "v2"]  # retried, then on
    assert entries(svc, spec()) == {"v1": ("complete", 2), "v2": ("complete", 1)}
    assert parent_of(svc, "v2") == diff_of(svc, "v1")


# ---- failures, refusals, retries and the operator's unblock ------------------------------------------


def test_a_release_given_up_blocks_the_chain_once_reported_until_an_operator_skips_it(world):
    releases, settings, publish, spec = world
    publish("v1", "v2", "v3")
    s = spec(max_attempts=2)
    svc = services(settings, SCORES, failures={"v2": 9})
    for _ in range(2):
        with pytest.raises(FinetuneFailed):
            watcher(releases, s, svc)
    assert entries(svc, s)["v2"] == ("gave-up", 2)
    with pytest.raises(
        ChainBlocked, match=r"blocked at v2 \(gave-up: FinetuneFailed.*recycler chain retry v2"
    ):
        watcher(releases, s, svc)  # reported once: the watcher's run fails where an operator looks
    said: list[str] = []
    assert watcher(releases, s, svc, said) == [] and any(m.startswith("still blocked") for m in said)
    doctor = check_chains(svc.registry)
    assert doctor.status == "warn" and "fam-inst v2: gave-up after 2 attempt(s)" in doctor.detail
    operator_update(svc, s, "v2", "skip", "vendor pulled v2")
    assert [r["version"] for r in watcher(releases, s, svc)] == ["v3"]
    assert parent_of(svc, "v3") == diff_of(svc, "v1")  # v2 registered no Δ: next-diff stayed on v1's
    assert entries(svc, s)["v2"] == ("skipped", 2) and check_chains(svc.registry).status == "ok"


def test_a_crash_counts_as_an_attempt_and_the_next_watcher_resumes(world):
    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, SCORES)
    crashpoints.set_hook(crash_at("cycle:registered-ft"))
    with pytest.raises(SimulatedCrash):
        watcher(releases, spec(), svc)
    assert entries(svc, spec()) == {"v1": ("running", 1)}  # as a dead holder leaves it
    crashpoints.set_hook(None)
    assert [r["version"] for r in watcher(releases, spec(), svc)] == ["v1", "v2"]
    assert entries(svc, spec()) == {"v1": ("complete", 2), "v2": ("complete", 1)}
    assert len(svc.trainer.calls) == 2  # v1's fine-tune was reused, not redone
    assert len(fts(svc)) == 2


def test_deployment_mode_retries_a_crashed_run_under_a_new_key_and_joins_one_in_flight(world):
    """Prefect returns the existing run for an existing idempotency key whatever its state: a crashed
    run must not be handed back forever. Each attempt has its own key; a watcher that finds an
    attempt in flight joins it."""
    releases, settings, publish, spec = world
    publish("v1")
    svc = services(settings, SCORES)
    runs: dict[str, dict] = {}  # idempotency key → the run's final state (Prefect's table)
    keys: list[str] = []

    def dispatch(release, attempt, key):
        keys.append(key)
        if key in runs:
            return runs[key]
        crashpoints.set_hook(crash_at("cycle:finetuned") if len(runs) == 0 else None)
        try:
            run_cycle(release.version, str(releases), spec(), services=svc, attempt=attempt,
                      fingerprint=release.fingerprint)  # fmt: skip
            runs[key] = {"state": "Completed", "flow_run": key}
        except SimulatedCrash:
            runs[key] = {"state": "Crashed", "flow_run": key}
        return runs[key]

    out = watch(str(releases), spec(), dispatch, services=svc, dispatch=True)
    assert [o["state"] for o in out] == ["Crashed", "Completed"]
    assert keys[0] != keys[1] and keys[0].endswith("/1") and keys[1].endswith("/2")
    assert entries(svc, spec()) == {"v1": ("complete", 2)} and len(fts(svc)) == 1
    assert run_cycle("v1", str(releases), spec(), services=svc, attempt=1).status == "already-complete"
    assert watch(str(releases), spec(), dispatch, services=svc, dispatch=True) == []
    # a late run of an attempt that was superseded refuses to run
    publish("v2")
    (v2,) = [r for r in LocalFolderSource(releases, "fam").list() if r.version == "v2"]
    ledger = ChainLedger(svc.registry, "fam", "inst")
    ledger.put(ChainEntry("v2", v2.fingerprint, "dispatched", attempts=2, seq=9, dispatch_key=f"{v2.key}/2"))
    with pytest.raises(ChainBlocked, match="attempt 1 was superseded by attempt 2"):
        run_cycle("v2", str(releases), spec(), services=svc, attempt=1)


def test_a_precheck_refusal_is_terminal_and_the_chain_goes_on(world, tiny_releases):
    releases, settings, publish, spec = world
    publish("v1", "v2", "v3")
    svc = services(settings, SCORES)
    watcher(releases, spec(), svc)  # v1 v2 v3 all done; now a family whose pre-check refuses v2
    strict = spec(variant="strict", precheck_sample=tiny_releases["sample"], precheck_min_score=10.0)
    said: list[str] = []
    out = watcher(releases, strict, services(settings, SCORES), said)
    assert [r["version"] for r in out] == ["v1"]  # v2 refused (recorded), v3 refused too: no retries
    states = {e.version: e.state for e in ChainLedger(svc.registry, "fam", "strict").entries().values()}
    assert states == {"v1": "complete", "v2": "refused", "v3": "refused"}
    assert watcher(releases, strict, services(settings, SCORES)) == []  # never re-checked


# ---- releases: completeness, content, re-publication -------------------------------------------------


def shard(src: Path, dst: Path) -> Path:
    """The release `src` as two shards and an index (what a large release looks like)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    state = load_file(src / "model.safetensors")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, dst / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_a_release_caught_mid_copy_is_not_listed_until_complete(tiny_releases, tmp_path):
    full = shard(tiny_releases["v1"], tmp_path / "full")
    root = tmp_path / "releases"
    src = LocalFolderSource(root, "fam")
    stages = {}
    d = root / "v1"
    d.mkdir(parents=True)
    (d / "config.json").write_text((full / "config.json").read_text()[:20])  # config half-written
    stages["config"] = src.list()
    shutil.copy(full / "config.json", d / "config.json")
    shutil.copy(full / "model-00001-of-00002.safetensors", d / "model-00001-of-00002.safetensors")
    stages["no index"] = src.list()
    shutil.copy(full / "model.safetensors.index.json", d / "model.safetensors.index.json")
    stages["shard missing"] = src.list()
    data = (full / "model-00002-of-00002.safetensors").read_bytes()
    (d / "model-00002-of-00002.safetensors").write_bytes(data[: len(data) // 2])
    stages["shard half-copied"] = src.list()
    assert all(v == [] for v in stages.values()), stages
    assert "still being written" in src.incomplete["v1"]
    (d / "model-00002-of-00002.safetensors").write_bytes(data)
    (listed,) = src.list()
    assert listed.version == "v1" and src.incomplete == {}


def test_the_fingerprint_is_of_content_and_a_staged_base_is_refreshed_when_it_changes(
    world, tiny_releases, tmp_path
):
    releases, _settings, publish, _spec = world
    publish("v1")
    src = LocalFolderSource(releases, "fam", digests=tmp_path / "digests.json")
    (before,) = src.list()
    for f in (releases / "v1").iterdir():
        os.utime(f, (1, 1))  # touched: same content
    (touched,) = src.list()
    assert touched.fingerprint == before.fingerprint
    ws = tmp_path / "ws"
    staged = steps.stage_base(src, before, ws / "download", ws / "base")
    assert steps.staged_fingerprint(staged) == before.fingerprint
    # the vendor re-publishes v1 with other weights (new files, never an in-place edit of a hard link)
    other = perturb_model(tiny_releases["v1"], tmp_path / "other", scale=0.05, seed=99)
    tmp = releases / ".v1-new"
    shutil.copytree(other, tmp)
    shutil.rmtree(releases / "v1")
    tmp.rename(releases / "v1")
    (after,) = src.list()
    assert after.fingerprint != before.fingerprint
    restaged = steps.stage_base(src, after, ws / "download", ws / "base")
    assert steps.staged_fingerprint(restaged) == after.fingerprint
    assert (restaged / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()


def republish(releases: Path, version: str, content: Path) -> None:
    tmp = releases / f".{version}-new"
    shutil.copytree(content, tmp)
    shutil.rmtree(releases / version)
    tmp.rename(releases / version)


def test_a_republished_version_gets_a_new_cycle_or_is_refused_per_policy(world, tiny_releases, tmp_path):
    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, SCORES)
    watcher(releases, spec(), svc)
    old_v2_diff = diff_of(svc, "v2")
    fixed = perturb_model(tiny_releases["v2"], tmp_path / "v2-fixed", scale=0.02, seed=5)
    republish(releases, "v2", fixed)
    refusing = spec(on_republish="refuse")
    said: list[str] = []
    assert watcher(releases, refusing, svc, said) == []
    ledger = ChainLedger(svc.registry, "fam", "inst").entries().values()
    assert sorted(e.state for e in ledger if e.version == "v2") == ["complete", "refused"]
    out = watcher(releases, spec(), svc)  # the refusal is terminal: a later policy change does not re-run it
    assert out == []
    operator_update(svc, spec(), "v2", "retry")  # the operator asks for it under new-cycle
    (again,) = watcher(releases, spec(), svc)
    assert again["version"] == "v2" and again["parent_diff"] == old_v2_diff  # recycles the old v2's Δ^iter
    v2s = [v for v in fts(svc) if v.tags["base_version"] == "v2"]
    assert len(v2s) == 2 and len({v.fingerprint for v in v2s}) == 2  # one per content, each recorded


def test_a_release_published_after_a_newer_one_was_processed_is_skipped(world):
    releases, settings, publish, spec = world
    publish("v1", "v3")
    svc = services(settings, SCORES)
    watcher(releases, spec(), svc)
    publish("v2")
    assert watcher(releases, spec(), svc) == []
    state, _ = entries(svc, spec())["v2"]
    assert state == "skipped"
    (e,) = [e for e in ChainLedger(svc.registry, "fam", "inst").entries().values() if e.version == "v2"]
    assert "out of order" in e.reason and "backport" in e.reason


# ---- promotion ------------------------------------------------------------------------------------------


def test_promotion_is_a_compare_and_set_against_what_the_gate_saw(world):
    releases, settings, publish, spec = world
    publish("v1", "v2", "v3")
    svc = services(settings, SCORES)
    run_cycle("v1", str(releases), spec(), services=svc)
    run_cycle("v2", str(releases), spec(), services=svc)
    ft1 = next(v for v in fts(svc) if v.tags["base_version"] == "v1")

    def move_by_hand(name: str) -> None:
        if name == "cycle:extracted":
            svc.registry.set_alias("ft", "fam", "inst", "champion", ft1.version)

    crashpoints.set_hook(move_by_hand)
    with pytest.raises(ChainConflict, match="aliases moved since this cycle decided"):
        run_cycle("v3", str(releases), spec(), services=svc)
    assert aliases(svc, "ft:fam:inst")["champion"] == ft1.version  # the hand move stands; nothing else moved
    assert aliases(svc, "diff:fam:inst")["next-diff"] == diff_of(svc, "v2").rsplit("/", 1)[1]
    assert entries(svc, spec())["v3"] == ("failed", 1)


def test_with_a_baseline_only_the_candidate_says_promoted(world):
    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, SCORES | {("v2", "ft_from_base"): 0.65})
    run_cycle("v1", str(releases), spec(baseline=True), services=svc)
    out = run_cycle("v2", str(releases), spec(baseline=True), services=svc)
    assert out.promoted and out.candidate == "recycled"
    gates = {v.tags["role"]: v.tags["gate"] for v in fts(svc) if v.tags["base_version"] == "v2"}
    assert gates == {"recycled-ft": "promoted", "ft-from-base": "not the candidate (FT(M_i + Δ) was)"}


def test_approved_aliases_are_one_per_version():
    versions = ["V5", "v5", "v1.0", "v1-0", "v1_0", "v1__0", "v1_-0", "A.b_C-d", "a_b_c_d"]
    names = [champion_alias(v) for v in versions]
    assert len(set(names)) == len(versions) and all(ALIAS.match(n) for n in names)
    assert champion_alias("v5") == "approved-v5"  # plain versions keep their readable alias


# ---- evaluation provenance ------------------------------------------------------------------------------


def test_an_edited_task_file_is_measured_anew_and_the_champion_rescored_under_it(
    world, tiny_releases, tmp_path
):
    releases, settings, publish, spec = world
    publish("v1", "v2")
    task = tmp_path / "task.jsonl"
    shutil.copy(tiny_releases["sample"], task)
    svc = services(settings, SCORES)
    run_cycle("v1", str(releases), spec(evaluation={"task": task}), services=svc)
    task.write_text(task.read_text() + json.dumps({"prompt": "9+9?", "response": "18"}) + "\n")  # same path
    edited = spec(evaluation={"task": task})
    out = run_cycle("v2", str(releases), edited, services=svc)
    assert ("v2", "champion") in svc.scorer.calls  # v1's recorded score measured the old file
    ft2 = next(v for v in fts(svc) if v.tags["base_version"] == "v2")
    ft1 = next(v for v in fts(svc) if v.tags["base_version"] == "v1")
    assert ft2.tags["eval_provenance"] == edited.evaluation.provenance() != ft1.tags["eval_provenance"]
    assert out.promoted and "vs champion, interval" in ft2.tags["gate_evidence"]
    assert ft2.tags["gate_champion"] == ft1.reference


def test_evaluation_only_settings_never_throw_a_fine_tune_away(world):
    releases, settings, publish, spec = world
    publish("v1")
    svc = services(settings, SCORES)
    crashpoints.set_hook(crash_at("cycle:registered-ft"))
    with pytest.raises(SimulatedCrash):
        run_cycle("v1", str(releases), spec(), services=svc)
    crashpoints.set_hook(None)
    other = spec(evaluation={"task": spec().evaluation.task, "limit": 5, "max_new_tokens": 16})
    run_cycle("v1", str(releases), other, services=svc)
    assert len(svc.trainer.calls) == 1  # the finished fine-tune was reused
    (ft,) = fts(svc)  # one version, its score now the one measured under the new settings
    assert ft.tags["eval_provenance"] == other.evaluation.provenance()


# ---- the turn's lease --------------------------------------------------------------------------------


def test_the_turn_is_renewed_while_held_and_taken_over_only_after_its_holder_is_gone(world):
    _, settings, _, _ = world
    svc = services(settings, SCORES)
    key = chain_key("fam", "inst")
    with held_lease(svc.registry, key, ttl=1.5, wait=0) as held:
        threading.Event().wait(3.5)  # longer than the ttl: renewed meanwhile
        with pytest.raises(LeaseBusy):
            acquire(svc.registry, key, ttl=1.5, wait=0)
        held.check()
        # a taker renames the lease away (as after an expiry): the holder finds out at its next renewal
        svc.registry.client.rename_registered_model(held.name, held.name + ".stale-test")
        threading.Event().wait(1.2)
        with pytest.raises(ChainConflict, match="lost the lease"):
            held.check()
    acquire(svc.registry, key, ttl=1.5, wait=0)  # free again


# ---- the cycle's MLflow run ends on every path --------------------------------------------------------


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from fakes import services
from recycler.service.cycle import run_cycle
from recycler.service.spec import CycleSpec
from recycler.settings import Settings
spec = CycleSpec.model_validate_json(open({spec!r}).read())
settings = Settings.model_validate_json(open({settings!r}).read())
run_cycle("v1", {releases!r}, spec, services=services(settings, {{("v1", "ft"): 0.6}}))
"""


def _cycle_run(settings):
    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.experiment)
    (run,) = client.search_runs([exp.experiment_id], "tags.`recycler.cycle` LIKE 'fam/inst/v1@%'")
    return run


def test_a_run_left_running_by_a_kill_after_completion_is_closed_by_the_rerun(world, tmp_path, monkeypatch):
    import subprocess
    import sys

    releases, settings, publish, spec = world
    publish("v1")
    monkeypatch.setenv("RECYCLER_TRACK", "1")
    (tmp_path / "spec.json").write_text(spec().model_dump_json())
    (tmp_path / "settings.json").write_text(settings.model_dump_json())
    code = CHILD.format(tests=str(Path(__file__).parent), spec=str(tmp_path / "spec.json"),
                        settings=str(tmp_path / "settings.json"), releases=str(releases))  # fmt: skip
    env = {**os.environ, "RECYCLER_CRASH_AT": "cycle:complete-tagged", "RECYCLER_TRACK": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]  # SIGKILL after the fine-tune was tagged complete
    assert _cycle_run(settings).info.status == "RUNNING"
    out = run_cycle("v1", str(releases), spec(), services=services(settings, SCORES))
    assert out.status == "already-complete"
    run = _cycle_run(settings)
    assert (
        run.info.status == "FINISHED"
        and "Closed by a re-run: complete" in run.data.tags["mlflow.note.content"]
    )
    assert entries(svc := services(settings, SCORES), spec()) == {"v1": ("complete", 1)} and svc


def test_a_failed_cycle_ends_its_run_failed_with_a_note(world, monkeypatch):
    releases, settings, publish, spec = world
    publish("v1")
    monkeypatch.setenv("RECYCLER_TRACK", "1")
    with pytest.raises(FinetuneFailed):
        run_cycle("v1", str(releases), spec(), services=services(settings, SCORES, failures={"v1": 1}))
    run = _cycle_run(settings)
    note = run.data.tags["mlflow.note.content"]
    assert run.info.status == "FAILED" and "failed.** FinetuneFailed" in note and "Attempt 1 of 3" in note


def test_an_s3_source_at_the_bucket_root_lists_complete_releases_only(moto_s3, tiny_releases, tmp_path):
    import uuid

    from recycler.store.releases import open_source

    s3 = moto_s3.client()
    bucket = f"root-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    full = shard(tiny_releases["v1"], tmp_path / "full")
    for f in full.iterdir():
        s3.upload_file(str(f), bucket, f"v1/{f.name}")
    for name in ("config.json", "model-00001-of-00002.safetensors"):  # v2 mid-upload: no index yet
        s3.upload_file(str(full / name), bucket, f"v2/{name}")
    src = open_source(f"s3://{bucket}", "fam", endpoint_url=moto_s3.endpoint)
    (v1,) = src.list()
    assert (
        v1.version == "v1"
        and v1.uri == f"s3://{bucket}/v1/"
        and "index not there yet" in src.incomplete["v2"]
    )
    s3.upload_file(str(full / "model.safetensors.index.json"), bucket, "v2/model.safetensors.index.json")
    assert [r.version for r in src.list()] == ["v1"] and "shards not there yet" in src.incomplete["v2"]
    s3.upload_file(
        str(full / "model-00002-of-00002.safetensors"), bucket, "v2/model-00002-of-00002.safetensors"
    )
    listed = src.list()
    assert [r.version for r in listed] == ["v1", "v2"]
    local = src.materialize(listed[0], tmp_path / "download" / listed[0].fingerprint[:16])
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in full.iterdir())


def test_a_rerun_that_no_longer_promotes_takes_its_earlier_half_move_back(world, tiny_releases, tmp_path):
    """Attempt 1 promoted v2 and died between `champion` and `next-diff`; the task file is edited and
    the re-run, measuring anew, refuses: the champion goes back, so both aliases stay from one cycle."""
    releases, settings, publish, spec = world
    publish("v1", "v2")
    task = tmp_path / "task.jsonl"
    shutil.copy(tiny_releases["sample"], task)
    s = spec(evaluation={"task": task})
    svc = services(settings, SCORES)
    run_cycle("v1", str(releases), s, services=svc)
    before = aliases(svc, "ft:fam:inst")
    crashpoints.set_hook(crash_at("cycle:aliases-half-moved"))
    with pytest.raises(SimulatedCrash):
        run_cycle("v2", str(releases), s, services=svc)
    crashpoints.set_hook(None)
    assert aliases(svc, "ft:fam:inst")["champion"] != before["champion"]  # half moved
    task.write_text(task.read_text() + json.dumps({"prompt": "1+1?", "response": "2"}) + "\n")
    edited = spec(evaluation={"task": task})
    svc.scorer.scores = lambda v, r: {("v2", "champion"): 0.9}.get((v, r), SCORES.get((v, r), 0.0))
    out = run_cycle("v2", str(releases), edited, services=svc)
    assert not out.promoted
    assert aliases(svc, "ft:fam:inst") == before  # champion back on v1's fine-tune, no approved-v2
    assert aliases(svc, "diff:fam:inst")["next-diff"] == diff_of(svc, "v1").rsplit("/", 1)[1]
