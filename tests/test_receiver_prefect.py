"""The receiver against a real Prefect server (prefect_test_harness: its trigger and action services
run): what reaches the event stream, which deployment runs the trigger starts, and end to end on
loopback: moto's S3 server, an MLflow server, `recycler serve` with its receiver, a release uploaded
object by object with a MinIO-shaped notification posted per object (moto sends none over HTTP) →
the release is announced once the upload pauses (the receiver's 2 s quiet period) and the family's
cycle starts without a poll; the latency from the last object to the cycle's flow run is printed; a
watcher run afterwards finds nothing to do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from receiver_payloads import SHA, dumps, hub_webhook, s3_notification
from servers import free_port, wait_http

from recycler.service.announce import EVENT
from recycler.service.routes import Route, RouteTable
from recycler.service.spec import CycleSpec

SECRET = "rcyTEST-webhook-secret-9a8b7c6d5e"


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    saved = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # telemetry only adds SQLite lock noise
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield PREFECT_API_URL.value()
    finally:
        os.environ.pop("PREFECT_SERVER_ANALYTICS_ENABLED") if saved is None else os.environ.update(
            PREFECT_SERVER_ANALYTICS_ENABLED=saved
        )


def flow_runs(client, *, deployment_id=None, flow: str | None = None) -> list:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowFilter,
        FlowFilterName,
    )

    deployments = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])) if deployment_id else None
    flows = FlowFilter(name=FlowFilterName(any_=[flow])) if flow else None
    return client.read_flow_runs(deployment_filter=deployments, flow_filter=flows)


def wait_for(what: str, probe, timeout: float, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := probe():
            return found
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout} s")


def test_one_event_per_release_reaches_prefect_and_its_trigger_starts_one_watcher_run(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from recycler_flows.receiver import Receiver, prefect_emitter
    from recycler_flows.release import release_trigger, watch_releases
    from starlette.testclient import TestClient

    spec = CycleSpec(family="evfam", train=tmp_path / "t.jsonl", evaluation={"task": tmp_path / "e.jsonl"})
    deployment = watch_releases.to_deployment(
        name="event-test", parameters={"source": "hf://acme/evfam", "spec": spec.model_dump(mode="json")},
        triggers=[release_trigger("evfam")],
    )  # fmt: skip
    deployment_id = deployment.apply()
    time.sleep(2)  # the trigger service loads the new automation
    routes = RouteTable((Route("hf://acme/evfam", "evfam"), Route("hf://acme/other", "otherfam")))

    def receiver() -> TestClient:  # a fresh receiver: a restart forgets the keys it announced
        return TestClient(Receiver(routes, SECRET, prefect_emitter(), lambda *a: "unused").app())

    tag = dumps(hub_webhook("acme/evfam", [("refs/tags/v1", SHA)]))
    first, restarted = receiver(), receiver()
    assert first.post("/hooks/hub", content=tag).status_code == 401  # unsigned: no event
    signed = {"X-Webhook-Secret": SECRET}
    assert first.post("/hooks/hub", content=tag, headers=signed).json()["announced"] == [
        f"evfam@v1#{SHA[:16]}"
    ]
    assert first.post("/hooks/hub", content=tag, headers=signed).json()["duplicates"] == [
        f"evfam@v1#{SHA[:16]}"
    ]
    # after a restart the replay is emitted again, with the same event id: Prefect evaluates it once
    assert restarted.post("/hooks/hub", content=tag, headers=signed).json()["announced"] == [
        f"evfam@v1#{SHA[:16]}"
    ]
    other = dumps(hub_webhook("acme/other", [("refs/tags/v1", SHA)]))
    assert first.post("/hooks/hub", content=other, headers=signed).status_code == 202  # another family

    with get_client(sync_client=True) as client:
        runs = wait_for(
            "the triggered watcher run", lambda: flow_runs(client, deployment_id=deployment_id), 30
        )
        time.sleep(3)  # time enough for a second run, if the replay or the other family started one
        runs = flow_runs(client, deployment_id=deployment_id)
        assert len(runs) == 1 and runs[0].parameters["announced"] == f"evfam@v1#{SHA[:16]}"
        assert runs[0].parameters["source"] == "hf://acme/evfam"  # the deployment's own parameters kept
        wanted = {"recycler.release.evfam@v1", "recycler.release.otherfam@v1"}

        def stored() -> list:  # the server persists events in batches: read until both are there
            page = client.read_events(EventFilter(event=EventNameFilter(name=[EVENT])), limit=50)
            found = [e for e in page.events if e.resource.id in wanted]
            return found if {e.resource.id for e in found} == wanted else []

        ours = wait_for("the stored events", stored, 30, 0.5)
    assert {e.resource.id for e in ours} == {"recycler.release.evfam@v1", "recycler.release.otherfam@v1"}
    evfam = next(e for e in ours if e.resource.id == "recycler.release.evfam@v1")
    assert evfam.payload == {"family": "evfam", "version": "v1", "fingerprint": SHA, "source": "hf://acme/evfam",
                             "uri": "hf://acme/evfam@v1", "key": f"evfam@v1#{SHA[:16]}", "via": "hub"}  # fmt: skip
    assert evfam.resource["recycler.family"] == "evfam"
    print(
        f"events stored for evfam@v1 (sent twice with one id): {sum(e.resource.id == evfam.resource.id for e in ours)}"
    )


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=dumps(body), method="POST",
                                 headers={"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 202
        return json.loads(r.read())


def test_a_release_uploaded_to_s3_starts_its_cycle_through_serve_and_its_receiver(
    prefect_api, moto_s3, mlflow_server, tiny_releases, tmp_path, monkeypatch
):
    from prefect.client.orchestration import get_client
    from recycler_flows.release import watch_releases

    from recycler.settings import get_settings

    env_over = {
        "RECYCLER_HOME": str(tmp_path / "home"), "RECYCLER_TRACK": "0", "RECYCLER_S3_ENDPOINT_URL": moto_s3.endpoint,
        "RECYCLER_TRACKING_URI": mlflow_server.uri, "MLFLOW_S3_ENDPOINT_URL": moto_s3.endpoint,
        "RECYCLER_ARTIFACT_STORE": f"s3://{moto_s3.bucket}/receiver-e2e",
        "RECYCLER_WEBHOOK_SECRET": SECRET, "PREFECT_API_URL": prefect_api, "HF_HUB_OFFLINE": "1",
        "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }  # fmt: skip
    task = tmp_path / "task.jsonl"
    task.write_text(
        "".join(json.dumps({"prompt": f"{a}+{a}?", "answer": str(2 * a)}) + "\n" for a in range(4))
    )
    spec = {"family": "e2e", "variant": "inst", "train": str(tiny_releases["sample"]), "max_relative_norm": 5.0,
            "evaluation": {"task": str(task), "limit": 4, "max_new_tokens": 4},
            "finetune": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "eval_every": None, "save_every": 2}}  # fmt: skip
    spec_path = tmp_path / "e2e.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    source = f"s3://{moto_s3.bucket}/releases/e2e"
    port = free_port()
    cmd = [sys.executable, "-m", "recycler.cli", "serve", source, "--spec", str(spec_path), "--receive-port", str(port), "--poll", "1"]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        served = subprocess.Popen(cmd, env={**os.environ, **env_over}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", served, log, timeout=120)
        with get_client(sync_client=True) as client:
            wait_for("the served watcher", lambda: _deployment(client, "watch-releases/served"), 60)
            time.sleep(2)  # its trigger's automation is loaded
            s3 = moto_s3.client()
            files = sorted(Path(tiny_releases["v1"]).iterdir(), key=lambda f: f.suffix == ".safetensors")
            for f in files:  # weights last; one MinIO-shaped notification per object, as MinIO posts them
                key = f"releases/e2e/v1/{f.name}"
                s3.put_object(Bucket=moto_s3.bucket, Key=key, Body=f.read_bytes())
                last_object = time.time()
                answer = _post(f"http://127.0.0.1:{port}/hooks/s3", s3_notification(moto_s3.bucket, [key]))
                assert answer["pending"] == ["e2e@v1"] and not answer["announced"], (f.name, answer)

            cycle = wait_for("the cycle's flow run", lambda: [r for r in flow_runs(client, flow="release-cycle") if r.start_time], 90)[0]  # fmt: skip
            watcher = next(
                r
                for r in flow_runs(client, flow="watch-releases")
                if str(r.parameters.get("announced", "")).startswith("e2e@")
            )
            latency = cycle.start_time.timestamp() - last_object

            def since(t) -> str:
                return (
                    f"{t.timestamp() - last_object:.1f} s" if t else "not yet (queued behind a scheduled one)"
                )

            # (the served deployment's schedule may have started a watcher of its own; whichever
            # reaches the complete release first dispatches its cycle, once)
            print(f"\nlast object → watcher run created {since(watcher.created)}, started "
                  f"{since(watcher.start_time)} → cycle run started {latency:.1f} s")  # fmt: skip
            assert watcher.created.timestamp() > last_object - 1  # the announcement created it
            assert cycle.parameters["version"] == "v1" and latency < 60  # seconds, not an hourly poll
            done = wait_for("the cycle's end", lambda: (s := client.read_flow_run(cycle.id).state) and s.is_final() and s, 240, 1)  # fmt: skip
            assert done.is_completed(), log.read_text()[-3000:]
    finally:
        os.killpg(served.pid, signal.SIGINT)  # a served process ignores SIGTERM for a long time
        try:
            served.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(served.pid, signal.SIGKILL)
            served.wait()
    assert SECRET not in log.read_text()
    # the watcher, run afterwards (the reconciler), finds nothing to do
    for k, v in env_over.items():
        if k.startswith("RECYCLER_"):
            monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    try:
        assert watch_releases(source, CycleSpec.model_validate(spec)) == []
    finally:
        get_settings.cache_clear()


def _deployment(client, name: str):
    try:
        return client.read_deployment_by_name(name)
    except Exception:
        return None


def test_the_trigger_in_infra_prefect_yaml_starts_the_watcher_deployment(prefect_api, tmp_path):
    """`recycler deploy` with infra/prefect.yaml as shipped: its trigger becomes an automation, and the
    event of a release of the file's family creates one run of watch-releases/watcher (no worker
    needed to see it created), with the release key as `announced` and the file's parameters."""
    from prefect.client.orchestration import get_client
    from recycler_flows.receiver import prefect_emitter

    from recycler.service.announce import Announcement
    from recycler.store.releases import Release

    repo = Path(__file__).resolve().parents[1]
    doc = yaml.safe_load((repo / "infra" / "prefect.yaml").read_text())
    for d in doc["deployments"]:
        d["work_pool"].pop("job_variables", None)  # gpu_count is a kubernetes template variable
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run([sys.executable, "-m", "recycler.cli", "deploy", "--prefect-file", str(tmp_path / "prefect.yaml")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    family = doc["definitions"]["family"]["family"]
    with get_client(sync_client=True) as client:
        watcher = client.read_deployment_by_name("watch-releases/watcher")
        (automation,) = client.read_automations_by_name(f"{family} release published")
        assert automation.trigger.expect == {EVENT}
        assert automation.actions[0].deployment_id == watcher.id
        time.sleep(2)  # the trigger service loads the new automation
        release = Release(family, "v9", "s3://recycler-releases/llama-3-8b/v9/", "c0ffee" * 10)
        prefect_emitter()(Announcement(release, "s3://recycler-releases/llama-3-8b", "s3"))
        runs = wait_for("the watcher run", lambda: flow_runs(client, deployment_id=watcher.id), 30)
        assert len(runs) == 1 and runs[0].parameters["announced"] == release.key
        assert (
            runs[0].parameters["dispatch"] == "deployment" and runs[0].parameters["spec"]["family"] == family
        )
