"""A stateful property test of the release chain (issue 18): hypothesis drives two watchers (two
homes, one registry: an MLflow server on SQLite, artifacts on moto's S3) through the interleavings
nobody listed, with the fake trainer and scorer (tests/fakes.py).

Releases appear (in or out of order, some mid-copy and completed later, some re-published with other
content); cycles crash at every crash point of the cycle and are re-run; a second watcher runs at a
crash point of the first (a deterministic interleaving); fine-tunes fail; a pre-check refuses; the
task file is edited; an operator unblocks. After every step the invariants below hold; at the end
the watchers settle and every complete release is terminal.

`make test` runs a few examples (RECYCLER_PROPERTY_EXAMPLES, default 5); `make test-slow` many more.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import ClassVar

import pytest
from fakes import services
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from recycler import crashpoints
from recycler.errors import ChainBlocked, ChainConflict, FinetuneFailed, GateRefused
from recycler.registry.chain import IN_FLIGHT, ChainLedger, ordered
from recycler.service.chain import operator_update
from recycler.service.cycle import run_cycle
from recycler.service.spec import CycleSpec
from recycler.service.watch import watch
from recycler.settings import Settings
from recycler.store.releases import version_key
from recycler.toy.tiny import perturb_model

pytestmark = pytest.mark.integration
VERSIONS = ("v1", "v2", "v3", "v4")
CRASH_POINTS = (
    "cycle:turn-taken",
    "cycle:finetuned",
    "cycle:extracted",
    "register:created",
    "cycle:registered-ft",
    "cycle:registered-diff",
    "cycle:aliases-half-moved",
    "cycle:complete-tagged",
    "cycle:chain-complete",
)
EVENTS = ("publish", "nothing", "publish partial", "finish copy", "republish", "edit task", "lose a gpu",
          "toggle pre-check", "unblock", "publish several")  # fmt: skip
EXAMPLES = int(os.environ.get("RECYCLER_PROPERTY_EXAMPLES", "8"))
STEPS = int(os.environ.get("RECYCLER_PROPERTY_STEPS", "10"))
ran = Counter()  # what the examples exercised, printed at the end (the closing note's counts)


class SimulatedCrash(BaseException):
    """The process dies here: nothing after it runs, no `except Exception` records it."""


def score(version: str, role: str) -> float:
    """A family whose fine-tunes usually win, with v3's losing to v2's champion (refused)."""
    i = VERSIONS.index(version) if version in VERSIONS else 0
    return {"base": 0.05, "merged": 0.3, "ft": [0.6, 0.7, 0.65, 0.8][i], "ft_from_base": 0.5,
            "champion": 0.6}.get(role, 0.1)  # fmt: skip


@pytest.fixture(scope="module")
def contents(tiny_releases, tmp_path_factory) -> dict[tuple[str, int], Path]:
    """Two contents per version (the original and a re-publication)."""
    root = tmp_path_factory.mktemp("contents")
    out = {}
    for i, v in enumerate(VERSIONS):
        src = tiny_releases["v1"] if i == 0 else out[(VERSIONS[i - 1], 0)]
        out[(v, 0)] = perturb_model(src, root / f"{v}-0", scale=0.05, seed=100 + i)
        out[(v, 1)] = perturb_model(out[(v, 0)], root / f"{v}-1", scale=0.03, seed=200 + i)
    return out


class ChainMachine(RuleBasedStateMachine):
    env: ClassVar[dict] = {}

    @initialize(seed=st.integers(0, 2**32 - 1))
    def start(self, seed: int) -> None:
        env = self.env
        self.rnd = random.Random(seed)
        self.root = Path(env["tmp"]) / uuid.uuid4().hex[:8]
        self.releases = self.root / "releases"
        self.releases.mkdir(parents=True)
        self.task = self.root / "task.jsonl"
        shutil.copy(env["sample"], self.task)
        self.family = f"p{uuid.uuid4().hex[:8]}"
        base = {"tracking_uri": env["mlflow"], "artifact_store": f"s3://{env['bucket']}/{self.family}",
                "s3_endpoint_url": env["s3"], "chain_lease_ttl": 20.0}  # fmt: skip
        self.svcs = [services(Settings(home=self.root / f"home-{w}", **base), {}, steps=10) for w in (0, 1)]
        for svc in self.svcs:
            svc.trainer.scores = svc.scorer.scores = score  # type: ignore[attr-defined]
        self.published: dict[str, int] = {}  # version → content index
        self.partial: set[str] = set()
        self.strict = False  # an operator raised the pre-check bar

    # ---- what the world does -------------------------------------------------------------------------

    def spec(self) -> CycleSpec:
        extra = {"precheck_sample": self.env["sample"], "precheck_min_score": 50.0} if self.strict else {}
        return CycleSpec(family=self.family, variant="inst", train=self.env["sample"],
                         evaluation={"task": self.task}, max_relative_norm=5.0, max_attempts=2, **extra)  # fmt: skip

    def _put(self, version: str, content: int, partial: bool = False) -> None:
        tmp = self.releases / f".{version}.new"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.env["contents"][(version, content)], tmp)
        if partial:  # caught mid-copy: the weights half there
            data = (tmp / "model.safetensors").read_bytes()
            (tmp / "model.safetensors").write_bytes(data[: len(data) // 2])
        shutil.rmtree(self.releases / version, ignore_errors=True)
        tmp.rename(self.releases / version)

    def publish(self, version: str, partial: bool) -> None:
        if version in self.published:
            return
        self._put(version, 0, partial)
        self.published[version] = 0
        (self.partial.add if partial else self.partial.discard)(version)
        ran["published partial" if partial else "published"] += 1

    def finish_copy(self) -> None:
        if not self.partial:
            return
        version = sorted(self.partial)[0]
        self._put(version, self.published[version])
        self.partial.discard(version)
        ran["finished a copy"] += 1

    def republish(self, version: str) -> None:
        if version not in self.published:
            return
        self.published[version] = 1 - self.published[version]
        self._put(version, self.published[version])
        self.partial.discard(version)
        ran["re-published"] += 1

    def edit_task(self) -> None:
        with self.task.open("a") as f:
            f.write(json.dumps({"prompt": f"{len(self.task.read_text())}+0?", "response": "0"}) + "\n")
        ran["task edited"] += 1

    def lose_a_gpu(self, version: str) -> None:
        for svc in self.svcs:
            svc.trainer.failures[version] = 1  # type: ignore[attr-defined]
        ran["fine-tune failures"] += 1

    def toggle_precheck(self) -> None:
        self.strict = not self.strict
        ran["pre-check bar toggled"] += 1

    # ---- watchers -----------------------------------------------------------------------------------

    def _watch(self, w: int) -> list:
        svc, spec = self.svcs[w], self.spec()

        def start(r, _attempt, _key):
            return run_cycle(r.version, str(self.releases), spec, services=svc, wait=0.0).model_dump()

        try:
            return watch(str(self.releases), spec, start, services=svc)
        except (ChainBlocked, ChainConflict, FinetuneFailed, GateRefused) as e:
            ran[type(e).__name__] += 1
            return []

    def run_watcher(self, w: int, point: str | None) -> None:
        left = {"n": 1}

        def hook(name: str) -> None:
            if name == point and left["n"]:
                left["n"] = 0
                raise SimulatedCrash(name)

        crashpoints.set_hook(hook if point else None)
        try:
            self._watch(w)
        except SimulatedCrash as e:
            ran[f"crash at {e}"] += 1
        finally:
            crashpoints.set_hook(None)

    def interleave(self, point: str) -> None:
        """Watcher 1 runs, start to end, while watcher 0 is at `point`."""
        done = {"n": 0}

        def hook(name: str) -> None:
            if name == point and not done["n"]:
                done["n"] = 1
                t = threading.Thread(target=self._watch, args=(1,))
                t.start()
                t.join()
                ran[f"interleaved at {name}"] += 1

        crashpoints.set_hook(hook)
        try:
            self._watch(0)
        finally:
            crashpoints.set_hook(None)

    def unblock(self) -> None:
        svc, spec = self.svcs[0], self.spec()
        for e in ChainLedger(svc.registry, self.family, "inst").entries().values():
            if e.state in ("gave-up", "refused"):
                operator_update(svc, spec, e.version, "skip", "property test", release=None)
                ran["operator skipped"] += 1
                return

    # ---- one step: something happens in the world, then a watcher runs ----------------------------------

    @rule()
    def step(self) -> None:
        """One step, its choices from the example's seed (drawn by hypothesis, so replayable): uniform
        choices reach every event, crash point and interleaving within a few examples, where
        hypothesis's own choices start from the simplest (the first event, over and over)."""
        rnd = self.rnd
        event = rnd.choices(EVENTS, weights=[3, 1, 2, 2, 1, 1, 1, 1, 1, 3])[0]
        version, point = rnd.choice(VERSIONS), rnd.choice(CRASH_POINTS)
        action = rnd.choices(("watch 0", "watch 1", "crash", "interleave"), weights=[2, 1, 3, 2])[0]
        if event == "publish" or event == "publish partial":
            self.publish(version, event == "publish partial")
        elif event == "publish several":  # a batch lands between two polls, in any order
            for v in rnd.sample(VERSIONS, k=len(VERSIONS)):
                self.publish(v, False)
        elif event == "republish":
            self.republish(version)
        elif event == "lose a gpu":
            self.lose_a_gpu(version)
        else:
            {"nothing": lambda: None, "finish copy": self.finish_copy, "edit task": self.edit_task,
             "toggle pre-check": self.toggle_precheck, "unblock": self.unblock}[event]()  # fmt: skip
        listed = {(r.version, r.fingerprint) for r in _listing(self)}
        before, _ = self._state()
        if action == "interleave":
            self.interleave(point)
        else:
            self.run_watcher(1 if action == "watch 1" else 0, point if action == "crash" else None)
        self._never_skipped_ahead(listed, before)

    def _never_skipped_ahead(self, listed: set, before: dict) -> None:
        """A release listed when a later release's cycle started was finished first, never skipped as
        out of order (the chain's order is the releases' order, not the order a watcher saw them)."""
        after, _ = self._state()
        started = [e for k, e in after.items() if e.seq and not (k in before and before[k].seq)]
        for late in started:
            for e in after.values():
                if (e.version, e.fingerprint) in listed and version_key(e.version) < version_key(
                    late.version
                ):
                    assert e.terminal and "out of order" not in e.reason, (late, e)

    # ---- invariants ---------------------------------------------------------------------------------

    def _state(self):
        reg = self.svcs[0].registry
        entries = ChainLedger(reg, self.family, "inst").entries()
        versions = {k: reg.versions(k, self.family, None if k == "base" else "inst") for k in ("base", "ft", "diff", "merged")}  # fmt: skip
        return entries, versions

    @invariant()
    def one_version_per_release_and_role(self) -> None:
        if not hasattr(self, "svcs"):
            return
        _, versions = self._state()
        for kind, found in versions.items():
            keys = Counter((v.tags["base_version"], v.fingerprint, v.tags.get("role", "")) for v in found)
            assert all(n == 1 for n in keys.values()), (kind, keys)

    @invariant()
    def each_cycle_starts_from_the_last_promoted_delta(self) -> None:
        if not hasattr(self, "svcs"):
            return
        entries, versions = self._state()
        fts = {(v.tags["base_version"], v.fingerprint): v for v in versions["ft"] if v.tags.get("role") != "ft-from-base"}  # fmt: skip
        diffs = {(v.tags["base_version"], v.fingerprint): v for v in versions["diff"]}
        started = [e for e in ordered(entries) if e.state == "complete"]
        keys = [version_key(e.version) for e in started]
        assert keys == sorted(keys), [e.version for e in started]  # cycles ran in release order
        next_diff = None
        for e in ordered(entries):
            ft = fts.get((e.version, e.fingerprint))
            if e.state == "complete":
                assert ft is not None and ft.tags.get("cycle_status") == "complete", e
                assert ft.tags.get("parent_diff") == (next_diff.reference if next_diff else None), (
                    e,
                    ft.tags,
                )
                if ft.tags.get("gate") == "promoted":
                    next_diff = diffs[(e.version, e.fingerprint)]
            elif ft is not None and ft.tags.get("parent_diff"):  # registered before a crash or conflict
                assert ft.tags["parent_diff"] == (next_diff.reference if next_diff else None), (e, ft.tags)
        in_flight = any(e.state in IN_FLIGHT for e in entries.values())
        if not in_flight:  # settled: the aliases are the last promoted cycle's, both from it
            reg = self.svcs[0].registry
            nd = reg.get_alias("diff", self.family, "inst", "next-diff")
            champ = reg.get_alias("ft", self.family, "inst", "champion")
            assert (nd.reference if nd else None) == (next_diff.reference if next_diff else None)
            if nd is not None:
                assert (champ is not None and nd.tags["source_ft"] == champ.reference) or nd.tags.get(
                    "diff_mode"
                ) == "direct"

    @invariant()
    def gates_compare_like_with_like(self) -> None:
        if not hasattr(self, "svcs"):
            return
        _, versions = self._state()
        for v in versions["ft"]:
            if "gate_evidence" in v.tags:
                assert f"scores of {v.tags['eval_provenance']}" in v.tags["gate_evidence"], v.tags

    def teardown(self) -> None:
        if not hasattr(self, "svcs"):
            return
        for svc in self.svcs:
            svc.trainer.failures.clear()  # type: ignore[attr-defined]
        self.strict = False
        for version in sorted(self.partial):  # the copies finish
            self._put(version, self.published[version])
        for _ in range(12):  # the watchers settle; an operator skips what stays blocked
            self._watch(0)
            self.unblock()
        entries, _ = self._state()
        listed = {(r.version, r.fingerprint) for r in _listing(self)}
        states = {(e.version, e.fingerprint): e.state for e in entries.values()}
        assert all(states.get(k) in ("complete", "refused", "skipped", "gave-up") for k in listed), states
        ran["examples settled"] += 1


def _listing(m: ChainMachine) -> list:
    from recycler.store.releases import LocalFolderSource

    return LocalFolderSource(m.releases, m.family).list()


def run_machine(examples: int, steps: int, env: dict) -> None:
    ChainMachine.env = env
    ran.clear()
    # no shrinking: an example is its seed and its step count, and a failure names both; shrinking a seed
    # only replays other random examples for many minutes
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    ChainMachine.TestCase.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                                              derandomize=True, phases=phases, suppress_health_check=list(HealthCheck))  # fmt: skip
    ChainMachine.TestCase().runTest()
    print("property test:", dict(sorted(ran.items())))
    assert ran["examples settled"] >= examples


@pytest.fixture
def machine_env(mlflow_server, moto_s3, tiny_releases, contents, tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("RECYCLER_TRACK", "0")
    return {"tmp": tmp_path, "sample": tiny_releases["sample"], "contents": contents,
            "mlflow": mlflow_server.uri, "bucket": moto_s3.bucket, "s3": moto_s3.endpoint}  # fmt: skip


def test_the_chain_holds_under_any_interleaving(machine_env):
    run_machine(EXAMPLES, STEPS, machine_env)


@pytest.mark.slow
def test_the_chain_holds_under_many_more_interleavings(machine_env):
    run_machine(int(os.environ.get("RECYCLER_PROPERTY_SLOW_EXAMPLES", "60")), 16, machine_env)
