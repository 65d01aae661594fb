"""Shared fixtures: tiny Llama-style checkpoints built locally (no hub), in several layouts and dtypes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from recycler.service.spec import CycleSpec
from recycler.settings import Settings
from recycler.toy.tiny import build_tiny_model, perturb_model

pytest_plugins = ["servers"]  # session fixtures with real servers: moto_s3, mlflow_server, postgres, …

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder, read independently of recycler (safetensors' own loader)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(folder / f))
    return state


def finetune64(
    src: Path, out: Path, *, seed: int, scale: float = 0.05, dtype: torch.dtype | None = None
) -> Path:
    """A 'fine-tune' of `src` drawn in float64 and rounded once (as training produces m′), with the
    hard cases planted in every tensor: sign flips, changes by more than 2×, subnormals, ±0 and values
    far apart. `perturb_model` adds noise in the checkpoint's own dtype, so m′ − m is exact there and
    a float32 round trip can never fail on it. `dtype` converts the copy (e.g. bf16 → fp16)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, out)
    g = torch.Generator().manual_seed(seed)
    for shard in sorted(out.glob("*.safetensors")):
        state = load_file(shard)
        new = {}
        for k, v in state.items():
            x = v.double().reshape(-1)
            y = x + torch.randn(x.shape, generator=g, dtype=torch.float64) * scale * x.abs().mean().clamp_min(
                1e-3
            )
            if len(y) >= 8:  # sign flip, ×3, subnormal, −0 from a value, far apart both ways, −2×, +0
                s = x.abs().mean().item() or 1e-3
                x0 = [x[i].item() or s for i in range(8)]
                y[:8] = torch.tensor(
                    [-0.5 * x0[0], 3 * x0[1], 1e-40, -0.0, s * 2.0**-24, x0[5] * 2.0**-20, -2 * x0[6], 0.0],
                    dtype=torch.float64,
                )
            dt = dtype or v.dtype
            new[k] = y.to(dt).reshape(v.shape)
        save_file(new, str(shard), metadata={"format": "pt"})
    if dtype is not None and (out / "config.json").exists():
        import json as _json

        cfg = _json.loads((out / "config.json").read_text())
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        (out / "config.json").write_text(_json.dumps(cfg))
    return out


def load_delta32(folder: Path) -> dict[str, torch.Tensor]:
    """A Δ artifact as float32 tensors, decoded independently of recycler: the stored values (safetensors'
    own loader), widened, with the residual's exceptions (`residual/*.safetensors`) scattered in."""
    folder = Path(folder)
    state = {k: v.float() for k, v in load_state(folder).items()}
    for f in sorted((folder / "residual").glob("*.safetensors")):
        r = load_file(f)
        for key, idx in r.items():
            if key.endswith(".__exc_idx"):
                name = key.removesuffix(".__exc_idx")
                state[name].view(-1)[idx.long()] = r[f"{name}.__exc_val"]
    return state


def grow_vocab(src: Path, out: Path, new_tokens: list[str], *, seed: int = 7) -> Path:
    """A 'newer base' whose tokenizer appends tokens (and embedding rows), lightly perturbed."""
    model = LlamaForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(new_tokens)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(out, max_shard_size="25KB")
    tok.save_pretrained(out)
    tmp = out.parent / f"{out.name}-unperturbed"
    out.rename(tmp)
    perturb_model(tmp, out, scale=0.05, seed=seed, max_shard_size="25KB")
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """m_s (bf16, 3 shards), m′_s (fine-tune, other shard layout), m_t (next version, single file), and variants."""
    root = tmp_path_factory.mktemp("models")
    m: dict[str, Path] = {}
    m["base"] = build_tiny_model(root / "base", dtype=torch.bfloat16, max_shard_size="20KB")
    m["tuned"] = perturb_model(m["base"], root / "tuned", scale=0.02, seed=1, max_shard_size="32KB")
    m["target"] = perturb_model(m["base"], root / "target", scale=0.1, seed=2)
    m["base32"] = build_tiny_model(root / "base32", dtype=torch.float32, seed=3, max_shard_size="40KB")
    m["tuned32"] = perturb_model(m["base32"], root / "tuned32", scale=0.02, seed=4)
    m["tied"] = build_tiny_model(root / "tied", dtype=torch.bfloat16, tie=True, seed=5)
    m["tied_tuned"] = perturb_model(m["tied"], root / "tied_tuned", scale=0.02, seed=6)
    m["grown"] = grow_vocab(m["base"], root / "grown", ["<tool>", "<think>", "§"])
    m["unrelated"] = build_tiny_model(root / "unrelated", dtype=torch.bfloat16, seed=99)
    # Fine-tunes drawn in float64 and rounded once, with hard cases (see finetune64)
    m["tuned64"] = finetune64(m["base"], root / "tuned64", seed=11)
    m["tuned32_64"] = finetune64(m["base32"], root / "tuned32_64", seed=12)
    m["base16"] = finetune64(m["base"], root / "base16", seed=13, scale=0.0, dtype=torch.float16)
    m["tuned16_64"] = finetune64(m["base16"], root / "tuned16_64", seed=14)
    return m


@pytest.fixture(scope="session")
def delta(models, tmp_path_factory) -> Path:
    """Δ = tuned − base (float32), shared by read-only tests."""
    from recycler.stages.extract import diff_checkpoints

    out = tmp_path_factory.mktemp("deltas") / "delta"
    diff_checkpoints(models["base"], models["tuned"], out, max_shard_bytes=40_000)
    return out


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("toy-cache")


@pytest.fixture(scope="session")
def fast_family(toy_cache):
    """The fast toy family (v1…v5, task data), built once per session for the toy and flow tests."""
    from recycler.toy import build_toy_family

    return build_toy_family(toy_cache, fast=True, seed=0)


# Tests that use one of these talk to a real server started for them: the `integration` tier, left out
# of `make test-fast` (pytest -m "not integration and not slow").
SERVER_FIXTURES = {
    "moto_s3",
    "mlflow_server",
    "postgres",
    "mlflow_pg_server",
    "prefect_api",
    "prefect_server",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter) -> None:
    """The reliability figures (RELIABILITY.md §c) for the cases that ran in this session."""
    from reliability import LEDGER

    if line := LEDGER.summary():
        terminalreporter.write_sep("=", "reliability")
        terminalreporter.write_line(line)
        missing = sorted(set(LEDGER.cases) - LEDGER.confirmed)
        if missing:
            terminalreporter.write_line(f"not confirmed: {', '.join(missing)}")


@pytest.fixture(scope="session")
def tiny_releases(tmp_path_factory) -> dict[str, Path]:
    """Three close base versions of a tiny Llama (each the previous one, perturbed) and task files."""
    root = tmp_path_factory.mktemp("tiny-releases")
    v1 = build_tiny_model(root / "src" / "v1", dtype=torch.float32, seed=11)
    v2 = perturb_model(v1, root / "src" / "v2", scale=0.05, seed=12)
    v3 = perturb_model(v2, root / "src" / "v3", scale=0.05, seed=13)
    sample = root / "sample.jsonl"
    sample.write_text(
        "".join(json.dumps({"prompt": f"{a}+{a}?", "response": str(2 * a)}) + "\n" for a in range(8))
    )
    return {"v1": v1, "v2": v2, "v3": v3, "sample": sample}


@pytest.fixture
def world(tiny_releases, tmp_path, monkeypatch):
    """A release folder (versions appear as they are published), settings and a spec factory."""
    monkeypatch.setenv("RECYCLER_TRACK", "0")
    releases = tmp_path / "releases"
    releases.mkdir()
    settings = Settings(home=tmp_path / "home", tracking_uri="", registry_uri="", artifact_store="")

    def publish(*versions: str) -> None:
        for v in versions:
            shutil.copytree(tiny_releases[v], releases / v, copy_function=os.link)

    def spec(**kw) -> CycleSpec:
        base = {
            "family": "fam",
            "variant": "inst",
            "train": tiny_releases["sample"],
            "evaluation": {"task": tiny_releases["sample"]},
        }
        return CycleSpec(**{**base, "max_relative_norm": 5.0, **kw})

    return releases, settings, publish, spec
