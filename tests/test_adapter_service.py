"""The service speaks adapters: a cycle publishes its Δ as a LoRA adapter next to it, and a backport
or recycle can output an adapter for the target base (issue 20, item 4). Fake trainer and scorer
(tests/fakes.py); the Δ, the SVD, the adapter, its publication and registration are real."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_state
from fakes import services

from recycler import crashpoints
from recycler.errors import InvalidConfig
from recycler.io.checkpoint import open_checkpoint
from recycler.io.manifest import read_manifest
from recycler.io.reader import ChunkReader
from recycler.service.cycle import run_cycle
from recycler.service.transfer import TransferRequest, run_transfer
from recycler.stages.sources import adapter_delta, stored_delta

SCORES = {
    ("v1", "ft"): 0.6,
    ("v1", "lora"): 0.55,
    ("v2", "merged"): 0.4,
    ("v2", "ft"): 0.7,
    ("v2", "lora"): 0.66,
}


class Crash(BaseException):
    """A crash at a crash point (nothing after it runs; no `except Exception` records it)."""


@pytest.fixture(autouse=True)
def _no_hook():
    yield
    crashpoints.set_hook(None)


def crash_once(point: str):
    left = [1]

    def hook(name: str) -> None:
        if name == point and left[0]:
            left[0] = 0
            raise Crash(point)

    return hook


def full(source, shape) -> np.ndarray:
    """A Δ source's tensor as float64 (the adapter's or the stored Δ's)."""
    out = np.empty(int(np.prod(shape)), np.float32)
    source.read_f32(0, len(out), out)
    return out.astype(np.float64).reshape(shape)


def test_cycle_publishes_its_delta_as_an_adapter_linked_both_ways_and_scored(world, tmp_path):
    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, SCORES)
    s = spec(adapter={"rank": 2})
    first = run_cycle("v1", str(releases), s, services=svc)
    out = run_cycle("v2", str(releases), s, services=svc)
    for result, version, score in ((first, "v1", 0.55), (out, "v2", 0.66)):
        lora = svc.registry.resolve(result.registered["lora"])
        diff = svc.registry.resolve(result.registered["diff"])
        assert lora.kind == "lora" and lora.name == "fam-inst-lora" and lora.tags["base_version"] == version
        assert lora.tags["source_diff"] == diff.reference and diff.tags["adapter"] == lora.reference
        assert lora.tags["lora_ranks"] == "rank 2" and 0 < float(lora.tags["lora_error"]) < 1
        assert lora.score() == score and result.scores["lora"] == score  # scored next to the Δ
        assert lora.fingerprint and lora.fingerprint == diff.fingerprint
        assert "LoRA adapter" in svc.registry.call(svc.registry.client.get_model_version, diff.name, diff.version).description  # fmt: skip
    # the registered artifact is a PEFT adapter for v2 whose B·A is the best rank-2 form of Δ_2
    got = svc.store.fetch(lora.artifact, tmp_path / "fetched")
    body, _ = read_manifest(got)
    assert body["kind"] == "adapter" and body["ranks"] == {
        "min": 2,
        "max": 2,
        "modules": body["ranks"]["modules"],
    }
    base = settings.home / "work" / "fam" / "inst" / "v2" / "base"
    from_adapter, exact = adapter_delta(got, base), stored_delta(settings.home / "work" / "fam" / "inst" / "v2" / "delta")  # fmt: skip
    chunks = ChunkReader()
    checked = 0
    try:
        a_open, d_open = from_adapter.open(chunks), exact.open(chunks)
        for name, e in from_adapter.side.tensors.items():
            if len(e.shape) != 2:
                continue
            ba, d = full(a_open(name), e.shape), full(d_open(name), e.shape)
            s_ = np.linalg.svd(d, compute_uv=False)
            optimum = np.sqrt((s_[2:] ** 2).sum())  # Eckart–Young: the best rank-2 error
            assert np.linalg.norm(d - ba) <= optimum * (1 + 1e-3) + 1e-7, name
            checked += 1
    finally:
        chunks.close()
    assert checked >= 4


def test_a_crash_before_the_adapter_or_its_link_leaves_one_version_after_the_rerun(world):
    releases, settings, publish, spec = world
    publish("v1")
    svc = services(settings, SCORES)
    s = spec(adapter={"energy": 0.9})
    for point in ("cycle:registered-diff", "adapter:registered"):
        crashpoints.set_hook(crash_once(point))
        with pytest.raises(Crash):
            run_cycle("v1", str(releases), s, services=svc, wait=0)
        crashpoints.set_hook(None)
    out = run_cycle("v1", str(releases), s, services=svc, wait=0)
    (lora,) = svc.registry.versions("lora", "fam", "inst")
    diff = svc.registry.resolve(out.registered["diff"])
    assert diff.tags["adapter"] == lora.reference and lora.tags["lora_ranks"].startswith("energy 0.9: ")
    assert len(svc.registry.versions("diff", "fam", "inst")) == 1


def test_backport_can_output_an_adapter_for_the_target_base(world, tmp_path):
    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, {**SCORES, ("v1", "backport"): 0.5})
    run_cycle("v1", str(releases), spec(), services=svc)
    run_cycle("v2", str(releases), spec(), services=svc)
    request = TransferRequest.of(spec(), output="adapter", adapter={"rank": 3}, alpha=0.5)
    out = run_transfer("backport", "fam-inst-diff@next-diff", "v1", request, services=svc)
    lora = svc.registry.resolve(out.registered)
    diff = svc.registry.resolve("fam-inst-diff@next-diff")
    assert (out.output, lora.kind, lora.tags["base_version"]) == ("adapter", "lora", "v1")
    assert lora.tags["source_diff"] == diff.reference and lora.tags["transfer"] == "backport"
    assert lora.tags["diff_base_version"] == "v2" and "adapter" not in diff.tags  # another base's form
    assert out.scores == {"base": 0.0, "merged": 0.5} and lora.score() == 0.5
    got = svc.store.fetch(lora.artifact, tmp_path / "fetched")
    body, _ = read_manifest(got)
    assert body["method"] == {"rank": 3, "scale": 0.5}
    # the adapter fits v1's shapes and its B·A is the best rank-3 form of 0.5·Δ
    v1 = open_checkpoint(settings.home / "work" / "fam" / "inst" / "v1" / "base")
    a, d = adapter_delta(got, v1.path), stored_delta(svc.store.fetch(diff.artifact, tmp_path / "d"))
    chunks = ChunkReader()
    try:
        for name, e in a.side.tensors.items():
            ba, half = full(a.open(chunks)(name), e.shape), 0.5 * full(d.open(chunks)(name), e.shape)
            s_ = np.linalg.svd(half, compute_uv=False)
            assert np.linalg.norm(half - ba) <= np.sqrt((s_[3:] ** 2).sum()) * (1 + 1e-3) + 1e-7, name
    finally:
        chunks.close()
    again = run_transfer("backport", "fam-inst-diff@next-diff", "v1", request, services=svc)
    assert again.registered == out.registered and len(svc.registry.versions("lora", "fam", "inst")) == 1
    merged = run_transfer(
        "backport", "fam-inst-diff@next-diff", "v1", TransferRequest.of(spec()), services=svc
    )
    assert svc.registry.resolve(merged.registered).kind == "merged"  # the default output is unchanged


def test_an_adapter_output_needs_a_rank_or_an_energy(world):
    _, _, _, spec = world
    with pytest.raises(InvalidConfig, match="rank or energy"):
        TransferRequest.of(spec(), output="adapter")
    assert TransferRequest.of(spec(adapter={"rank": 4}), output="adapter").adapter.rank == 4
    with pytest.raises(ValueError, match="exactly one of rank and energy"):
        spec(adapter={"rank": 4, "energy": 0.9})


def peft_adapter(base, out, seed: int = 0):
    """A PEFT LoRA adapter on `base` with non-zero B (as after training)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    pm = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    pm.save_pretrained(out)
    return out


def tensors(folder) -> dict[str, np.ndarray]:
    return {n: t.numpy() for n, t in load_state(folder).items()}


@pytest.mark.parametrize("kind", ["adapter", "checkpoint"])
def test_the_first_cycle_adopts_an_existing_fine_tune_and_the_next_recycles_its_delta(world, tiny_releases, tmp_path, kind):  # fmt: skip
    from recycler.toy.tiny import perturb_model

    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, SCORES)
    if kind == "adapter":
        existing = peft_adapter(tiny_releases["v1"], tmp_path / "my-adapter")
    else:
        existing = perturb_model(tiny_releases["v1"], tmp_path / "my-ft", scale=0.01, seed=5)
    s = spec(initial_finetune=existing)
    first = run_cycle("v1", str(releases), s, services=svc)
    assert svc.trainer.calls == []  # adopted, not trained
    ft = svc.registry.resolve(first.registered["ft"])
    assert ft.tags["role"] == "adopted" and first.scores["ft"] == 0.6
    adopted = tensors(svc.store.fetch(ft.artifact, tmp_path / "ft"))
    base = tensors(tiny_releases["v1"])
    if kind == "checkpoint":  # the fine-tune itself, bit for bit
        theirs = tensors(existing)
        assert all(np.array_equal(adopted[n], theirs[n]) for n in theirs)
    else:  # M_1 + scale·B·A, and only the adapted modules moved
        moved = {n for n in base if not np.array_equal(adopted[n], base[n])}
        assert moved and all(("q_proj" in n or "v_proj" in n) for n in moved)
    second = run_cycle("v2", str(releases), s, services=svc)  # the next release recycles its Δ
    assert second.parent_diff == first.registered["diff"] and svc.trainer.calls[-1][0].name == "merged"


def test_cli_backport_adapter_output_asks_for_its_rank_before_any_work(tiny_releases):
    import subprocess
    import sys

    args = [
        "backport",
        "fam-inst-diff@next-diff",
        "v1",
        "--family",
        "fam",
        "--task",
        str(tiny_releases["sample"]),
    ]
    cli = [sys.executable, "-m", "recycler.cli"]
    r = subprocess.run([*cli, *args, "--output", "adapter"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "rank or energy" in r.stderr, r.stderr
    r = subprocess.run([*cli, *args, "--rank", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--output adapter" in r.stderr, r.stderr


def test_a_backport_composes_several_deltas_and_records_each_with_its_alpha(world, tmp_path):
    """base + α·Δ_a + Σ α_i·Δ_i through the service: bit for bit the float32 sum in order, rounded
    once; every Δ and its α in the lineage; keyed by every input."""
    from recycler.service.composition import ComposedPart

    releases, settings, publish, spec = world
    publish("v1", "v2")
    svc = services(settings, {**SCORES, ("v1", "backport"): 0.5})
    first = run_cycle("v1", str(releases), spec(), services=svc)
    second = run_cycle("v2", str(releases), spec(), services=svc)
    a, b = second.registered["diff"], first.registered["diff"]
    request = TransferRequest.of(spec(), alpha=1.0, add=(ComposedPart(diff=b, alpha=-0.5),))
    out = run_transfer("backport", a, "v1", request, services=svc)
    merged = svc.registry.resolve(out.registered)
    assert merged.tags["composed_of"] == f"{a}×1; {b}×-0.5" and merged.tags["parent_diff"] == a
    page = svc.registry.call(svc.registry.client.get_model_version, merged.name, merged.version).description
    assert f"Δs 1·{a} + -0.5·{b}" in page and "Δ also added" in page
    # the weights: float32(target) + (1·d_a + float32(-0.5)·d_b), summed in float32 in that order
    got = tensors(svc.store.fetch(merged.artifact, tmp_path / "m"))
    target = tensors(settings.home / "work" / "fam" / "inst" / "v1" / "base-fetched")
    da, db = (stored_delta(svc.store.fetch(svc.registry.resolve(r).artifact, tmp_path / r.replace("/", "-"))) for r in (a, b))  # fmt: skip
    chunks = ChunkReader()
    try:
        for name, t in target.items():
            if name not in da.side.tensors:
                assert np.array_equal(got[name], t), name
                continue
            shape = t.shape
            s = full(da.open(chunks)(name), shape).astype(np.float32)
            s = s + np.float32(-0.5) * full(db.open(chunks)(name), shape).astype(np.float32)
            assert np.array_equal(got[name], t.astype(np.float32) + s), name
    finally:
        chunks.close()
    assert run_transfer("backport", a, "v1", request, services=svc).registered == out.registered
    other = TransferRequest.of(spec(), add=(ComposedPart(diff=b, alpha=-0.25),))
    assert run_transfer("backport", a, "v1", other, services=svc).registered != out.registered
    with pytest.raises(InvalidConfig, match="one Δ"):
        TransferRequest.of(spec(), output="adapter", adapter={"rank": 2}, add=(ComposedPart(diff=b),))
    assert ComposedPart.parse("fam-inst-diff/2=0.5") == ComposedPart(diff="fam-inst-diff/2", alpha=0.5)
    with pytest.raises(ValueError, match="NAME/VERSION"):
        ComposedPart.parse("fam-inst-diff/2=half")


def test_a_cycle_fine_tunes_with_lora_and_recycles_the_exact_merged_delta(world, tiny_releases, tmp_path):
    """`finetune.method: lora` in a spec, with the real trainer (PEFT, a few steps on the tiny model):
    the fine-tune published is the merged model (its adapter beside it), Δ^iter is extracted from it
    exactly, and the next release starts from M_2 + that Δ."""
    from recycler.registry.client import Registry
    from recycler.service.services import InProcessTrainer, Services
    from recycler.store import open_store

    releases, settings, publish, spec = world
    publish("v1", "v2")
    fake = services(settings, SCORES)
    svc = Services(
        settings,
        open_store(settings),
        Registry(settings.tracking_uri),
        InProcessTrainer(settings),
        fake.scorer,
    )
    ft = {"method": "lora", "lora_r": 2, "lora_alpha": 4, "lora_target_modules": ["q_proj", "v_proj"],
          "max_steps": 3, "batch_size": 2, "micro_batch_size": 2, "learning_rate": 1e-2, "save_every": None,
          "eval_every": None}  # fmt: skip
    s = spec(finetune=ft)
    first = run_cycle("v1", str(releases), s, services=svc)
    work = settings.home / "work" / "fam" / "inst" / "v1"
    assert (work / "ft" / "adapter" / "adapter_config.json").is_file()
    base, tuned = tensors(work / "base"), tensors(work / "ft")
    moved = {n for n in base if not np.array_equal(base[n], tuned[n])}
    assert moved and all("q_proj" in n or "v_proj" in n for n in moved)  # only the LoRA targets changed
    d = stored_delta(work / "delta")
    chunks = ChunkReader()
    try:  # Δ^iter = M*_1 − M_1 exactly: base + Δ rounds back to the merged fine-tune
        for name in moved:
            delta = full(d.open(chunks)(name), base[name].shape).astype(np.float32)
            assert np.array_equal(base[name] + delta, tuned[name]), name
    finally:
        chunks.close()
    second = run_cycle("v2", str(releases), s, services=svc)
    assert second.parent_diff == first.registered["diff"] and second.mode == "iterative"
