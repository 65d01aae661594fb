"""What a person clicks through in the MLflow UI, checked through a real `mlflow server`'s REST API:
descriptions whose links resolve, forward links that appear when later cycles and backports use a Δ,
one run per cycle with its steps nested under it, a run per backport, the gate's decision where it can
be seen, and params that are readable while credentials are not.

Three release cycles with the fake trainer and scorer (tests/fakes.py): v1 first, v2 recycled and
promoted (with a baseline), v3 recycled and refused; then a backport of the newest promoted Δ onto v1.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
from fakes import FakeScorer, FakeTrainer, table

from recycler.redact import key_is_secret, redact, scrub
from recycler.registry.client import Registry
from recycler.registry.links import EXPERIMENT_KIND
from recycler.service.composition import ComposedPart
from recycler.service.cycle import run_cycle
from recycler.service.services import Services
from recycler.service.spec import CycleSpec
from recycler.service.transfer import TransferRequest, run_transfer
from recycler.settings import Settings
from recycler.store import open_store

SCORES = {
    ("v1", "ft"): 0.6,
    ("v2", "merged"): 0.4,
    ("v2", "ft"): 0.7,
    ("v2", "ft_from_base"): 0.65,
    ("v3", "merged"): 0.45,
    ("v3", "ft"): 0.5,  # below the champion (0.7): refused
    ("v1", "backport"): 0.3,
    ("v1", "lora"): 0.55,
    ("v2", "lora"): 0.6,
    ("v3", "lora"): 0.45,
}
VERSION_LINK = re.compile(r"\]\(#/models/([^/?)]+)/versions/(\d+)\?workflowType=machine_learning\)")
RUN_LINK = re.compile(r"\]\(#/experiments/(\d+)/runs/([0-9a-f]+)\?workflowType=machine_learning\)")


@pytest.fixture(scope="module")
def story(tiny_releases, mlflow_server, moto_s3, tmp_path_factory):
    """Three cycles and a backport against the MLflow server, artifacts in the moto bucket."""
    root, tag = tmp_path_factory.mktemp("ui"), uuid.uuid4().hex[:6]
    saved = os.environ.pop("RECYCLER_TRACK", None)  # the service's runs are on by default
    settings = Settings(
        home=root / "home",
        tracking_uri=mlflow_server.uri,
        experiment=f"ui-{tag}",
        artifact_store=f"s3://{moto_s3.bucket}/ui-{tag}",
        s3_endpoint_url=moto_s3.endpoint,
    )
    svc = Services(settings, open_store(settings), Registry(settings.tracking_uri), FakeTrainer(table(SCORES)),
                   FakeScorer(table(SCORES)))  # fmt: skip
    spec = CycleSpec(family=f"ui{tag}", variant="inst", train=tiny_releases["sample"], baseline=True,
                     evaluation={"task": tiny_releases["sample"]}, max_relative_norm=5.0, adapter={"rank": 2})  # fmt: skip
    releases = root / "releases"
    releases.mkdir()
    try:
        cycles = {}
        for v in ("v1", "v2", "v3"):
            shutil.copytree(tiny_releases[v], releases / v, copy_function=os.link)
            cycles[v] = run_cycle(v, str(releases), spec, services=svc)
        back = run_transfer("backport", f"{spec.family}-inst-diff@next-diff", "v1", TransferRequest.of(spec), services=svc)  # fmt: skip
        add = (ComposedPart(diff=cycles["v1"].registered["diff"], alpha=0.5),)
        composed = run_transfer("backport", f"{spec.family}-inst-diff@next-diff", "v1", TransferRequest.of(spec, add=add), services=svc)  # fmt: skip
        cycles["composed"] = composed
    finally:
        if saved is not None:
            os.environ["RECYCLER_TRACK"] = saved
    return svc, spec, cycles, back


def described(svc: Services, family: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Every registered version of the family: reference → (description, tags)."""
    out = {}
    for kind in ("base", "ft", "diff", "merged", "lora"):
        for v in svc.registry.versions(kind, family, None if kind == "base" else "inst"):
            mv = svc.registry.client.get_model_version(v.name, v.version)
            out[v.reference] = (mv.description, dict(mv.tags))
    return out


def first_line(description: str) -> str:
    return description.split("\n", 1)[0]


def test_every_description_starts_plain_and_every_link_resolves(story):
    svc, spec, cycles, _back = story
    client, versions = svc.registry.client, described(svc, spec.family)
    assert (
        len(versions) == 3 + 5 + 3 + 4 + 3
    )  # bases; ft v1, v2 + baseline, v3 + baseline; Δ v1-v3; merged v2, v3, backport, composed; LoRA v1-v3
    links = 0
    for ref, (text, _) in versions.items():
        head = first_line(text)
        assert head and not re.search(r"[\[\]*`#]", head), f"{ref}: {head!r}"
        for name, version in VERSION_LINK.findall(text):
            assert client.get_model_version(name, version).version == version
            links += 1
        for experiment, run_id in RUN_LINK.findall(text):
            assert client.get_run(run_id).info.experiment_id == experiment
            links += 1
        assert not re.search(r"\]\(#/(?!models/|experiments/)", text), (
            f"{ref}: an in-app link of another kind"
        )
    assert links >= 3 * len(versions)
    ft2 = versions[cycles["v2"].registered["ft"]][0]
    for related in (cycles["v2"].registered["merged"], cycles["v1"].registered["diff"], cycles["v2"].registered["base"]):  # fmt: skip
        assert f"[{related}](#/models/" in ft2, f"the v2 fine-tune does not link to {related}"


def test_a_delta_links_forward_to_the_cycles_and_backport_that_used_it(story):
    svc, spec, cycles, back = story
    versions = described(svc, spec.family)
    d1, d2 = cycles["v1"].registered["diff"], cycles["v2"].registered["diff"]
    used_by = lambda ref: versions[ref][0].split("**Used by**", 1)[1]  # noqa: E731
    for later in (cycles["v2"].registered["merged"], cycles["v2"].registered["ft"], d2):
        assert f"[{later}]" in used_by(d1)
    assert back.diff == d2  # v3 was refused: next-diff stayed on v2's Δ
    for later in (cycles["v3"].registered["merged"], back.registered):
        assert f"[{later}]" in used_by(d2)
    assert "backport onto release v1" in used_by(d2)
    users = used_by(cycles["v3"].registered["diff"]).split("**Facts**")[0].strip().splitlines()
    assert len(users) == 1 and "its LoRA adapter form" in users[0]  # no cycle or backport used it (yet)


def test_a_delta_and_its_adapter_link_each_other_and_a_composition_links_every_delta(story):
    """Issue 20: the adapter form of each cycle's Δ, and a backport composing two Δs."""
    svc, spec, cycles, _back = story
    versions = described(svc, spec.family)
    for v in ("v1", "v2", "v3"):
        diff, lora = cycles[v].registered["diff"], cycles[v].registered["lora"]
        lora_page, diff_page = versions[lora][0], versions[diff][0]
        assert (
            first_line(lora_page).startswith("LoRA adapter for ")
            and f"low-rank form of Δ {diff}" in lora_page
        )
        assert f"[{diff}](#/models/" in lora_page and f"[{lora}](#/models/" in diff_page  # both ways
        assert "its LoRA adapter form" in diff_page.split("**Used by**", 1)[1]
    composed = versions[cycles["composed"].registered][0]
    d1, d2 = cycles["v1"].registered["diff"], cycles["v2"].registered["diff"]
    assert f"Δs 1·{d2} + 0.5·{d1}" in first_line(composed)
    assert f"[{d2}](#/models/" in composed and f"[{d1}](#/models/" in composed and "(α 0.5)" in composed


def test_a_base_links_forward_to_everything_built_on_it(story):
    """Issue 19 item 12: from a base's page a person reaches its Δ, fine-tunes, merged start and backport."""
    svc, spec, cycles, back = story
    versions = described(svc, spec.family)
    used_by = lambda ref: versions[ref][0].split("**Used by**", 1)[1]  # noqa: E731
    v1, v2 = cycles["v1"].registered, cycles["v2"].registered
    for built in (v1["ft"], v1["diff"], back.registered):
        assert f"[{built}]" in used_by(v1["base"])
    for built in (v2["merged"], v2["ft"], v2["diff"], v2["baseline"]):
        assert f"[{built}]" in used_by(v2["base"])
    assert f"[{v2['ft']}]" not in used_by(v1["base"])  # only what was built on that release
    assert "the Δ extracted on it" in used_by(v2["base"]) and "backport" in used_by(v1["base"])


def test_the_models_list_shows_the_champion_first(story):
    """MLflow's models list shows one alias per model: it sorts the aliases by version, reverses, and
    shows the first (so among one version's aliases, the last in the server's order)."""
    svc, spec, cycles, _back = story
    (model,) = svc.registry.client.search_registered_models(f"name = '{spec.family}-inst-ft'")
    in_server_order = list(model.aliases.items())
    shown = next(reversed(sorted(in_server_order, key=lambda a: int(a[1]))))
    assert shown == ("champion", cycles["v2"].registered["ft"].rsplit("/", 1)[1]), in_server_order
    assert {"approved-v1", "approved-v2"} <= set(model.aliases) and "approved-v3" not in model.aliases


def test_one_run_per_cycle_with_its_steps_nested_and_the_finetune_pointing_at_its_training_run(story):
    svc, spec, cycles, _back = story
    client = svc.registry.client
    exp = client.get_experiment_by_name(svc.settings.experiment)
    assert EXPERIMENT_KIND.items() <= exp.tags.items()
    run = client.get_run(cycles["v2"].run_id)
    assert run.info.run_name == f"cycle {spec.family}-inst@v2"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    names = {c.info.run_name: c for c in children}
    d1 = cycles["v1"].registered["diff"]
    expected = {"evaluate base v2", f"apply Δ {d1} to base v2", "evaluate merged v2", "finetune v2 from M+Δ",
                "evaluate ft v2", "finetune v2 from base (baseline)", "evaluate ft-from-base v2"}  # fmt: skip
    assert expected <= set(names), sorted(names)
    assert any(n.startswith("extract Δ v2") for n in names)
    assert all(c.info.status == "FINISHED" for c in children)
    ft = client.get_model_version(*cycles["v2"].registered["ft"].split("/"))
    assert ft.run_id == names["finetune v2 from M+Δ"].info.run_id
    baseline = client.get_model_version(*cycles["v2"].registered["baseline"].split("/"))
    assert baseline.run_id == names["finetune v2 from base (baseline)"].info.run_id
    for kind in ("merged", "diff"):
        assert client.get_model_version(*cycles["v2"].registered[kind].split("/")).run_id == run.info.run_id
    # re-running the finished cycle resumes nothing and duplicates nothing
    again = run_cycle("v2", str(svc.settings.home.parent / "releases"), spec, services=svc)
    assert again.status == "already-complete"
    assert (
        len(client.search_runs([exp.experiment_id], f"tags.`recycler.cycle` LIKE '{spec.family}/inst/v2@%'"))
        == 1
    )


def test_the_gate_decision_is_on_the_run_and_on_the_candidate(story):
    svc, spec, cycles, _back = story
    client, versions = svc.registry.client, described(svc, spec.family)
    promoted, refused = client.get_run(cycles["v2"].run_id), client.get_run(cycles["v3"].run_id)
    assert promoted.data.tags["gate"] == "promoted"
    assert refused.data.tags["gate"].startswith("refused: ")
    assert "**Gate: promoted**" in promoted.data.tags["mlflow.note.content"]
    assert "**Gate: refused, champion kept**" in refused.data.tags["mlflow.note.content"]
    assert "refused, champion kept" in first_line(versions[cycles["v3"].registered["ft"]][0])
    assert "promoted to champion" in first_line(versions[cycles["v2"].registered["ft"]][0])
    baseline = first_line(versions[cycles["v2"].registered["baseline"]][0])
    assert baseline.startswith("Baseline FT(M)")
    note = promoted.data.tags["mlflow.note.content"]
    assert "| M + Δ, no training | 40.0% |" in note and "| FT(M): the baseline" in note
    artifacts = {a.path for a in client.list_artifacts(promoted.info.run_id)}
    assert {"comparison.png", "lineage.png", "lineage.md", "savings.png"} <= artifacts


def test_a_backport_has_its_run_and_its_version_points_at_it(story):
    svc, spec, _cycles, back = story
    client = svc.registry.client
    merged = client.get_model_version(*back.registered.split("/"))
    assert merged.run_id == back.run_id
    run = client.get_run(back.run_id)
    assert run.info.run_name == f"backport {back.diff} → v1"
    assert run.data.tags["recycler.transfer"].startswith("backport/")
    assert run.data.params["alpha"] == "1.0" and run.data.params["diff"] == back.diff
    assert run.data.metrics["accuracy_merged"] == pytest.approx(0.3)
    assert "**Backport**" in run.data.tags["mlflow.note.content"]
    assert first_line(merged.description).startswith(f"Backport: Δ {back.diff} (from release v2) added to")
    again = run_transfer("backport", back.diff, "v1", TransferRequest.of(spec), services=svc)
    assert (again.run_id, again.registered) == (back.run_id, back.registered)


# ---- redaction: strict for credentials, not for parameters that merely mention tokens --------------------


@pytest.mark.parametrize(
    "key",
    ["eval_max_new_tokens", "max_new_tokens", "pad_token", "eos_token_id", "tokenizer", "num_tokens",
     "tokens_per_s", "finetune.max_seq_length", "secretary_count", "password_min_length"],
)  # fmt: skip
def test_ordinary_parameters_are_not_secrets(key):
    assert not key_is_secret(key)
    assert scrub({key: "64"}) == {key: "64"}


@pytest.mark.parametrize(
    "key",
    ["hf_token", "HF_TOKEN", "api_key", "apiKey", "aws_secret_access_key", "db.password", "clientSecret",
     "MLFLOW_TRACKING_TOKEN", "access_token", "PREFECT_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "token"],
)  # fmt: skip
def test_credential_names_are_secrets(key):
    assert key_is_secret(key)
    assert scrub({key: "anything"}) == {key: "***"}


@pytest.mark.parametrize(
    "value",
    ["AKIAIOSFODNN7EXAMPLE", "hf_" + "a1B2" * 9, "ghp_" + "x" * 36, "sk-" + "A" * 32,
     "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"],
)  # fmt: skip
def test_values_shaped_like_credentials_are_scrubbed_anywhere(value):
    text = f"note {value} end"
    assert value not in redact(text) and redact(text).startswith("note ") and redact(text).endswith(" end")
    assert value not in scrub({"note": text})["note"]


def test_the_working_directory_is_not_a_secret(monkeypatch, tmp_path):
    """Issue 19 item 11: `make demo` from a checkout showed every artifact as `***/out/demo/…`: PWD
    matched the secret noun `pwd`. Paths stay readable; a real credential variable is still scrubbed."""
    from recycler.registry.describe import describe

    checkout = tmp_path / "checkout"
    (checkout / "out" / "demo").mkdir(parents=True)
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("PWD", str(checkout))
    monkeypatch.setenv("OLDPWD", str(tmp_path))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(checkout))  # a path to a key, not a key
    monkeypatch.setenv("DB_PWD", "hunter2-hunter2")
    artifact = f"{checkout}/out/demo/.recycler/artifacts/diff/abc"
    text = describe(
        "toy-inst-diff", {"kind": "diff", "artifact_uri": artifact, "note": "hunter2-hunter2"}, version="1"
    )
    assert f"`{artifact}`" in text and "***" not in text
    assert scrub({"path": artifact, "x": "pw hunter2-hunter2"}) == {"path": artifact, "x": "pw ***"}


def test_a_cycle_run_from_a_checkout_shows_its_artifact_paths(tiny_releases, tmp_path, monkeypatch):
    """Issue 19 item 11 end to end: a cycle run from a known directory with the default local settings
    (artifacts under ./.recycler, as `make demo` from a checkout) registers versions whose
    descriptions show the artifact path, not `***/…`."""
    from recycler.store.local import LocalStore

    checkout = tmp_path / "checkout"
    releases = checkout / "releases"
    releases.mkdir(parents=True)
    shutil.copytree(tiny_releases["v1"], releases / "v1", copy_function=os.link)
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("PWD", str(checkout))
    monkeypatch.setenv("RECYCLER_TRACK", "0")
    settings = Settings(home=checkout / ".recycler", tracking_uri="", registry_uri="", artifact_store="")
    scores = table({("v1", "ft"): 0.6})
    svc = Services(settings, LocalStore(Path(settings.artifact_store)), Registry(settings.tracking_uri),
                   FakeTrainer(scores), FakeScorer(scores))  # fmt: skip
    spec = CycleSpec(family="pwd", variant="inst", train=tiny_releases["sample"],
                     evaluation={"task": tiny_releases["sample"]}, max_relative_norm=5.0)  # fmt: skip
    run_cycle("v1", str(releases), spec, services=svc)
    texts = [text for text, _ in described(svc, "pwd").values()]
    assert len(texts) == 3  # the base, the first fine-tune and its Δ
    for text in texts:
        assert "***" not in text and f"`{checkout}/.recycler/artifacts/" in text, text


def test_a_url_keeps_everything_but_its_password():
    assert redact("postgresql://mlflow:hunter2@db:5432/x") == "postgresql://mlflow:***@db:5432/x"
    assert redact("https://example.com/a:b@c") == "https://example.com/a:b@c"  # no user info: unchanged


def test_values_of_credential_variables_are_scrubbed(monkeypatch, caplog):
    from recycler.redact import install_redaction

    monkeypatch.setenv("MY_SERVICE_API_KEY", "plain-but-secret-value")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-and-long-enough")  # not a credential
    install_redaction()
    with caplog.at_level(logging.INFO):
        logging.getLogger("recycler.test").info("calling with %s", "plain-but-secret-value")
        logging.getLogger("recycler.test").info("parallelism %s", "false-and-long-enough")
    assert "plain-but-secret-value" not in caplog.text and "***" in caplog.text
    assert "false-and-long-enough" in caplog.text


def test_params_tags_notes_and_artifacts_reach_the_server_readable_and_without_secrets(
    mlflow_server, tmp_path
):
    from mlflow import MlflowClient

    from recycler.registry import runlog
    from recycler.registry.runs import tracked_run

    key = "AKIA" + "Z" * 16
    settings = Settings(home=tmp_path / "home", tracking_uri=mlflow_server.uri, experiment="t-redaction")
    params = {"eval_max_new_tokens": 64, "pad_token": "<pad>", "hf_token": "hf_x", "note": f"key={key}",
              "db": "postgresql://u:hunter2@db/x"}  # fmt: skip
    with tracked_run("r", params=params, tags={"source": f"s {key}"}, settings=settings, enabled=True) as run:
        run_id = run.info.run_id
        runlog.log_json_artifact({"config": {"creds": f"postgresql://u:hunter2@db/x {key}"}}, "config.json")
        runlog.set_note(run_id, f"uses {key}")
    client = MlflowClient(mlflow_server.uri)
    got = client.get_run(run_id).data
    assert got.params["eval_max_new_tokens"] == "64" and got.params["pad_token"] == "<pad>"
    assert got.params["hf_token"] == "***" and got.params["db"] == "postgresql://u:***@db/x"
    everything = json.dumps([got.params, got.tags])
    artifact = client.download_artifacts(run_id, "config.json", str(tmp_path))
    everything += Path(artifact).read_text()
    assert key not in everything and "hunter2" not in everything


def test_the_printed_mlflow_ui_command_survives_any_shell():
    import shlex

    from recycler_flows.demo import ui_command

    cmd = ui_command("sqlite:////tmp/my demo/.recycler/mlflow.db?timeout=60")
    assert "?" not in cmd  # zsh would glob it ("no matches found")
    assert shlex.split(cmd) == ["mlflow", "ui", "--backend-store-uri", "sqlite:////tmp/my demo/.recycler/mlflow.db",
                                "--port", "5000"]  # fmt: skip
    assert ui_command("http://mlflow:5000") is None  # a tracking server serves its own UI


def test_secret_values_survive_a_variable_deleted_while_they_are_read(monkeypatch):
    """MLflow's telemetry thread deletes `_MLFLOW_TELEMETRY_SESSION_ID` while runs start; reading the
    environment's items at that moment raised KeyError and failed a fine-tune (seen in the demo)."""
    import os

    from recycler import redact

    monkeypatch.setenv("RECYCLER_TEST_API_KEY", "sk-live-0123456789abcdef")
    monkeypatch.setenv("RECYCLER_TEST_VANISHING_TOKEN", "short-lived-token-value")
    real_getitem = type(os.environ).__getitem__

    def vanish(self, key):  # the other thread wins the race for this one variable
        if key == "RECYCLER_TEST_VANISHING_TOKEN":
            raise KeyError(key)
        return real_getitem(self, key)

    def get(self, key, default=None):
        try:
            return vanish(self, key)
        except KeyError:
            return default

    monkeypatch.setattr(type(os.environ), "__getitem__", vanish)
    monkeypatch.setattr(type(os.environ), "get", get)
    values = redact.secret_values()
    assert "sk-live-0123456789abcdef" in values
    assert "short-lived-token-value" not in values
