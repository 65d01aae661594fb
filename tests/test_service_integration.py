"""The service as deployed: `prefect server start`, a `process` worker, deployments from infra/prefect.yaml,
`mlflow server` (SQLite) with artifacts in S3 (moto over HTTP), all on 127.0.0.1.

1. The first release cycle runs in this process against the servers (weights go to S3, versions to the
   MLflow server).
2. The watcher, in `deployment` mode, starts `release-cycle/gpu` for v2 through `run_deployment` with the
   release's idempotency key; the worker runs it; a second dispatch of the same release returns the same
   flow run (two watchers, one cycle).
3. `prefect deployment run backport/manual --param …` backports the newest Δ onto v1; the worker runs it
   and the merged model appears in the registry with its lineage, its weights verified in S3.
"""

from __future__ import annotations

import os
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


def deployment_file(dest: Path) -> Path:
    """infra/prefect.yaml as production has it, but code from this checkout and every pool `cpu`
    (this machine has no A100 pool: the release cycle runs its fine-tune on the CPU)."""
    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    spec["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    keep = {"release_cycle", "backport"}
    spec["deployments"] = [d for d in spec["deployments"] if d["entrypoint"].rsplit(":", 1)[1] in keep]
    for d in spec["deployments"]:
        d["work_pool"] = {"name": "cpu"}
    dest.write_text(yaml.safe_dump(spec))
    return dest


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


def test_release_cycles_and_backport_through_deployments_and_worker(
    fast_family, service_env, prefect_server, tmp_path, monkeypatch
):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from recycler_flows.release import dispatch_cycle, release_cycle, watch_releases

    from recycler.service.spec import CycleSpec
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
    ft = fast_family.finetune_config.updated(max_steps=20, eval_every=10)
    spec = CycleSpec(
        family="toy", variant="arith", train=fast_family.train, eval_task=fast_family.test, finetune=ft,
        max_relative_norm=5.0, eval_limit=50, gate_margin=-1.0,
    )  # fmt: skip

    prefect_cli(env, "work-pool", "create", "cpu", "--type", "process")
    prefect_cli(
        env, "--no-prompt", "deploy", "--all", "--prefect-file", str(deployment_file(tmp_path / "p.yaml"))
    )
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as out:
        worker = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", "cpu", "--type", "process", "--limit", "1"],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            first = release_cycle("v1", str(releases), spec)
            assert first["registered"]["ft"] == "toy-arith-ft/1"

            # the watcher hands v2 to the deployment (worker) and waits for it
            cycles = watch_releases(str(releases), spec, dispatch="deployment")
            assert [c["version"] for c in cycles] == ["v2"] and cycles[0]["state"] == "Completed"
            v2 = next(r for r in LocalFolderSource(releases, "toy").list() if r.version == "v2")
            again = dispatch_cycle(
                "release-cycle/gpu", v2, str(releases), spec
            )  # a second watcher, same release
            assert again["flow_run"] == cycles[0]["flow_run"]

            out = prefect_cli(
                env, "deployment", "run", "backport/manual",
                "--param", "diff=toy-arith-diff@next-diff", "--param", "target_version=v1",
                "--param", "family=toy", "--param", "variant=arith",
                "--param", f"eval_task={fast_family.test}",
            )  # fmt: skip
            run_id = out.split("UUID:", 1)[1].split()[0]
            assert wait_flow_run(run_id) == "COMPLETED", worker_log.read_text()[-4000:]
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)

    settings = Settings()
    reg = Registry.from_settings(settings)
    ft2 = [v for v in reg.versions("ft", "toy", "arith") if v.tags["base_version"] == "v2"]
    assert len(ft2) == 1 and ft2[0].tags["parent_diff"] == "toy-arith-diff/1"
    d2 = reg.get("toy-arith-diff", "next-diff")
    assert d2.tags["base_version"] == "v2" and d2.source.startswith("s3://")
    merged = [v for v in reg.versions("merged", "toy", "arith") if v.tags.get("transfer") == "backport"]
    assert len(merged) == 1 and merged[0].tags["parent_diff"] == d2.reference
    assert merged[0].tags["base_version"] == "v1"
    store = open_store(settings)
    for v in (ft2[0], d2, merged[0]):
        store.verify(v.artifact)  # every byte in S3 matches the manifest the version points at
