"""The service as an operator deploys it (infra/README.md): `prefect server start`, `recycler deploy`
with infra/prefect.yaml, `process` workers for the cpu and a100 pools started outside the checkout,
`mlflow server` (SQLite) with artifacts in S3 (moto over HTTP), `recycler serve`, all on 127.0.0.1.

1. `recycler deploy` on a fresh server creates the work pools the file names, then the deployments.
2. The first release cycle runs in this process against the servers (weights go to S3, versions to the
   MLflow server).
3. The watcher, in `deployment` mode, starts `release-cycle/gpu` for v2 through `run_deployment` with the
   attempt's idempotency key; the a100-pool worker runs it; a second dispatch of the same attempt
   returns the same flow run (two watchers, one cycle).
4. `prefect deployment run backport/manual` with only the Δ and the target: the family's spec is the
   deployment's default. `recycler serve` runs beside, under its own deployment names (backport/served,
   here with α = 0.5), and the worker's deployments keep working.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from servers import free_port, wait_http

from recycler.registry.client import Registry
from recycler.settings import Settings, get_settings
from recycler.store import open_store

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


@pytest.fixture(scope="module")
def service_env(moto_s3, mlflow_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("service")
    return {
        "RECYCLER_HOME": str(home / "recycler"),
        "RECYCLER_TRACKING_URI": mlflow_server.uri,
        "RECYCLER_ARTIFACT_STORE": f"s3://{moto_s3.bucket}/recycler",
        "RECYCLER_S3_ENDPOINT_URL": moto_s3.endpoint,
        "RECYCLER_TRACK": "1",
        "MLFLOW_S3_ENDPOINT_URL": moto_s3.endpoint,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def prefect_server(service_env, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("prefect-server") / "server.log"
    env = {**os.environ, **service_env}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, log, timeout=120)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def prefect_cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [*PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def deployment_file(dest: Path, spec, source: Path) -> Path:
    """infra/prefect.yaml as shipped (module entry points, no pull step, pools cpu and a100), with the
    toy family's spec and release folder as the deployments' parameters."""
    doc = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    for d in doc["deployments"]:
        if "spec" in d.get("parameters", {}):
            d["parameters"]["spec"] = spec.model_dump(mode="json")
        if "source" in d.get("parameters", {}):
            d["parameters"]["source"] = str(source)
        d.pop("schedules", None)  # the watcher is started by hand here
        d["work_pool"].pop("job_variables", None)  # gpu_count is a kubernetes template variable
    dest.write_text(yaml.safe_dump(doc))
    return dest


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # workers and served processes ignore SIGTERM for a long time
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_deployment_cli(env: dict, name: str, *params: str) -> str:
    args = [arg for p in params for arg in ("--param", p)]
    out = prefect_cli(env, "deployment", "run", name, *args)
    return out.split("UUID:", 1)[1].split()[0]


def wait_deployment(name: str, timeout: float = 120) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                client.read_deployment_by_name(name)
                return
            except Exception:
                time.sleep(1)
    raise TimeoutError(f"deployment {name} did not appear in {timeout} s")


def wait_flow_run(flow_run_id: str, timeout: float = 600) -> str:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return state.type.value
            time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} did not finish in {timeout} s")


def test_release_cycles_and_backports_through_deploy_workers_and_serve(
    fast_family, service_env, prefect_server, tmp_path, monkeypatch
):
    """`recycler deploy` on a fresh server (it creates the pools), workers started in a folder that is
    not the checkout, the watcher dispatching to `release-cycle/gpu`, a manual backport through the
    worker with the family's spec as the default, and `recycler serve` beside it under its own names."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from recycler_flows.release import dispatch_cycle, release_cycle, watch_releases

    from recycler.store.releases import LocalFolderSource

    for key, value in service_env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    env = {**os.environ, **service_env, "PREFECT_API_URL": prefect_server}
    releases = tmp_path / "releases"
    for v in ("v1", "v2"):
        (releases / v).mkdir(parents=True)
        for f in fast_family.versions[v].iterdir():
            os.link(f, releases / v / f.name)
    spec = fast_family.cycle_spec(
        finetune={"max_steps": 20, "eval_every": 10}, evaluation={"limit": 50}, gate_margin=-1.0
    )
    spec_file = tmp_path / "family.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))

    deploy = subprocess.run(
        [sys.executable, "-m", "recycler.cli", "deploy", "--prefect-file", str(deployment_file(tmp_path / "p.yaml", spec, releases))],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stderr
    assert "work pools created: a100, cpu" in deploy.stdout
    elsewhere = tmp_path / "workers"  # not the checkout: flows load from the installed package
    elsewhere.mkdir()
    workers = [
        start(
            [*PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"],
            env,
            elsewhere / f"{pool}.log",
        )
        for pool in ("cpu", "a100")
    ]
    served = None
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            first = release_cycle("v1", str(releases), spec)
            assert first["registered"]["ft"] == "toy-arith-ft/1"

            # the watcher hands v2 to the deployment (the a100 worker) and waits for it
            cycles = watch_releases(str(releases), spec, dispatch="deployment")
            assert [c["version"] for c in cycles] == ["v2"] and cycles[0]["state"] == "Completed"
            v2 = next(r for r in LocalFolderSource(releases, "toy").list() if r.version == "v2")
            # a second watcher joins the same attempt (its key is recorded in the chain)
            again = dispatch_cycle("release-cycle/gpu", v2, str(releases), spec, 1, cycles[0]["key"])
            assert again["flow_run"] == cycles[0]["flow_run"] and cycles[0]["key"] == f"{v2.key}/1"

            # a manual backport: only the Δ and the target; the family's spec is the deployment's default
            run_id = run_deployment_cli(
                env, "backport/manual", "diff=toy-arith-diff@next-diff", "target_version=v1"
            )
            assert wait_flow_run(run_id) == "COMPLETED", (elsewhere / "cpu.log").read_text()[-4000:]

            # `recycler serve` beside the deployments: its own names, so both keep working
            cmd = [sys.executable, "-m", "recycler.cli", "serve", str(releases), "--spec", str(spec_file)]
            served = start(cmd, env, tmp_path / "serve.log")
            wait_deployment("backport/served")
            run_id = run_deployment_cli(
                env, "backport/served", "diff=toy-arith-diff@next-diff", "target_version=v1", "alpha=0.5"
            )
            assert wait_flow_run(run_id) == "COMPLETED", (tmp_path / "serve.log").read_text()[-4000:]
            run_id = run_deployment_cli(
                env, "backport/manual", "diff=toy-arith-diff@next-diff", "target_version=v1"
            )
            assert wait_flow_run(run_id) == "COMPLETED", (elsewhere / "cpu.log").read_text()[-4000:]
    finally:
        for proc in [*workers, *([served] if served else [])]:
            stop(proc)

    settings = Settings()
    reg = Registry.from_settings(settings)
    ft2 = [v for v in reg.versions("ft", "toy", "arith") if v.tags["base_version"] == "v2"]
    assert len(ft2) == 1 and ft2[0].tags["parent_diff"] == "toy-arith-diff/1"
    d2 = reg.get("toy-arith-diff", "next-diff")
    assert d2.tags["base_version"] == "v2" and d2.source.startswith("s3://")
    merged = [v for v in reg.versions("merged", "toy", "arith") if v.tags.get("transfer") == "backport"]
    assert len(merged) == 2  # α = 1 (twice: one version) and α = 0.5 (served): two results
    assert {v.tags["parent_diff"] for v in merged} == {d2.reference} and {
        v.tags["base_version"] for v in merged
    } == {"v1"}
    store = open_store(settings)
    for v in (ft2[0], d2, *merged):
        store.verify(v.artifact)  # every byte in S3 matches the manifest the version points at
