"""A family's release-cycle settings (`CycleSpec`), read from the YAML file an operator writes.

Every field is documented (`FIELDS`, the README's table and `recycler init-spec`'s template come from
it) and every unknown field is refused with the valid names, closest first: a misspelled `gate_margn`
must not silently leave the gate margin at 0. Evaluation settings live in one place, `evaluation:`,
with the names `recycler evaluate` uses for its options; the cycle hands them to the fine-tune's
periodic evaluation too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

from recycler.errors import InvalidConfig
from recycler.io.config_file import read_yaml_mapping, validate_all
from recycler.stages.evaluate.options import RENAMED, EvalOptions
from recycler.stages.finetune.config import FinetuneConfig
from recycler.store.releases import check_id


class EvalSettings(EvalOptions):
    """How a model is scored on the family's task (the names of `recycler evaluate`'s options), in the
    cycle's scores and in every fine-tune's periodic evaluation alike."""

    task: Path = Field(
        description="task JSONL: {prompt|messages, answer} lines (generation) or {…, choices, answer} (multiple choice)"
    )

    def provenance(self) -> str:
        """What a score under these settings measured, as 16 hex digits: the task file's content (not
        its path: an edited file is another measurement) and every setting that changes a result
        (the batch size does not). Scores are cached, compared and registered with it."""
        import hashlib
        import json

        from recycler.io.manifest import sha256_file

        body = self.model_dump(mode="json", exclude={"batch_size", "task"})
        body["task_sha256"] = sha256_file(self.task).sha256
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class AdapterForm(BaseModel):
    """How a Δ becomes a PEFT LoRA adapter (`recycler.stages.to_lora`): a fixed rank, or per module the
    smallest rank keeping a share of ‖Δ‖²."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int | None = Field(None, ge=1, description="the same rank for every module")
    energy: float | None = Field(
        None, gt=0, le=1, description="per module, the smallest rank keeping this share of ‖Δ‖² (e.g. 0.99)"
    )

    @model_validator(mode="after")
    def _one(self) -> AdapterForm:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank and energy")
        return self

    def label(self) -> str:
        return f"rank {self.rank}" if self.rank is not None else f"energy {self.energy:g}"


class CycleSpec(BaseModel):
    """What a family's release cycle needs besides the release itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str = Field(
        description="model family, e.g. llama-3-8b (lowercase, digits, . _ -): registry names start with it"
    )
    variant: str = Field(
        "instruct", description="the fine-tuned variant, e.g. instruct or math (one spec per variant)"
    )
    train: Path = Field(description="fine-tuning data: JSONL of {messages} or {prompt, response}")
    evaluation: EvalSettings = Field(
        description="how every model of a cycle is scored (the gate compares these scores)"
    )
    finetune: FinetuneConfig = Field(
        FinetuneConfig(), description="fine-tuning options (recycler finetune's config; the paper's defaults)"
    )
    initial_finetune: Path | None = Field(
        None,
        description="an existing fine-tune of the first release (full checkpoint or PEFT LoRA adapter): the "
        "first cycle adopts it instead of fine-tuning, and later releases recycle its Δ",
    )
    mode: Literal["iterative", "direct"] = Field(
        "iterative",
        description="iterative: Δ^iter = M*_i − M_i (Algorithm 1); direct: Δ^dir = FT(M_i) − M_i, needs baseline",
    )
    alpha: float = Field(1.0, description="scale of Δ when applied: M_i + α·Δ")
    max_relative_norm: float = Field(
        0.5, gt=0, description="refuse a Δ whose ‖Δ‖/‖base‖ exceeds this (unrelated models)"
    )
    gate_margin: float = Field(
        0.0,
        description="superiority: promote when the paired difference's lower confidence bound exceeds this; "
        "non-inferiority: when it exceeds minus this",
    )
    gate_rule: Literal["superiority", "non-inferiority"] = Field(
        "superiority",
        description="superiority: beat base and champion beyond noise (ties never promote); non-inferiority: "
        "beat the base, and be no worse than the champion by more than gate_margin (a new base you want)",
    )
    gate_confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1,
        description="two-sided confidence of the paired difference's interval the gate reads",
    )
    baseline: bool = Field(
        False, description="also fine-tune from the plain base: the savings report, and Δ^dir in direct mode"
    )
    pick_best: bool = Field(
        True, description="with a baseline: the better of FT(M_i + Δ) and FT(M_i) is the candidate"
    )
    precheck_sample: Path | None = Field(
        None, description="held-out JSONL for the pre-check's loss probe of M_i + α·Δ (None: no pre-check)"
    )
    precheck_min_score: float | None = Field(
        None, description="stop the cycle before fine-tuning when the pre-check scores below this"
    )

    adapter: AdapterForm | None = Field(
        None,
        description="also publish each cycle's Δ as a PEFT LoRA adapter for its base ({rank: 16} or "
        "{energy: 0.99}), registered as {family}-{variant}-lora, linked to its Δ and scored next to it",
    )
    on_republish: Literal["new-cycle", "refuse"] = Field(
        "new-cycle",
        description="a version re-published with other content: run a new cycle for it (if no newer release "
        "was processed), or refuse it (recorded, reported once)",
    )
    max_attempts: int = Field(
        3, ge=1, description="attempts of a failing or crashed cycle before the release is given up"
    )
    after_failure: Literal["stop", "continue"] = Field(
        "stop", description="a release given up blocks the chain until an operator retries or skips it (stop)"
    )
    after_refusal: Literal["continue", "stop"] = Field(
        "continue",
        description="a release refused (pre-check, re-publication) lets the chain go on (continue)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CycleSpec:
        check_id(self.family)
        check_id(self.variant, "variant")
        if self.mode == "direct" and not self.baseline:
            raise ValueError("mode 'direct' recycles FT(base) − base, so it needs baseline: true")
        if self.precheck_min_score is not None and self.precheck_sample is None:
            raise ValueError("precheck_min_score needs precheck_sample (the pre-check's held-out data)")
        if "evaluation" in self.finetune.model_fields_set:
            raise ValueError(
                "finetune.evaluation: a spec's evaluation settings go under the top-level `evaluation:` "
                "(they score the fine-tune's curve and the cycle alike)"
            )
        if self.finetune.keep_checkpoints_in_output:
            raise ValueError(
                "finetune.keep_checkpoints_in_output: a cycle publishes the fine-tuned model only (its "
                "checkpoints are removed once it finishes); set it to false"
            )
        return self

    @field_serializer("finetune")
    def _finetune_without_evaluation(self, finetune: FinetuneConfig) -> dict:
        """A dumped spec loads back: its evaluation settings appear once, under `evaluation`."""
        return finetune.model_dump(mode="json", exclude={"evaluation"})

    def finetune_config(self) -> FinetuneConfig:
        """The fine-tune's options, its periodic evaluation scored exactly like the cycle's."""
        return self.finetune.updated(evaluation=self.evaluation.options())


def build_spec(values: dict[str, Any], source: str = "spec") -> CycleSpec:
    """Validate `values` as a CycleSpec, reporting every problem at once (unknown fields first); the
    fine-tune's former `eval_*` names are refused with their place under `evaluation:`."""
    ft = values.get("finetune")
    renamed = [
        f"finetune.{old} was renamed: use evaluation.{new}"
        for old, new in RENAMED.items()
        if isinstance(ft, dict) and old in ft
    ]
    if not renamed:
        return validate_all(CycleSpec, values, source, root="<spec>")
    try:  # report them with every other problem
        validate_all(
            CycleSpec,
            {**values, "finetune": {k: v for k, v in ft.items() if k not in RENAMED}},
            source,
            root="<spec>",
        )
    except InvalidConfig as e:
        renamed.append(str(e).removeprefix(f"{source}: "))
    raise InvalidConfig(f"{source}: " + "; ".join(renamed))


def load_spec(path: Path) -> CycleSpec:
    """A CycleSpec from YAML; relative data paths are taken relative to the YAML file."""
    values = read_yaml_mapping(path, "CycleSpec fields")
    here = Path(path).parent

    def absolute(p: object) -> object:
        return str((here / p).resolve()) if isinstance(p, str) and not Path(p).is_absolute() else p

    for key in ("train", "precheck_sample", "initial_finetune"):
        if key in values:
            values[key] = absolute(values[key])
    if isinstance(values.get("evaluation"), dict) and "task" in values["evaluation"]:
        values["evaluation"] = {**values["evaluation"], "task": absolute(values["evaluation"]["task"])}
    return build_spec(values, str(path))


EXAMPLE = {"family": "llama-3-8b", "train": "data/instruct-train.jsonl", "task": "data/heldout.jsonl"}


def _yaml_value(value: object) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _describe(
    model: type[BaseModel], indent: str, example: dict[str, object], skip: set[str] = frozenset()
) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            inner = {"task": example["task"]} if name == "evaluation" else {}
            body = _describe(
                field.annotation, indent + "  ", inner, {"evaluation"} if name == "finetune" else set()
            )
            header = (
                f"{indent}{name}:" if inner else f"{indent}# {name}:"
            )  # a block of comments only stays a comment
            lines += [f"{indent}# {field.description}", header, *body]
            continue
        required = field.is_required()
        value = example.get(name) if required else field.default
        doc = field.description or ""
        marker = "" if required or name in example else "# "
        lines.append(
            f"{indent}{marker}{name}: {_yaml_value(value)}"
            + (f"    # {doc}" if doc else "")
            + ("  (required)" if required else "")
        )
    return lines


def spec_template() -> str:
    """A commented CycleSpec: required fields with example values, every other field at its default,
    commented out. It loads as is (tests/test_spec.py), and `recycler init-spec` writes it."""
    head = [
        "# recycler family spec: the release-cycle settings of one fine-tuned variant of a model family.",
        "# Relative paths are relative to this file. Unknown fields are refused. `recycler cycle --help`.",
    ]
    return "\n".join([*head, *_describe(CycleSpec, "", EXAMPLE)]) + "\n"
