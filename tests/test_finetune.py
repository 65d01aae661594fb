"""Fine-tuning: convergence, published output, pickle-free checkpoints, crash/resume fidelity, 2 processes, CLI."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from reliability import case, check_invariants
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from recycler.cli.train import main, register
from recycler.errors import (
    InvalidConfig,
    InvalidData,
    InvalidModelFolder,
    NonFiniteValues,
    OutputExists,
    ResumeError,
)
from recycler.stages.finetune import state as ts
from recycler.stages.finetune.config import FinetuneConfig, make_plan
from recycler.stages.finetune.output import RECORD
from recycler.stages.finetune.recipe import finetune
from recycler.stages.finetune.run import param_groups
from recycler.toy.tiny import build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # fp32 CPU; observed differences are 0 (same kernels, same order)

TRAIN = [
    {"prompt": f"{a}+{b}?", "response": f"{a + b}"}
    for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (7, 1), (4, 4), (9, 0)]
] + [{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]}]
# Resume scenarios: 8 steps of 4 examples (2 micro-batches of 2), checkpoints at steps 2, 4, 6.
RESUME_YAML = "learning_rate: 0.001\nbatch_size: 4\nmicro_batch_size: 2\nmax_steps: 8\nsave_every: 2\neval_every: null\nkeep_last_checkpoints: 3\n"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """A tiny base whose config asks for dropout 0.1 (training must force 0), data and a YAML config."""
    root = tmp_path_factory.mktemp("ft")
    base = build_tiny_model(root / "base", seed=5)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    (root / "resume.yaml").write_text(RESUME_YAML)
    return {
        "root": root,
        "base": base,
        "train": write_jsonl(root / "train.jsonl", TRAIN),
        "yaml": root / "resume.yaml",
    }


@pytest.fixture(scope="module")
def reference(work) -> dict:
    """The uninterrupted run every resumed run must reproduce."""
    return finetune(
        work["base"], work["train"], work["root"] / "reference", FinetuneConfig.from_yaml(work["yaml"])
    )


def run_cli(args: list[str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("RECYCLER_CRASH_AT", None)
    if crash_at:
        env["RECYCLER_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def finetune_args(work: dict, out: Path) -> list[str]:
    return [
        "-m",
        "recycler.cli.train",
        "finetune",
        str(work["base"]),
        "--data",
        str(work["train"]),
        "-o",
        str(out),
        "--config",
        str(work["yaml"]),
    ]


def assert_same_losses(record: dict, reference: dict) -> None:
    steps = [s for s, _ in record["loss_per_step"]]
    assert steps == list(range(1, 9))
    for (_, got), (_, want) in zip(record["loss_per_step"], reference["loss_per_step"], strict=True):
        assert abs(got - want) <= TOLERANCE, (got, want)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resume must never unpickle: any torch.load / pickle.load call fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling attempted during resume")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


# ---- configuration ---------------------------------------------------------------------------------------


def test_config_defaults_yaml_and_collected_errors(tmp_path: Path) -> None:
    cfg = FinetuneConfig()
    assert (cfg.learning_rate, cfg.batch_size, cfg.lr_scheduler, cfg.warmup_ratio, cfg.max_length) == (
        5e-6,
        8,
        "linear",
        0.03,
        2048,
    )
    path = tmp_path / "ft.yaml"
    path.write_text("# paper settings, more steps\nmax_steps: 12\nmicro_batch_size: 2\n")
    assert FinetuneConfig.from_yaml(path).max_steps == 12
    path.write_text("learning_rate: -1\nbatch_sise: 8\n")
    with pytest.raises(
        InvalidConfig,
        match=r"unknown field 'batch_sise' \(did you mean batch_size.*learning_rate: .*greater than 0",
    ):
        FinetuneConfig.from_yaml(path)
    with pytest.raises(InvalidConfig, match="max_steps"):
        cfg.updated(max_steps=0)
    with pytest.raises(InvalidConfig, match=r"batch_size 8 is not a multiple of micro_batch_size 3 x 2"):
        make_plan(FinetuneConfig(micro_batch_size=3), examples=100, world_size=2)
    plan = make_plan(FinetuneConfig(micro_batch_size=2, epochs=2), examples=100, world_size=2)
    assert (plan.total_steps, plan.warmup_steps, plan.accumulation) == (25, 1, 2)


def test_no_weight_decay_on_embeddings_norms_biases(work) -> None:
    model = AutoModelForCausalLM.from_pretrained(work["base"])
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= exempt
    assert all("norm" in n or "embed" in n or "lm_head" in n for n in exempt)
    assert all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) == 2 * 7  # q,k,v,o,gate,up,down


def test_crash_point_matches_exactly() -> None:
    code = "from recycler.crashpoints import crash_point; crash_point('finetune:step=3'); print('alive')"
    for value, killed in [("finetune:step=3", True), ("finetune:step=30", False), ("", False)]:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "RECYCLER_CRASH_AT": value, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
        )
        assert (proc.returncode == -9) == killed and ("alive" in proc.stdout) != killed


# ---- training and output -----------------------------------------------------------------------------------


def test_loss_decreases_and_output_is_a_complete_hf_folder(work, tmp_path: Path) -> None:
    heldout = write_jsonl(tmp_path / "heldout.jsonl", TRAIN[:4])
    cfg = FinetuneConfig(
        learning_rate=3e-3, batch_size=4, micro_batch_size=4, max_steps=20, eval_every=5, save_every=5
    )
    seen = []
    record = finetune(
        work["base"], work["train"], tmp_path / "out", cfg, eval_path=heldout, progress=seen.append
    )
    losses = [loss for _, loss in record["loss_per_step"]]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert [s for s, _ in record["curve"]] == [0, 5, 10, 15, 20]
    scores = [v for _, v in record["curve"]]
    assert scores[-1] < 0.8 * scores[0] and record["eval"]["metric"] == "eval_loss"
    assert [r.step for r in seen if r.loss is not None] == list(range(1, 21))
    assert record["tokens_seen"] > record["response_tokens_seen"] > 0 and record["tokens_per_s"] > 0
    assert record["dropout_forced_to_zero"] == {"attention_dropout": 0.1}

    out = tmp_path / "out"
    assert json.loads((out / RECORD).read_text())["loss_per_step"] == record["loss_per_step"]
    assert (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / ".checkpoints").exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert AutoConfig.from_pretrained(out).attention_dropout == 0.1  # the base's config, not our override
    assert AutoTokenizer.from_pretrained(out).chat_template
    tuned = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(work["base"])
    assert not torch.equal(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_existing_output_overwrite_and_changed_config_on_resume(work, tmp_path: Path, monkeypatch) -> None:
    out, cfg = tmp_path / "out", FinetuneConfig.from_yaml(work["yaml"])

    def crash(name: str) -> None:
        if name == "finetune:step=3":
            raise RuntimeError("simulated crash")

    monkeypatch.setattr("recycler.stages.finetune.recipe.crash_point", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        finetune(work["base"], work["train"], out, cfg)
    monkeypatch.undo()
    assert (ts.step_dir(out, 2) / ts.MARKER).is_file()
    with pytest.raises(OutputExists, match="unfinished run; pass --resume"):
        finetune(work["base"], work["train"], out, cfg)
    with pytest.raises(ResumeError, match=r"different settings \(learning_rate\)"):
        finetune(work["base"], work["train"], out, cfg.updated(learning_rate=2e-3), resume=True)
    again = cfg.updated(max_steps=3, save_every=1, keep_last_checkpoints=1, keep_checkpoints_in_output=True)
    record = finetune(work["base"], work["train"], out, again, overwrite=True)
    assert record["resumed_from"] == [] and record["steps"] == 3
    # The old run's checkpoints are gone; the new run's last one (pruned to 1) is published with the model.
    assert [p.name for p in ts.checkpoint_root(out).iterdir()] == ["step-2"]
    assert ts.checkpoint_problem(ts.step_dir(out, 2)) is None
    with pytest.raises(OutputExists, match="finished fine-tune"):
        finetune(work["base"], work["train"], out, cfg)


def test_resume_refuses_checkpoints_of_another_start_model(work, tmp_path: Path, monkeypatch) -> None:
    """Issue 19 item 5: B --resume over A's checkpoints would train on from A's weights under B's name."""
    out, cfg = tmp_path / "out", FinetuneConfig.from_yaml(work["yaml"])
    other = build_tiny_model(tmp_path / "other", seed=6)  # same architecture, other weights

    def crash(name: str) -> None:
        if name == "finetune:step=3":
            raise RuntimeError("simulated crash")

    monkeypatch.setattr("recycler.stages.finetune.recipe.crash_point", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        finetune(work["base"], work["train"], out, cfg)
    monkeypatch.undo()
    with pytest.raises(ResumeError, match="different start model") as e:
        finetune(other, work["train"], out, cfg, resume=True)
    assert str(work["base"].resolve()) in str(e.value) and str(other.resolve()) in str(e.value)
    record = finetune(work["base"], work["train"], out, cfg, resume=True)  # the right model resumes
    assert record["resumed_from"] == [2]


def test_non_finite_loss_stops_training(work, tmp_path: Path, monkeypatch) -> None:
    def nan_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits.sum() * float("nan")

    monkeypatch.setattr("recycler.stages.finetune.recipe.token_nll_sum", nan_loss)
    with pytest.raises(NonFiniteValues, match="training loss became nan at step 1"):
        finetune(work["base"], work["train"], tmp_path / "out", FinetuneConfig.from_yaml(work["yaml"]))
    assert not (tmp_path / "out" / RECORD).exists()


# ---- crash and resume ----------------------------------------------------------------------------------------


def test_resume_after_kill_at_step_matches_uninterrupted_run(
    work, reference, tmp_path: Path, no_unpickling
) -> None:
    c5 = case("C5 fine-tune killed between checkpoints", "fault")
    out = tmp_path / "out"
    crashed = run_cli(finetune_args(work, out), crash_at="finetune:step=5")
    assert crashed.returncode == -9, crashed.stderr
    assert not (out / RECORD).exists()
    assert sorted(p.name for p in ts.checkpoint_root(out).iterdir()) == ["step-2", "step-4"]
    record = finetune(work["base"], work["train"], out, FinetuneConfig.from_yaml(work["yaml"]), resume=True)
    assert record["resumed_from"] == [4] and record["quarantined_checkpoints"] == []
    assert_same_losses(record, reference)
    tuned, ref = (AutoModelForCausalLM.from_pretrained(p) for p in (out, work["root"] / "reference"))
    for (name, a), b in zip(tuned.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    c5.ok(check_invariants(final_dirs=(out,)))


@pytest.mark.parametrize(
    ("crash_at", "partial_step", "resumed_from"),
    [("finetune:checkpoint-save:step=4", 4, [2]), ("finetune:checkpoint-save", 2, [])],
)
def test_checkpoint_half_written_at_crash_is_never_picked(
    work, reference, tmp_path: Path, no_unpickling, crash_at: str, partial_step: int, resumed_from: list
) -> None:
    """Killed after the weights, before the marker: resume uses the previous complete one (or none)."""
    c6 = case(f"C6 killed mid-checkpoint-save ({crash_at})", "fault")
    out = tmp_path / "out"
    crashed = run_cli(finetune_args(work, out), crash_at=crash_at)
    assert crashed.returncode == -9, crashed.stderr
    partial = ts.step_dir(out, partial_step)
    assert (partial / "model.safetensors").is_file() and not (partial / ts.MARKER).exists()
    record = finetune(work["base"], work["train"], out, FinetuneConfig.from_yaml(work["yaml"]), resume=True)
    assert record["resumed_from"] == resumed_from
    [moved] = record["quarantined_checkpoints"]
    assert moved["checkpoint"] == f"step-{partial_step}" and "no COMPLETE marker" in moved["reason"]
    assert_same_losses(record, reference)
    c6.ok(check_invariants(final_dirs=(out,)))


def test_corrupted_or_tampered_checkpoints_are_quarantined(tmp_path: Path, no_unpickling) -> None:
    e6 = case("E6 resume from checkpoints we did not write (planted pickle, tampered files)", "bad_input")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for step in (2, 4, 6, 8):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        folder = ts.step_dir(tmp_path, step)
        folder.mkdir(parents=True)
        ts.save_weights(folder, model)
        ts.save_optimizer(folder, optimizer)
        ts.save_rng(folder, 0)
        ts.write_marker(folder, step)
    (ts.step_dir(tmp_path, 8) / ts.MARKER).write_text(
        '{"format": "recycler-train-checkpoint/1", "step": 8, "fi'
    )
    blob = bytearray((ts.step_dir(tmp_path, 6) / "optimizer.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (ts.step_dir(tmp_path, 6) / "optimizer.safetensors").write_bytes(bytes(blob))
    (ts.step_dir(tmp_path, 4) / "rng_state.pth").write_bytes(b"\x80\x04K\x01.")  # a planted pickle

    chosen, quarantined = ts.select_resume_checkpoint(tmp_path)
    assert chosen == ts.step_dir(tmp_path, 2)
    reasons = {q["checkpoint"]: q["reason"] for q in quarantined}
    assert "not valid JSON" in reasons["step-8"]
    assert "optimizer.safetensors: sha256 differs" in reasons["step-6"]
    assert "unlisted: ['rng_state.pth']" in reasons["step-4"]
    assert sorted(p.name for p in ts.checkpoint_root(tmp_path).glob("step-*")) == ["step-2"]
    assert len(list((ts.checkpoint_root(tmp_path) / ts.QUARANTINE).glob("step-*.reason.txt"))) == 3

    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    ts.load_optimizer(chosen, fresh)
    state = fresh.state_dict()
    assert state["param_groups"][0]["betas"] == (0.9, 0.999) and float(state["state"][0]["step"]) == 1.0
    e6.ok()


# ---- multi-process -------------------------------------------------------------------------------------------


def test_two_cpu_processes_with_accelerate_launch(work, reference, tmp_path: Path) -> None:
    """Same global batch on 2 processes (1 micro-batch each) as on 1 process (2 micro-batches)."""
    out = tmp_path / "out"
    with socket.socket() as s:  # a free rendezvous port, so parallel CI jobs do not collide on 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `--multi_gpu` selects the torchrun launcher; on a CPU-only machine our Accelerator(cpu=True) joins
    # the group over gloo. (`--cpu --num_processes 2` would need mpirun and otherwise starts 1 process.)
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    proc = run_cli([*launch, *finetune_args(work, out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / RECORD).read_text())
    assert record["plan"]["world_size"] == 2 and record["plan"]["accumulation"] == 1
    assert_same_losses(record, reference)
    assert (
        AutoModelForCausalLM.from_pretrained(out).config.vocab_size
        == AutoConfig.from_pretrained(work["base"]).vocab_size
    )


# ---- CLI errors ----------------------------------------------------------------------------------------------


def invoke(args: list[str]) -> object:
    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, args)


def test_cli_finetune_errors(work, tmp_path: Path) -> None:
    base, out = str(work["base"]), str(tmp_path / "out")
    missing = invoke(["finetune", base, "--data", str(tmp_path / "nope.jsonl"), "-o", out])
    assert isinstance(missing.exception, InvalidData) and "nope.jsonl does not exist" in str(
        missing.exception
    )

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    malformed = invoke(["finetune", base, "--data", str(bad), "-o", out])
    assert isinstance(malformed.exception, InvalidData) and f"{bad}:2: not valid JSON" in str(
        malformed.exception
    )

    no_template = build_tiny_model(tmp_path / "plain", with_chat_template=False)
    result = invoke(["finetune", str(no_template), "--data", str(work["train"]), "-o", out])
    assert isinstance(result.exception, InvalidModelFolder) and "has no chat template" in str(
        result.exception
    )

    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_template / f).unlink(missing_ok=True)
    result = invoke(["finetune", str(no_template), "--data", str(work["train"]), "-o", out])
    assert isinstance(result.exception, InvalidModelFolder) and "has no tokenizer" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_cli_main_prints_error_and_exits_with_its_code(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "finetune",
                str(tmp_path / "model"),
                "--data",
                str(tmp_path / "missing.jsonl"),
                "-o",
                str(tmp_path / "o"),
            ]
        )
    assert exit_info.value.code == InvalidData.exit_code
    assert capsys.readouterr().err.startswith(f"error: data file {tmp_path / 'missing.jsonl'} does not exist")


def test_cli_help_explains_options() -> None:
    result = invoke(["finetune", "--help"])
    assert result.exit_code == 0
    for option in ("--data", "--output", "--config", "--eval-data", "--resume", "--max-steps", "--overwrite"):
        assert option in result.output


def test_lora_finetune_publishes_merged_model_and_its_adapter(work, tmp_path: Path) -> None:
    """method: lora trains only B·A on the target modules: the merged output differs from the base by
    a rank ≤ r Δ there and nowhere else, and its adapter/ reads back (recycler) as that Δ."""
    from conftest import load_state

    from recycler.stages.extract import diff_checkpoints

    yaml = tmp_path / "lora.yaml"
    yaml.write_text(
        "method: lora\nlora_r: 2\nlora_alpha: 4\nlora_target_modules: [q_proj, down_proj]\n"
        "learning_rate: 0.01\nbatch_size: 4\nmicro_batch_size: 2\nmax_steps: 4\nsave_every: null\neval_every: null\n"
    )
    out = tmp_path / "out"
    record = finetune(work["base"], work["train"], out, FinetuneConfig.from_yaml(yaml))
    assert record["config"]["method"] == "lora" and record["steps"] == 4
    base, tuned = load_state(work["base"]), load_state(out)
    assert base.keys() == tuned.keys()
    for name, w in base.items():
        d = tuned[name].double() - w.double()
        if "q_proj" in name or "down_proj" in name:
            s = torch.linalg.svdvals(d)
            assert s[0] > 0 and s[2:].max() < 1e-6 * s[0], name  # rank 2
        else:
            assert torch.equal(tuned[name], w), name
    diff_checkpoints(work["base"], out / "adapter", tmp_path / "delta")
    delta = load_state(tmp_path / "delta")
    assert set(delta) == {n for n in base if "q_proj" in n or "down_proj" in n}
    for name, d in delta.items():
        assert torch.allclose(base[name] + d, tuned[name], rtol=0, atol=1e-6), name
