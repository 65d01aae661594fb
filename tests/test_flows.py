"""The release-cycle flows on a real temporary Prefect server (prefect_test_harness), the fast toy family,
a SQLite MLflow registry and a local artifact store, with real fine-tuning: first cycle, iterative cycle,
idempotent re-runs, two watchers on one release, crashes mid-fine-tune and mid-registration. Every
branch of the cycle's logic is covered without training in tests/test_cycle.py.

Fine-tuning is shortened to 30 steps: the flows' behaviour, not the model's accuracy, is under test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from reliability import case, check_invariants

from recycler.errors import FinetuneFailed
from recycler.registry.client import Registry
from recycler.registry.lineage import lineage
from recycler.service.spec import CycleSpec
from recycler.settings import get_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def home(tmp_path, monkeypatch, prefect_api) -> Path:
    monkeypatch.setenv("RECYCLER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECYCLER_TRACK", "1")
    monkeypatch.setenv("RECYCLER_CHAIN_LEASE_TTL", "10")  # a killed cycle's turn is taken over in 10 s
    monkeypatch.delenv("RECYCLER_CRASH_AT", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


@pytest.fixture
def releases(tmp_path) -> Path:
    (tmp_path / "releases").mkdir()
    return tmp_path / "releases"


def make_spec(family, **kw) -> CycleSpec:
    finetune = {"max_steps": 30, "eval_every": 10, "save_every": 10}
    return family.cycle_spec(finetune=finetune, evaluation={"limit": 100}, gate_margin=-1.0, **kw)


def publish(family, releases: Path, version: str) -> None:
    shutil.copytree(family.versions[version], releases / version, copy_function=os.link)


def _store():
    from recycler.store import open_store

    return open_store(get_settings())


def registry() -> Registry:
    return Registry.from_settings(get_settings())


def versions(kind: str, variant: str | None = "arith"):
    return registry().versions(kind, "toy", variant)


def cycle_runs() -> list:
    import mlflow

    s = get_settings()
    mlflow.set_tracking_uri(s.tracking_uri)
    exp = mlflow.get_experiment_by_name(s.experiment)
    if exp is None:
        return []
    return mlflow.search_runs(
        [exp.experiment_id], filter_string="tags.`recycler.cycle` != ''", output_format="list"
    )


def test_first_cycle_then_iterative_cycle_then_backport(fast_family, home, releases):
    from recycler_flows.release import watch_releases
    from recycler_flows.transfer import backport

    spec = make_spec(fast_family)
    publish(fast_family, releases, "v1")
    first = watch_releases(str(releases), spec)
    assert [c["version"] for c in first] == ["v1"] and first[0]["mode"] == "first"
    assert first[0]["parent_diff"] is None and first[0]["registered"]["merged"] is None
    ft1, d1 = versions("ft")[0], versions("diff")[0]
    assert ft1.tags["cycle_status"] == "complete" and "parent_diff" not in ft1.tags
    assert d1.tags["source_ft"] == ft1.reference and d1.tags["base_version"] == "v1"
    assert "next-diff" in d1.aliases and {"champion", "approved-v1"} <= set(ft1.aliases)

    publish(fast_family, releases, "v2")
    second = watch_releases(str(releases), spec)
    assert [c["version"] for c in second] == ["v2"]  # v1 is not processed again
    c2 = second[0]
    assert c2["mode"] == "iterative" and c2["parent_diff"] == d1.reference
    ft2 = registry().resolve(c2["registered"]["ft"])
    d2 = registry().resolve(c2["registered"]["diff"])
    merged = registry().resolve(c2["registered"]["merged"])
    assert ft2.tags["parent_diff"] == d1.reference and ft2.tags["source_merged"] == merged.reference
    assert d2.tags["diff_mode"] == "iterative" and d2.tags["source_ft"] == ft2.reference
    assert d2.tags["cycle_parent_diff"] == d1.reference and merged.tags["parent_diff"] == d1.reference
    assert registry().get(d2.name, "next-diff").version == d2.version
    assert registry().get(ft2.name, "champion").version == ft2.version
    assert set(c2["scores"]) == {"base", "merged", "ft"}

    # the lineage of the champion reaches base v1 through Δ1 and FT1
    tree = lineage(registry(), ft2.name, "champion")
    refs = {f"{n.name}/{n.version}" for n in tree.walk()}
    assert {d1.reference, ft1.reference, merged.reference, "toy-base/1", "toy-base/2"} <= refs
    expanded = [f"{n.name}/{n.version}" for n in tree.walk() if n.children]
    assert len(expanded) == len(set(expanded))  # a DAG: Δ1 is reached twice but expanded once
    assert any(n.note == "shown above" and n.name == d1.name for n in tree.walk())
    short = lineage(registry(), ft2.name, "champion", max_depth=1)
    assert short.children and all(not c.children and c.note == "…" for c in short.children)
    # each cycle's run carries the lineage picture
    from mlflow import MlflowClient

    for run in cycle_runs():
        assert {"lineage.png", "lineage.md", "comparison.png"} <= {
            a.path for a in MlflowClient().list_artifacts(run.info.run_id)
        }

    # idempotent: watching again starts nothing and registers nothing
    assert watch_releases(str(releases), spec) == []
    assert [len(versions(k)) for k in ("ft", "diff", "merged")] == [2, 2, 1]
    assert len(versions("base", None)) == 2
    assert len(cycle_runs()) == 2

    back = backport("toy-arith-diff@next-diff", "v1", spec=spec)
    bv = registry().resolve(back["registered"])
    assert bv.kind == "merged" and bv.tags["transfer"] == "backport"
    assert bv.tags["parent_diff"] == d2.reference and bv.tags["base_version"] == "v1"
    assert bv.tags["diff_base_version"] == "v2"
    check_prefect_ui(back)


def check_prefect_ui(back: dict) -> None:
    """What the Prefect UI shows: runs named from their parameters, tasks named by role, the library's
    log lines and a Markdown artifact linking the MLflow pages."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, LogFilter
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        names = {r.name for r in runs}
        assert {"watch toy-arith", "cycle toy-arith@v1", "cycle toy-arith@v2"} <= names, names
        run = next(r for r in runs if r.name == "backport toy-arith-diff@next-diff → v1")
        ids = {"any_": [run.id]}
        tasks = {t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=ids))}
        expected = {"fetch base v1", f"fetch diff {back['diff']}", f"apply diff {back['diff']} to base v1",
                    "evaluate base v1", "evaluate backport", "register backport"}  # fmt: skip
        assert expected <= tasks, tasks
        logs = "\n".join(entry.message for entry in client.read_logs(LogFilter(flow_run_id=ids)))
        assert f"registered {back['registered']}" in logs and "backport (v1): accuracy" in logs
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ids))
    version = back["registered"].replace("/", "/versions/")
    assert artifact.type == "markdown" and artifact.key == "backport-toy-arith-diff-2-v1"
    assert f"{get_settings().ui_url}/#/models/{version}?workflowType=machine_learning" in artifact.data
    assert "[The MLflow run](" in artifact.data and f"/runs/{back['run_id']}?workflowType" in artifact.data


def _flow_subprocess(code: str, api: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PREFECT_API_URL": api, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


SPEC_CODE = """
    from pathlib import Path
    from recycler.service.spec import CycleSpec
    spec = CycleSpec.model_validate_json(Path({spec!r}).read_text())
"""


def test_two_watchers_on_one_release_start_one_cycle(fast_family, home, releases, prefect_api, tmp_path):
    d1 = case("D1 two watchers detect the same release", "concurrency")
    publish(fast_family, releases, "v1")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(make_spec(fast_family).model_dump_json())
    code = (
        SPEC_CODE.format(spec=str(spec_file))
        + f"""
    from recycler_flows.release import watch_releases
    print("CYCLES", len(watch_releases({str(releases)!r}, spec)))
    """
    )
    procs = [_flow_subprocess(code, prefect_api) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    started = sorted(int(o.rsplit("CYCLES ", 1)[1].split()[0]) for o in outs)
    assert started == [0, 1], outs
    assert len(versions("ft")) == 1 and len(versions("diff")) == 1 and len(versions("base", None)) == 1
    assert len(cycle_runs()) == 1
    d1.ok(check_invariants(_store(), registry()))


def test_crash_mid_finetune_then_rerun_resumes_without_duplicates(fast_family, home, releases, monkeypatch):
    from recycler_flows.release import release_cycle

    c = case("C5b release cycle with its fine-tune killed", "fault")

    publish(fast_family, releases, "v1")
    spec = make_spec(fast_family)
    monkeypatch.setenv("RECYCLER_CRASH_AT", "finetune:step=25")  # checkpoints at 10 and 20
    with pytest.raises(FinetuneFailed, match="re-run the cycle to resume"):
        release_cycle("v1", str(releases), spec)
    assert versions("ft") == []  # nothing registered for a model that does not exist yet
    monkeypatch.delenv("RECYCLER_CRASH_AT")
    out = release_cycle("v1", str(releases), spec)
    record = json.loads((home / "work" / "toy" / "arith" / "v1" / "ft" / "training_record.json").read_text())
    assert record["resumed_from"] == [20] and record["steps"] == 30
    assert out["registered"]["ft"] == versions("ft")[0].reference
    assert len(versions("ft")) == 1 and len(versions("diff")) == 1 and len(cycle_runs()) == 1
    c.ok(check_invariants(_store(), registry()))


@pytest.mark.parametrize("point", ["cycle:registered-ft", "cycle:aliases-half-moved"])
def test_flow_process_killed_mid_registration_then_rerun(
    fast_family, home, releases, prefect_api, tmp_path, point
):
    from recycler_flows.release import release_cycle

    c8 = case(f"C8 flow process killed ({point})", "fault")
    publish(fast_family, releases, "v1")
    publish(fast_family, releases, "v2")
    spec = make_spec(fast_family)
    release_cycle("v1", str(releases), spec)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    code = (
        SPEC_CODE.format(spec=str(spec_file))
        + f"""
    from recycler_flows.release import release_cycle
    release_cycle("v2", {str(releases)!r}, spec)
    """
    )
    proc = _flow_subprocess(code, prefect_api, {"RECYCLER_CRASH_AT": point})
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == -9, out  # SIGKILL: no cleanup ran
    d1 = versions("diff")[0]
    rerun = release_cycle("v2", str(releases), spec)
    assert rerun["parent_diff"] == d1.reference  # not the Δ the killed run may already have aliased
    assert [len(versions(k)) for k in ("ft", "diff", "merged")] == [2, 2, 1]
    assert len(versions("base", None)) == 2 and len(cycle_runs()) == 2
    assert registry().get("toy-arith-diff", "next-diff").reference == rerun["registered"]["diff"]
    assert release_cycle("v2", str(releases), spec)["status"] == "already-complete"
    c8.ok(check_invariants(_store(), registry()))


@pytest.mark.parametrize("homes", ["same home", "two homes"])
def test_two_recycler_watch_processes_started_together_keep_the_chain(
    fast_family, releases, prefect_api, mlflow_server, moto_s3, tmp_path, homes
):
    """Issue 18's live case: two `recycler watch` processes over one release folder and the same
    servers (MLflow, S3, Prefect). Whoever has the family's turn runs the cycles in order; the other
    stops instead of skipping ahead; nothing is registered twice."""
    import uuid

    import yaml

    from recycler.registry.chain import ChainLedger

    for v in ("v1", "v2"):
        publish(fast_family, releases, v)
    family = f"live-{homes[:3]}-{uuid.uuid4().hex[:6]}"  # the MLflow server is shared by the session
    spec = make_spec(fast_family).model_copy(update={"family": family})
    spec_file = tmp_path / "family.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    shared = {"RECYCLER_TRACKING_URI": mlflow_server.uri, "RECYCLER_S3_ENDPOINT_URL": moto_s3.endpoint,
              "RECYCLER_ARTIFACT_STORE": f"s3://{moto_s3.bucket}/live-{uuid.uuid4().hex[:8]}",
              "RECYCLER_TRACK": "1", "PREFECT_API_URL": prefect_api}  # fmt: skip
    procs = []
    for w in range(2):
        home = tmp_path / ("home" if homes == "same home" else f"home-{w}")
        cmd = [sys.executable, "-m", "recycler.cli", "watch", str(releases), "--spec", str(spec_file)]
        env = {**os.environ, **shared, "RECYCLER_HOME": str(home)}
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    reg = Registry(mlflow_server.uri)
    fts, diffs = reg.versions("ft", family, "arith"), reg.versions("diff", family, "arith")
    assert [v.tags["base_version"] for v in fts] == ["v1", "v2"] and len(diffs) == 2, outs
    (d1,) = [d for d in diffs if d.tags["base_version"] == "v1"]
    assert fts[1].tags["parent_diff"] == d1.reference  # v2 started from v1's Δ^iter, not from nothing
    chain = ChainLedger(reg, family, "arith").entries().values()
    assert sorted((e.version, e.state, e.attempts) for e in chain) == [
        ("v1", "complete", 1),
        ("v2", "complete", 1),
    ]
