"""The family spec an operator writes: relative paths, every problem reported at once, unknown or
misplaced fields refused with the valid names, and a commented template that loads as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from recycler.errors import InvalidConfig
from recycler.service.spec import CycleSpec, EvalSettings, load_spec, spec_template
from recycler.stages.finetune.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = "family: llama-3\ntrain: data/train.jsonl\nevaluation: {task: /abs/test.jsonl}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "family.yaml"
    path.write_text(text)
    return path


def test_relative_paths_and_defaults(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL + "finetune: {max_steps: 5}\nprecheck_sample: dev.jsonl\n"))
    assert spec.train == (tmp_path / "data" / "train.jsonl").resolve()
    assert (
        spec.evaluation.task == Path("/abs/test.jsonl")
        and spec.precheck_sample == (tmp_path / "dev.jsonl").resolve()
    )
    assert spec.finetune.max_steps == 5 and spec.finetune.learning_rate == 5e-6  # the paper's default kept
    assert (spec.gate_margin, spec.mode, spec.evaluation.extract) == (0.0, "iterative", "number")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("gate_margn: 0.05\n", "unknown field 'gate_margn' (did you mean gate_margin"),
        ("baselin: true\n", "unknown field 'baselin' (did you mean baseline"),
        ("precheck_min_scor: 0.2\n", "unknown field 'precheck_min_scor' (did you mean precheck_min_score"),
        (
            "finetune: {learning_rat: 1}\n",
            "unknown field finetune.'learning_rat' (did you mean learning_rate",
        ),
        ("eval_task: e.jsonl\n", "unknown field 'eval_task'"),
        ("finetune: {eval_extract: text}\n", "finetune.eval_extract was renamed: use evaluation.extract"),
        ("finetune: {evaluation: {chat: false}}\n", "go under the top-level `evaluation:`"),
        (
            "finetune: {keep_checkpoints_in_output: true}\n",
            "finetune.keep_checkpoints_in_output: a cycle publishes",
        ),
        ("mode: direct\n", "needs baseline: true"),
        ("precheck_min_score: 0.1\n", "precheck_min_score needs precheck_sample"),
    ],
)
def test_mistakes_are_refused_naming_the_fix(tmp_path, extra, message):
    with pytest.raises(InvalidConfig, match=re.escape(message)):
        load_spec(write(tmp_path, MINIMAL + extra))


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(InvalidConfig) as e:
        load_spec(write(tmp_path, "family: Bad Name\ngate_margn: 1\nevaluation: {task: t, limt: 2}\n"))
    text = str(e.value)
    assert "gate_margn" in text and "evaluation.'limt'" in text and "train" in text and "family.yaml" in text
    with pytest.raises(InvalidConfig, match="not valid YAML"):
        load_spec(write(tmp_path, "family: [unclosed\n"))
    with pytest.raises(InvalidConfig, match="unknown field 'warmup_ratoi' .*did you mean warmup_ratio"):
        FinetuneConfig.build({"warmup_ratoi": 0.1})


def test_template_loads_and_documents_every_field(tmp_path):
    text = spec_template()
    spec = load_spec(write(tmp_path, text))
    assert (
        spec.family == "llama-3-8b" and spec.train == (tmp_path / "data" / "instruct-train.jsonl").resolve()
    )
    for name in (*CycleSpec.model_fields, "limit", "max_new_tokens", "learning_rate", "eval_every"):
        assert re.search(rf"^\s*(# )?{name}:", text, re.M), name
    # uncommenting every default changes nothing: the template states the true defaults
    uncommented = yaml.safe_load(
        "\n".join(re.sub(r"^(\s*)# (\w+:)", r"\1\2", line) for line in text.splitlines())
    )
    assert load_spec(write(tmp_path, yaml.safe_dump(uncommented))) == spec


def test_readme_documents_every_spec_field():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([\w.]+)` \| `?([^|`]*)`? \| .+ \|$", readme, re.M))
    names = [n for n in CycleSpec.model_fields if n != "evaluation"]
    names += [f"evaluation.{n}" for n in EvalSettings.model_fields]
    assert set(names) <= set(rows), f"README's spec table misses {set(names) - set(rows)}"
    assert (
        rows["gate_margin"] == "0.0"
        and rows["evaluation.max_new_tokens"] == "256"
        and rows["train"] == "required"
    )
