"""Evaluation: answer extraction, task validation, log-likelihood scoring, generation, lm-eval adapter, CLI."""

from __future__ import annotations

import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from recycler.errors import InvalidData, InvalidTask, MissingOptionalDependency
from recycler.stages.evaluate.answers import extract_number
from recycler.stages.evaluate.evaluators import (
    Evaluator,
    GenerationTask,
    LossEvaluator,
    MultipleChoiceTask,
    load_task,
)
from recycler.stages.evaluate.lm_eval import run_lm_eval
from recycler.stages.evaluate.scoring import greedy_generate, prompt_ids
from recycler.stages.finetune.config import FinetuneConfig
from recycler.stages.finetune.data import encode_records, load_sft_records
from recycler.stages.finetune.recipe import finetune
from recycler.toy.tiny import build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAIN = [
    {"prompt": "2+3?", "response": "5"},
    {"prompt": "7+1?", "response": "8"},
    {"prompt": "Red fruit?", "response": "apple"},
    {"prompt": "Yellow fruit?", "response": "banana"},
]
GEN_TASK = [{"prompt": "2+3?", "answer": "5"}, {"prompt": "7+1?", "answer": "so #### 8"}]
MC_TASK = [
    {"prompt": "Red fruit?", "choices": ["banana", "apple"], "answer": 1},
    {"prompt": "Yellow fruit?", "choices": ["banana", "apple"], "answer": 0},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("eval") / "base", seed=11)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory) -> Path:
    """The tiny model after memorising TRAIN (40 steps, lr 1e-2): the right answers are known."""
    root = tmp_path_factory.mktemp("trained")
    cfg = FinetuneConfig(
        learning_rate=1e-2, batch_size=4, micro_batch_size=4, max_steps=40, eval_every=None, save_every=None
    )
    finetune(base, write_jsonl(root / "train.jsonl", TRAIN), root / "out", cfg)
    return root / "out"


def load(folder: Path) -> tuple[torch.nn.Module, object]:
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


# ---- answer extraction ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("First 3 apples, then 17 pears", "17"),
        ("She pays $1,234.50 in total.", "1234.5"),
        ("It drops to -7 degrees", "-7"),
        ("temperature −3", "-3"),
        ("0.50", "0.5"),
        ("72.0", "72"),
        ("ratio .25", "0.25"),
        ("Steps: 2 * 3 = 6\n#### 6", "6"),
        ("#### 1,000 dollars and 5 cents", "1000"),
        ("a) 12 #### b) 9 #### 3 then 4", "3"),
        ("pages 3-4", "4"),
        ("version CO2 has none", None),
        ("no digits here", None),
        ("-0", "0"),
        ("1,000,000", "1000000"),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_number(text) == expected


def test_unparseable_gold_answer_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"prompt": "x", "answer": "7"}, {"prompt": "y", "answer": "seven"}]
    )
    with pytest.raises(InvalidTask, match=r"t\.jsonl:2: cannot parse an answer from 'seven'"):
        load_task(path)
    assert load_task(path, extract="text").examples[1].answer == "seven"  # text mode accepts it


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "choices": ["a", "b"], "answer": 2}, "index of the right choice"),
        ({"prompt": "q", "choices": ["a"], "answer": 0}, "at least 2"),
        ({"prompt": "q", "choices": ["a", "b"], "answer": True}, "index of the right choice"),
        ({"prompt": "q"}, "no 'answer'"),
        ({"messages": [{"role": "assistant", "content": "x"}], "answer": "1"}, "must not be the assistant"),
    ],
)
def test_task_validation_errors(tmp_path: Path, row: dict, message: str) -> None:
    with pytest.raises(InvalidTask, match=message):
        load_task(write_jsonl(tmp_path / "t.jsonl", [row]))


def test_mixed_task_kinds_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidTask, match=r":2: mixes"):
        load_task(write_jsonl(tmp_path / "t.jsonl", [GEN_TASK[0], MC_TASK[0]]))


# ---- log-likelihood scoring ---------------------------------------------------------------------------------


def test_loglikelihood_exact_on_uniform_model(base: Path) -> None:
    """Zeroed final norm ⇒ logits 0 ⇒ every token has log p = -log V: scores are computable by hand."""
    model, tok = load(base)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    vocab = model.config.vocab_size
    examples = load_task(
        write_jsonl(
            base.parent / "mc.jsonl", [{"prompt": "Q?", "choices": ["aaaa", "bb", "ccc"], "answer": 1}]
        )
    )
    by_sum = examples.evaluate(model, tok).records[0]
    assert by_sum["scores"] == pytest.approx(
        [-4 * math.log(vocab), -2 * math.log(vocab), -3 * math.log(vocab)], rel=1e-6
    )
    assert by_sum["predicted"] == 1 and by_sum["correct"]  # the shortest continuation wins under "sum"
    per_token = (
        MultipleChoiceTask("mc", examples.examples, normalize="tokens").evaluate(model, tok).records[0]
    )
    assert per_token["scores"] == pytest.approx([-math.log(vocab)] * 3, rel=1e-6)


def test_multiple_choice_picks_the_trained_answer(trained: Path, base: Path, tmp_path: Path) -> None:
    task = load_task(write_jsonl(tmp_path / "mc.jsonl", MC_TASK), batch_size=3)
    assert isinstance(task, Evaluator)
    result = task.evaluate(*load(trained))
    assert (result.metric, result.score, result.n) == ("accuracy", 1.0, 2)
    assert [r["predicted"] for r in result.records] == [1, 0]
    assert all(r["scores"][r["answer"]] > r["scores"][1 - r["answer"]] for r in result.records)


# ---- generation -------------------------------------------------------------------------------------------


def test_generation_exact_match_after_training(trained: Path, base: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gen.jsonl", GEN_TASK)
    after = load_task(path, max_new_tokens=6).evaluate(*load(trained))
    assert after.score == 1.0 and [r["predicted"] for r in after.records] == ["5", "8"]
    before = load_task(path, max_new_tokens=6).evaluate(*load(base))
    assert before.score < 1.0


def test_batched_left_padded_generation_matches_one_by_one(trained: Path) -> None:
    model, tok = load(trained)
    prompts = [
        prompt_ids(tok, [{"role": "user", "content": p}], chat=True)
        for p in ["2+3?", "Yellow fruit?", "7+1?"]
    ]
    assert len({len(p) for p in prompts}) > 1  # different lengths, so padding is exercised
    batched = greedy_generate(model, tok, prompts, max_new_tokens=8, batch_size=3)
    single = [greedy_generate(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single == ["5", "banana", "8"]


def test_heldout_loss_drops_after_training(trained: Path, base: Path, tmp_path: Path) -> None:
    records = load_sft_records(write_jsonl(tmp_path / "heldout.jsonl", TRAIN))
    losses = {}
    for name, folder in {"base": base, "trained": trained}.items():
        model, tok = load(folder)
        losses[name] = LossEvaluator("heldout", encode_records(tok, records, 64)).evaluate(model, tok).score
    assert losses["trained"] < 0.5 * losses["base"]


def test_generation_task_from_messages(trained: Path) -> None:
    from recycler.stages.evaluate.evaluators import GenerationExample

    task = GenerationTask(
        "m", [GenerationExample(1, [{"role": "user", "content": "2+3?"}], "5")], max_new_tokens=4
    )
    assert task.evaluate(*load(trained)).score == 1.0


# ---- lm-eval adapter ----------------------------------------------------------------------------------------


def test_lm_eval_not_installed_is_a_clear_error(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails even if someone installs it
    with pytest.raises(
        MissingOptionalDependency,
        match=r"lm-evaluation-harness .* not installed; install it with `pip install",
    ):
        run_lm_eval(base, "gsm8k")


def test_lm_eval_offline_datasets_are_a_clear_error(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("lm_eval")

    def simple_evaluate(**kwargs: object) -> dict:
        assert kwargs["tasks"] == ["arc_challenge"] and kwargs["model_args"]["trust_remote_code"] is False
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    fake.simple_evaluate = simple_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    with pytest.raises(MissingOptionalDependency, match=r"'arc_challenge'.*not available offline"):
        run_lm_eval(base, "arc_c")


def test_lm_eval_results_become_an_eval_result(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = lambda **kw: {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.1,
            }
        },
        "n-samples": {"gsm8k": {"original": 1319, "effective": 4}},
    }
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    result = run_lm_eval(base, "gsm8k", limit=4)
    assert (result.metric, result.score, result.n) == ("exact_match,strict-match", 0.25, 4)
    with pytest.raises(InvalidTask, match="unknown task 'hellaswagz'"):
        run_lm_eval(base, "hellaswagz")


# ---- CLI ------------------------------------------------------------------------------------------------------


def cli_app() -> object:
    import typer

    from recycler.cli.train import register

    app = typer.Typer()
    register(app)
    return app


def test_cli_evaluate_writes_results(trained: Path, tmp_path: Path) -> None:
    task = write_jsonl(tmp_path / "mc.jsonl", MC_TASK)
    out = tmp_path / "results.json"
    result = CliRunner().invoke(
        cli_app(), ["evaluate", str(trained), "--task", str(task), "--output", str(out), "--limit", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "mc: accuracy 1.0000 (n=1)" in result.output
    saved = json.loads(out.read_text())
    assert saved["n"] == 1 and saved["records"][0]["predicted"] == 1


def test_cli_evaluate_errors(base: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli_app(), ["evaluate", str(base), "--task", str(tmp_path / "nope.jsonl")])
    assert isinstance(missing.exception, InvalidData) and "nope.jsonl does not exist" in str(
        missing.exception
    )
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "answer": "n/a"}])
    unparsable = runner.invoke(cli_app(), ["evaluate", str(base), "--task", str(bad)])
    assert isinstance(unparsable.exception, InvalidTask) and "bad.jsonl:1" in str(unparsable.exception)
    no_lm_eval = runner.invoke(cli_app(), ["evaluate", str(base), "--task", "mmlu"])
    assert isinstance(no_lm_eval.exception, MissingOptionalDependency)


# ---- one set of evaluation option names (issue 19 item 7) ----------------------------------------------


def test_spec_finetune_config_and_evaluate_cli_share_every_evaluation_option(tmp_path):
    """The spec's `evaluation:`, the fine-tune config's `evaluation:` and `recycler evaluate`'s options
    are one set of names, and every value of the spec reaches the fine-tune's periodic evaluation."""
    import inspect

    from recycler.cli.train import evaluate_command
    from recycler.errors import InvalidConfig
    from recycler.service.spec import EvalSettings, build_spec
    from recycler.stages.evaluate.evaluators import MultipleChoiceTask, evaluator_for_file

    spec_names = set(EvalSettings.model_fields) - {"task"}
    ft_names = set(FinetuneConfig.model_fields["evaluation"].annotation.model_fields)
    cli_names = set(inspect.signature(evaluate_command).parameters) - {
        "model",
        "task",
        "output",
        "dtype",
        "track",
    }
    assert (
        spec_names
        == ft_names
        == cli_names
        == {"limit", "extract", "max_new_tokens", "batch_size", "normalize", "chat"}
    )

    from recycler.stages.evaluate.options import EvalOptions

    signature = inspect.signature(evaluate_command).parameters
    for name in cli_names:  # the same defaults too
        assert signature[name].default == EvalOptions.model_fields[name].default, name
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in MC_TASK))
    chosen = {
        "limit": 1,
        "extract": "text",
        "max_new_tokens": 7,
        "batch_size": 3,
        "normalize": "chars",
        "chat": False,
    }
    spec = build_spec({"family": "f", "train": str(task), "evaluation": {"task": str(task), **chosen}})
    ft = spec.finetune_config()
    assert ft.evaluation.model_dump() == chosen
    evaluator = evaluator_for_file(task, None, max_length=64, options=ft.evaluation)
    assert isinstance(evaluator, MultipleChoiceTask)
    assert (evaluator.chat, evaluator.normalize, evaluator.batch_size, len(evaluator.examples)) == (
        False,
        "chars",
        3,
        1,
    )

    for old, new in (("eval_limit", "limit"), ("eval_extract", "extract"), ("eval_batch_size", "batch_size")):
        with pytest.raises(InvalidConfig, match=f"{old} was renamed: use evaluation.{new}"):
            FinetuneConfig.build({old: 1, "learning_rat": 1})
    with pytest.raises(InvalidConfig, match="unknown field 'learning_rat'"):  # reported together
        FinetuneConfig.build({"eval_limit": 1, "learning_rat": 1})
