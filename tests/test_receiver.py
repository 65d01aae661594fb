"""The release receiver (recycler receive) in this process: Hub webhooks and S3 notifications in the
senders' documented shapes, the refusals (status per payload), completeness of S3 uploads checked in a
real store (moto's S3 server), replays, the routing table, and logs without secrets.

What reaches Prefect (events, triggered watcher runs) and the end-to-end latency are in
tests/test_receiver_prefect.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import yaml
from receiver_payloads import SHA, dumps, eventbridge, hub_webhook, s3_notification
from recycler_flows.receiver import Limits, Receiver
from starlette.testclient import TestClient

from recycler.errors import InvalidConfig
from recycler.service import announce
from recycler.service.announce import EVENT, Announcement
from recycler.service.limits import QuietPeriod, RateLimit, RecentKeys
from recycler.service.routes import Route, RouteTable, load_routes
from recycler.store.releases import Release, S3PrefixSource

SECRET = "rcyTEST-webhook-secret-4f3e2d1c0b"
HUB = {"X-Webhook-Secret": SECRET}
BEARER = {"Authorization": f"Bearer {SECRET}"}


class Emitted(list):
    def __call__(self, a: Announcement) -> None:
        self.append(a)


def not_checked(source: str, family: str, version: str) -> Release | str:
    raise AssertionError("a Hub ref needs no store check")


def client(routes: RouteTable, check=not_checked, limits: Limits | None = None) -> tuple[TestClient, Emitted]:
    emitted = Emitted()
    receiver = Receiver(routes, SECRET, emitted, check, limits or Limits())
    return TestClient(receiver.app(), client=("203.0.113.7", 5555)), emitted


HUB_ROUTES = RouteTable((Route("hf://acme/base-llm", "acme"), Route("hf://other/model", "other")))


def test_a_signed_hub_tag_is_announced_once_and_replays_are_answered_not_reemitted(caplog):
    caplog.set_level(logging.INFO, logger="recycler.receiver")
    http, emitted = client(HUB_ROUTES)
    body = dumps(hub_webhook(refs=[("refs/tags/v2", SHA), ("refs/pr/3", SHA)]))
    r = http.post("/hooks/hub", content=body, headers=HUB)
    assert r.status_code == 202
    key = f"acme@v2#{SHA[:16]}"
    assert (
        r.json()["announced"] == [key] and "refs/pr/3 is neither a tag nor a branch" in r.json()["ignored"][0]
    )
    (a,) = emitted
    event = a.event()
    assert event["event"] == EVENT == "recycler.release.published"
    assert event["resource"]["prefect.resource.id"] == "recycler.release.acme@v2"
    assert event["payload"] | {"uri": None} == {
        "family": "acme", "version": "v2", "fingerprint": SHA, "source": "hf://acme/base-llm",
        "uri": None, "key": key, "via": "hub",
    }  # fmt: skip
    # the key is the watcher's (Release.key): the same release listed by HubSource has it
    assert key == Release("acme", "v2", "hf://acme/base-llm@v2", SHA).key
    for _ in range(3):  # replays: answered 202, named as duplicates, never emitted again
        again = http.post("/hooks/hub", content=body, headers=HUB)
        assert again.status_code == 202 and again.json()["duplicates"] == [key]
    assert len(emitted) == 1
    # a re-tag to another commit is another release (another key), announced
    moved = http.post(
        "/hooks/hub", content=dumps(hub_webhook(refs=[("refs/tags/v2", "ab" * 20)])), headers=HUB
    )
    assert moved.json()["announced"] == [f"acme@v2#{'ab' * 8}"] and len(emitted) == 2
    # a replayed event carries the same id (Prefect's trigger service evaluates an id once)
    assert announce.Announcement(a.release, a.source, "hub").event()["id"] == event["id"]


WRONG = {"X-Webhook-Secret": "rcyTEST-wrong-secret-0000"}
REFUSALS = [  # (what, path, body, headers, status); nothing is emitted for any of them
    ("unsigned Hub webhook", "/hooks/hub", dumps(hub_webhook(refs=[("refs/tags/v2", SHA)])), {}, 401),
    ("wrong Hub secret", "/hooks/hub", dumps(hub_webhook(refs=[("refs/tags/v2", SHA)])), WRONG, 403),
    (
        "Hub secret sent as a bearer token",
        "/hooks/hub",
        dumps(hub_webhook(refs=[("refs/tags/v2", SHA)])),
        BEARER,
        401,
    ),
    (
        "S3 notification without a token",
        "/hooks/s3",
        dumps(s3_notification("b", ["p/v1/config.json"])),
        {},
        401,
    ),
    (
        "S3 notification, wrong token",
        "/hooks/s3",
        dumps(s3_notification("b", ["p/v1/config.json"])),
        {"Authorization": "Bearer nope"},
        403,
    ),
    ("body not JSON", "/hooks/hub", b"event=push&ref=v2", HUB, 400),
    ("truncated JSON", "/hooks/s3", dumps(s3_notification("b", ["k"]))[:40], BEARER, 400),
    ("JSON, not a Hub webhook", "/hooks/hub", dumps({"ref": "refs/tags/v2"}), HUB, 422),
    ("updatedRefs not a list", "/hooks/hub", dumps({**hub_webhook(), "updatedRefs": "v2"}), HUB, 422),
    ("JSON, not an S3 notification", "/hooks/s3", dumps({"Records": "x"}), BEARER, 422),
    (
        "S3 record without a key",
        "/hooks/s3",
        dumps({"Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": "b"}}}]}),
        BEARER,
        422,
    ),
    ("announce without a version", "/hooks/announce", dumps({"source": "/data/x"}), BEARER, 422),
    (
        "announce with a path as version",
        "/hooks/announce",
        dumps({"source": "/data/x", "version": "../etc"}),
        BEARER,
        422,
    ),
    ("body over the limit (Content-Length)", "/hooks/hub", b"{" + b" " * 300_000 + b"}", HUB, 413),
]
IGNORED = [  # well formed but not a release of a routed family: 202, nothing emitted
    ("a discussion opened", hub_webhook(scope="discussion", action="create"), "discussion event"),
    ("a dataset repo", hub_webhook(repo_type="dataset", refs=[("refs/tags/v2", SHA)]), "only model repos"),
    ("a tag deleted", hub_webhook(refs=[("refs/tags/v2", None)]), "was deleted"),
    ("another repo", hub_webhook(repo="someone/else", refs=[("refs/tags/v2", SHA)]), "no route"),
    ("a content update without refs", hub_webhook(), "no updatedRefs"),
    (
        "a ref that is no version name",
        hub_webhook(refs=[("refs/heads/feat/x..y", SHA)]),
        "not a valid version",
    ),
]


@pytest.mark.parametrize(
    ("what", "path", "body", "headers", "status"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_refusals(what, path, body, headers, status, caplog):
    caplog.set_level(logging.INFO, logger="recycler.receiver")
    http, emitted = client(HUB_ROUTES)
    r = http.post(path, content=body, headers={"Content-Type": "application/json", **headers})
    assert r.status_code == status, (what, r.json())
    assert not emitted
    assert SECRET not in caplog.text and "rcyTEST-wrong" not in caplog.text and f" {status}: " in caplog.text


@pytest.mark.parametrize(("what", "body", "why"), IGNORED, ids=[i[0] for i in IGNORED])
def test_irrelevant_hub_events_are_accepted_and_ignored(what, body, why):
    http, emitted = client(HUB_ROUTES)
    r = http.post("/hooks/hub", content=dumps(body), headers=HUB)
    assert r.status_code == 202 and r.json()["announced"] == [] and why in " ".join(r.json()["ignored"])
    assert not emitted


def test_a_chunked_body_over_the_limit_is_cut_off_while_it_arrives():
    http, emitted = client(HUB_ROUTES, limits=Limits(max_body=1024))
    chunks = (b"x" * 512 for _ in range(8))  # no Content-Length: counted as it streams in
    r = http.post("/hooks/hub", content=chunks, headers=HUB)
    assert r.status_code == 413 and not emitted


def test_a_client_over_its_rate_gets_429_and_others_are_served():
    receiver = Receiver(HUB_ROUTES, SECRET, Emitted(), not_checked, Limits(per_second=0.5, burst=3))
    body = dumps(hub_webhook(refs=[("refs/tags/v2", SHA)]))
    noisy = TestClient(receiver.app(), client=("198.51.100.1", 1))
    statuses = [noisy.post("/hooks/hub", content=body, headers=WRONG).status_code for _ in range(5)]
    assert statuses == [403, 403, 403, 429, 429]  # guessing secrets is rate limited too
    other = TestClient(receiver.app(), client=("198.51.100.2", 1))
    assert other.post("/hooks/hub", content=body, headers=HUB).status_code == 202


def test_limits_are_bounded():
    now = [0.0]
    rate = RateLimit(1.0, 2, clients=3, clock=lambda: now[0])
    assert [rate.allow("a") for _ in range(3)] == [True, True, False]
    now[0] = 1.0
    assert rate.allow("a") and not rate.allow("a")
    for c in "bcdef":
        rate.allow(c)
    assert len(rate.buckets) == 3 and "a" not in rate.buckets
    seen = RecentKeys(2)
    for k in ("k1", "k2", "k3"):
        seen.add(k)
    assert "k1" not in seen and "k2" in seen and "k3" in seen
    acted: list = []
    quiet = QuietPeriod(60, acted.append, size=1)
    quiet.touch("a")
    quiet.touch("a")  # re-armed, still one waiting
    quiet.touch("b")  # no room: acted on at once
    assert acted == ["b"] and quiet.pending() == 1


# ---- S3 notifications, checked against the store ----------------------------------------------------


def publish(s3, bucket: str, prefix: str, files: dict[str, bytes]) -> list[str]:
    keys = []
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
        keys.append(f"{prefix}/{name}")
    return keys


SHARDS = {"model-00001-of-00002.safetensors": b"a" * 64, "model-00002-of-00002.safetensors": b"b" * 64}
INDEX = json.dumps({"metadata": {}, "weight_map": {"w1": "model-00001-of-00002.safetensors", "w2": "model-00002-of-00002.safetensors"}}).encode()  # fmt: skip


def test_s3_uploads_are_announced_when_the_last_object_completes_the_release(moto_s3):
    s3 = moto_s3.client()
    source = f"s3://{moto_s3.bucket}/bases/fam s3"
    routes = RouteTable.single(source, "fams3")
    http, emitted = client(routes, check=announce.check_in_store(moto_s3.endpoint), limits=Limits(settle=0))
    order = [("config.json", b'{"model_type": "llama"}'), ("model.safetensors.index.json", INDEX),
             ("model-00002-of-00002.safetensors", SHARDS["model-00002-of-00002.safetensors"])]  # fmt: skip
    for name, data in order:  # one notification per object, as MinIO sends them: nothing complete yet
        (key,) = publish(s3, moto_s3.bucket, "bases/fam s3/v1", {name: data})
        r = http.post("/hooks/s3", content=dumps(s3_notification(moto_s3.bucket, [key])), headers=BEARER)
        assert r.status_code == 202 and r.json()["announced"] == [], r.json()
    assert "shards not there yet: model-00001-of-00002.safetensors" in " ".join(r.json()["ignored"])
    # the last shard completes it: announced, with the fingerprint the watcher's listing computes
    (last,) = publish(s3, moto_s3.bucket, "bases/fam s3/v1", {"model-00001-of-00002.safetensors": SHARDS["model-00001-of-00002.safetensors"]})  # fmt: skip
    r = http.post(
        "/hooks/s3", content=dumps(s3_notification(moto_s3.bucket, [last], minio=False)), headers=BEARER
    )
    (listed,) = S3PrefixSource(moto_s3.bucket, "bases/fam s3", "fams3", endpoint_url=moto_s3.endpoint).list()
    assert r.status_code == 202 and r.json()["announced"] == [listed.key]
    assert [a.release for a in emitted] == [listed]
    # MinIO re-sends (its queue retries), a copy of one object, EventBridge: duplicates, no new event
    for body in (s3_notification(moto_s3.bucket, [last]), s3_notification(moto_s3.bucket, [last], event="ObjectCreated:Copy"),
                 eventbridge(moto_s3.bucket, last)):  # fmt: skip
        r = http.post("/hooks/s3", content=dumps(body), headers=BEARER)
        assert r.status_code == 202 and r.json()["duplicates"] == [listed.key]
    # removals, objects outside the routed prefix or deeper than a version folder: ignored
    for body, why in [
        (s3_notification(moto_s3.bucket, [last], event="ObjectRemoved:Delete"), "not an object creation"),
        (s3_notification(moto_s3.bucket, ["elsewhere/v1/config.json"]), "no route"),
        (s3_notification(moto_s3.bucket, ["bases/fam s3/v1/sub/config.json"]), "no route"),
        (eventbridge(moto_s3.bucket, last, "Object Deleted"), "not an object creation"),
    ]:
        r = http.post("/hooks/s3", content=dumps(body), headers=BEARER)
        assert r.status_code == 202 and r.json()["announced"] == [] and why in r.json()["ignored"][0]
    assert len(emitted) == 1


def test_an_upload_is_checked_once_it_pauses_so_late_files_are_in_its_fingerprint(moto_s3, caplog):
    """With a quiet period (the default, 2 s; 0.5 s here) the weights completing a release do not
    announce it while the upload goes on: the tokenizer files that follow are in the fingerprint of
    the one announcement, the watcher's."""
    caplog.set_level(logging.INFO, logger="recycler.receiver")
    s3 = moto_s3.client()
    routes = RouteTable.single(f"s3://{moto_s3.bucket}/bases/quiet", "quiet")
    http, emitted = client(routes, check=announce.check_in_store(moto_s3.endpoint), limits=Limits(settle=0.5))
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors.index.json": INDEX, **SHARDS,
             "tokenizer.json": b'{"version": "1.0"}', "tokenizer_config.json": b"{}"}  # fmt: skip
    for name, data in files.items():  # the release is complete after the shards; two more files follow
        (key,) = publish(s3, moto_s3.bucket, "bases/quiet/v1", {name: data})
        r = http.post("/hooks/s3", content=dumps(s3_notification(moto_s3.bucket, [key])), headers=BEARER)
        assert r.status_code == 202 and r.json()["pending"] == ["quiet@v1"] and r.json()["announced"] == []
    assert not emitted  # nothing while the upload goes on
    wait = time.monotonic() + 10
    while not emitted and time.monotonic() < wait:
        time.sleep(0.05)
    (listed,) = S3PrefixSource(moto_s3.bucket, "bases/quiet", "quiet", endpoint_url=moto_s3.endpoint).list()
    assert [a.release for a in emitted] == [listed]  # once, with every file in its fingerprint
    time.sleep(0.8)
    assert len(emitted) == 1 and f"quiet@v1 settled → 202: announced ['{listed.key}']" in caplog.text


def test_an_unreachable_store_or_prefect_answers_503_so_the_sender_retries(moto_s3):
    routes = RouteTable.single(f"s3://{moto_s3.bucket}/bases/x", "x")
    http, _ = client(
        routes, check=announce.check_in_store("http://127.0.0.1:9"), limits=Limits(settle=0)
    )  # nothing listens
    body = dumps(s3_notification(moto_s3.bucket, ["bases/x/v1/config.json"]))
    assert http.post("/hooks/s3", content=body, headers=BEARER).status_code == 503

    def down(_a):
        raise ConnectionError("prefect down")

    receiver = Receiver(HUB_ROUTES, SECRET, down, not_checked)
    hub = dumps(hub_webhook(refs=[("refs/tags/v3", SHA)]))
    http = TestClient(receiver.app())
    assert http.post("/hooks/hub", content=hub, headers=HUB).status_code == 503
    receiver.emit = Emitted()  # Prefect is back: the retried delivery is announced (not a duplicate)
    assert http.post("/hooks/hub", content=hub, headers=HUB).json()["announced"] == [f"acme@v3#{SHA[:16]}"]


def test_a_publisher_announces_a_folder_release_it_copied(tmp_path):
    from recycler.toy.tiny import build_tiny_model

    folder = tmp_path / "releases"
    routes = RouteTable.single(str(folder), "famdir")
    http, emitted = client(routes, check=announce.check_in_store(None))
    r = http.post("/hooks/announce", content=dumps({"source": str(folder), "version": "v1"}), headers=BEARER)
    assert r.status_code == 202 and "no folder v1" in r.json()["ignored"][0] and not emitted
    build_tiny_model(folder / "v1", seed=1)
    r = http.post("/hooks/announce", content=dumps({"source": str(folder), "version": "v1"}), headers=BEARER)
    assert r.status_code == 202 and len(emitted) == 1 and emitted[0].release.family == "famdir"
    other = http.post(
        "/hooks/announce", content=dumps({"source": "/elsewhere", "version": "v1"}), headers=BEARER
    )
    assert other.json()["ignored"] == ["/elsewhere: no route (not a release source of this receiver)"]
    hub = TestClient(Receiver(HUB_ROUTES, SECRET, emitted, not_checked).app())
    r = hub.post(
        "/hooks/announce", content=dumps({"source": "hf://acme/base-llm", "version": "v1"}), headers=BEARER
    )
    assert r.status_code == 202 and "by the Hub's webhook" in r.json()["ignored"][0] and len(emitted) == 1


# ---- the routing table ------------------------------------------------------------------------------


def spec_file(path: Path, family: str, variant: str = "instruct") -> Path:
    path.write_text(yaml.safe_dump({"family": family, "variant": variant, "train": "t.jsonl", "evaluation": {"task": "e.jsonl"}}))  # fmt: skip
    return path


def test_routes_map_sources_to_families_and_report_every_problem(tmp_path):
    spec_file(tmp_path / "a-inst.yaml", "fam-a")
    spec_file(tmp_path / "a-math.yaml", "fam-a", "math")
    spec_file(tmp_path / "b.yaml", "fam-b")
    table = tmp_path / "routes.yaml"
    table.write_text(yaml.safe_dump({"routes": [
        {"source": "hf://acme/a", "spec": "a-inst.yaml"},
        {"source": "hf://acme/a", "spec": "a-math.yaml"},  # two variants of one family: one route
        {"source": "s3://bucket/bases/b/", "spec": "b.yaml"},
    ]}))  # fmt: skip
    routes = load_routes(table)
    assert [r.family for r in routes.for_hub("acme/a")] == ["fam-a"]
    assert [(r.family, v, n) for r, v, n in routes.for_object("bucket", "bases/b/v7/config.json")] == [("fam-b", "v7", "config.json")]  # fmt: skip
    assert routes.for_object("bucket", "bases/bb/v7/config.json") == [] and routes.for_hub("acme/b") == []
    table.write_text(yaml.safe_dump({"routes": [{"source": "hf://x/y", "spec": "missing.yaml"}, {"source": "hf://x/z", "spec": "b.yaml", "family": "b"}]}))  # fmt: skip
    with pytest.raises(InvalidConfig) as e:
        load_routes(table)
    assert "routes[0]" in str(e.value) and "missing.yaml" in str(e.value) and "routes[1]" in str(e.value)


def test_the_shipped_trigger_routes_and_compose_service_agree():
    """infra/prefect.yaml's watcher trigger names the event and the family of its spec; the receiver's
    routes in infra/receiver/ load and name the watcher's source; compose wires MinIO to the receiver."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    infra = Path(__file__).resolve().parents[1] / "infra"
    doc = yaml.safe_load((infra / "prefect.yaml").read_text())
    watcher = next(d for d in doc["deployments"] if d["name"] == "watcher")
    family = watcher["parameters"]["spec"]["family"]
    (trigger,) = [DeploymentEventTrigger.model_validate(t) for t in watcher["triggers"]]
    assert trigger.expect == {EVENT} and trigger.parameters == {"announced": "{{ event.payload.key }}"}
    assert trigger.match.model_dump() == {"prefect.resource.id": f"recycler.release.{family}@*"}
    assert (
        watcher["schedules"][0]["interval"] > 3600
        and watcher["concurrency_limit"]["collision_strategy"] == "ENQUEUE"
    )
    routes = load_routes(infra / "receiver" / "routes.yaml")
    assert [(r.source, r.family) for r in routes.routes] == [(watcher["parameters"]["source"], family)]
    compose = yaml.safe_load((infra / "compose.yaml").read_text())
    minio = compose["services"]["minio"]["environment"]
    assert minio["MINIO_NOTIFY_WEBHOOK_ENDPOINT_RECYCLER"] == "http://receiver:8470/hooks/s3"
    receiver = compose["services"]["receiver"]
    assert receiver["command"][:2] == ["recycler", "receive"] and "8470" in receiver["command"]
    assert "arn:minio:sqs::RECYCLER:webhook" in compose["services"]["minio-init"]["command"][0]


def test_recycler_receive_serves_on_a_socket_and_refuses_to_start_without_a_secret(tmp_path):
    """The command itself: no secret, no receiver (exit 23, saying what to set); with one, a real socket
    on loopback: health, a refusal, and a 503 while the Prefect API is down; the secret never printed."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from servers import free_port, wait_http

    spec_file(tmp_path / "acme.yaml", "acme")
    (tmp_path / "routes.yaml").write_text(yaml.safe_dump({"routes": [{"source": "hf://acme/base-llm", "spec": "acme.yaml"}]}))  # fmt: skip
    port, down = free_port(), free_port()
    cmd = [sys.executable, "-m", "recycler.cli", "receive", "--routes", str(tmp_path / "routes.yaml"), "--port", str(port)]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{down}/api", "PREFECT_CLIENT_MAX_RETRIES": "0"}
    env.pop("RECYCLER_WEBHOOK_SECRET", None)
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 23 and "RECYCLER_WEBHOOK_SECRET" in refused.stdout + refused.stderr
    log = tmp_path / "receive.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env={**env, "RECYCLER_WEBHOOK_SECRET": SECRET}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log, timeout=120)

        def post(headers: dict) -> int:
            body = dumps(hub_webhook(refs=[("refs/tags/v5", SHA)]))
            req = urllib.request.Request(f"http://127.0.0.1:{port}/hooks/hub", data=body, headers=headers, method="POST")  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert post({}) == 401
        assert post(HUB) == 503  # the Prefect API does not answer: the Hub retries later
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    text = log.read_text()
    assert "/hooks/hub from 127.0.0.1 → 401" in text and "→ 503" in text and SECRET not in text
