"""Δs compose: `recycler apply TARGET Δ1 Δ2 …` against an independent float32 oracle, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_delta32, load_state
from test_adapters import cli, make_adapter, oracle

from recycler.stages.compose import alpha_for, parse_rule
from recycler.stages.extract import diff_checkpoints


def test_rules_parse_and_select():
    rules = [parse_rule(t, 2) for t in ("mlp=0.5", "2:embed=0", "layers:1=2", "attention+layers:0-0=0.25")]
    assert alpha_for(0, "model.layers.0.mlp.up_proj.weight", 1.0, rules) == 0.5
    assert alpha_for(0, "model.layers.1.mlp.up_proj.weight", 1.0, rules) == 2.0  # the last match wins
    assert alpha_for(1, "model.embed_tokens.weight", 0.7, rules) == 0.0
    assert alpha_for(0, "model.embed_tokens.weight", 0.7, rules) == 0.7  # rule 2 is for Δ2 only
    assert alpha_for(0, "model.layers.0.self_attn.q_proj.weight", 1.0, rules) == 0.25
    assert alpha_for(0, "model.layers.12.self_attn.q_proj.weight", 1.0, rules) == 1.0
    for bad, msg in (
        ("mlp", "expected"),
        ("3:mlp=1", "2 Δ"),
        ("mlp=x", "not a number"),
        ("layers:a=1", "layers:A"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_rule(bad, 2)


def family_alpha(name: str, i: int) -> float:
    """The α the CLI call below gives Δ number i (0-based) on tensor `name`, written out by hand (later
    rules win)."""
    if i == 2 and ".layers.1." in name:
        return 0.0  # 3:layers:1=0
    if i == 1 and "embed_tokens" in name:
        return 0.0  # 2:embed=0
    if "mlp" in name:
        return 0.5  # mlp=0.5
    return (1.0, -0.75, 2.0)[i]


def test_compose_three_deltas_matches_float32_oracle(models, tmp_path):
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    diff_checkpoints(models["base"], models["tuned"], d1)  # bf16 store + residual
    diff_checkpoints(models["base"], models["tuned64"], d2, dtype="float32")
    adapter, _ = make_adapter(
        models["base32"], tmp_path, r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"]
    )
    out = tmp_path / "out"
    cli(
        "apply", models["target"], d1, d2, adapter, "-o", out,
        "--alpha", "1", "--alpha", "-0.75", "--alpha", "2",
        "--alpha-rule", "mlp=0.5", "--alpha-rule", "2:embed=0", "--alpha-rule", "3:layers:1=0",
    )  # fmt: skip
    target, got = load_state(models["target"]), load_state(out)
    deltas = [load_delta32(d1), load_delta32(d2), oracle(adapter)]
    assert got.keys() == target.keys()
    for name, t in target.items():
        parts = [(d[name], family_alpha(name, i)) for i, d in enumerate(deltas) if name in d]
        parts = [(d, a) for d, a in parts if a != 0.0]
        if not parts:
            assert torch.equal(got[name], t), name  # no Δ reaches it: the target's bits
            continue
        acc = parts[0][0] * torch.tensor(parts[0][1], dtype=torch.float32)
        for d, a in parts[1:]:
            acc = acc + d * torch.tensor(a, dtype=torch.float32)
        want = (t.float() + acc).to(t.dtype)
        assert torch.equal(got[name], want), name
    assert torch.equal(
        got["model.embed_tokens.weight"],
        (target["model.embed_tokens.weight"].float() + deltas[0]["model.embed_tokens.weight"]).to(
            torch.bfloat16
        ),
    )
    m = json.loads((out / "manifest.json").read_text())
    listed = m["composition"]["deltas"]
    assert [e["alpha"] for e in listed] == [1.0, -0.75, 2.0] and m["alpha"] == [1.0, -0.75, 2.0]
    assert listed[1]["rules"] == ["mlp=0.5", "2:embed=0"] and listed[2]["rules"] == [
        "mlp=0.5",
        "3:layers:1=0",
    ]
    assert [e["source"]["kind"] for e in listed] == ["stored", "stored", "adapter"]
    report = json.loads((out / "compatibility.json").read_text())
    assert any(n.startswith("Δ3: applied Δ to 4 tensors") for n in report["notes"])


def test_one_delta_with_alpha_is_the_one_delta_apply(models, delta, tmp_path):
    """A single Δ through the composition path gives the one-Δ apply's bits (α ≠ 1: no round-trip fix)."""
    cli("apply", models["target"], delta, "-o", tmp_path / "plain", "--alpha", "0.5")
    cli(
        "apply",
        models["target"],
        delta,
        "-o",
        tmp_path / "composed",
        "--alpha",
        "0.5",
        "--alpha-rule",
        "nothing*=0",
    )
    a, b = load_state(tmp_path / "plain"), load_state(tmp_path / "composed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_alpha_count_must_match(models, delta, tmp_path):
    from typer.testing import CliRunner

    from recycler.cli.app import app

    r = CliRunner().invoke(
        app,
        [
            "apply",
            str(models["target"]),
            str(delta),
            str(delta),
            "-o",
            str(tmp_path / "o"),
            "-a",
            "1",
            "-a",
            "2",
            "-a",
            "3",
        ],
    )
    assert r.exit_code != 0 and "3 --alpha values for 2 Δs" in r.output
    assert not (tmp_path / "o").exists()
