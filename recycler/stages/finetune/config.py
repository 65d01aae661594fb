"""Fine-tuning configuration (frozen, from YAML) and the training plan derived from it.

Defaults follow the paper's SFT recipe: AdamW, lr 5e-6, batch size 8, linear schedule with 3% warmup,
dropout 0. `batch_size` is the number of examples per optimizer step summed over all processes, so the
optimisation is the same on one CPU, one GPU or eight: each process runs micro-batches of
`micro_batch_size` and gradient accumulation makes up the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from recycler.errors import InvalidConfig
from recycler.io.config_file import read_yaml_mapping, validate_all
from recycler.stages.evaluate.options import RENAMED, EvalOptions, renamed_problems

# Fields that may change between a run and its resumption without changing what is being computed.
RESUME_NEUTRAL = frozenset(
    {"eval_every", "save_every", "keep_last_checkpoints", "keep_checkpoints_in_output", "evaluation"}
)


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    learning_rate: float = Field(5e-6, gt=0, description="peak learning rate (AdamW; the paper's 5e-6)")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step, over all processes")
    micro_batch_size: int = Field(4, ge=1, description="examples per forward pass per process")
    lr_scheduler: Literal["linear", "constant"] = Field("linear", description="decay after warmup")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of the steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, description="never applied to embeddings, norms or biases")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW β1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW β2")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW ε")
    max_grad_norm: float | None = Field(None, gt=0, description="gradient clipping (None: off)")
    max_length: int = Field(2048, ge=2, description="tokens per example (longer ones are truncated, counted)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU, else none"
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="weights and optimizer state (bf16 autocast is separate)"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations: less memory, ~30% slower")
    seed: int = Field(42, description="weights, data order and dropout seed")
    epochs: float = Field(1.0, gt=0, description="passes over the data (max_steps overrides)")
    max_steps: int | None = Field(None, ge=1, description="overrides epochs")
    eval_every: int | None = Field(
        100, ge=1, description="steps between evaluations on --eval-data (None: only at the end)"
    )
    save_every: int | None = Field(200, ge=1, description="steps between resumable checkpoints (None: none)")
    keep_last_checkpoints: int | None = Field(2, ge=1, description="None keeps every checkpoint")
    keep_checkpoints_in_output: bool = Field(False, description="publish .checkpoints with the model")
    method: Literal["full", "lora"] = Field(
        "full", description="full fine-tuning, or LoRA via PEFT (the published model is merged)"
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank (method lora)")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha: scale = alpha / r (method lora)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input (method lora)")
    lora_target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        description="module name suffixes that get LoRA layers (method lora)",
    )
    evaluation: EvalOptions = Field(
        EvalOptions(),
        description="periodic evaluation on --eval-data, with `recycler evaluate`'s option names",
    )

    @classmethod
    def build(cls, values: dict, *, source: str = "config") -> FinetuneConfig:
        """Validate and report every problem at once, each as `field: what is wrong`; the former
        `eval_*` names are refused with their new name under `evaluation:`."""
        renamed = renamed_problems(values)
        if not renamed:
            return validate_all(cls, values, source)
        try:  # report the renamed options together with every other problem
            validate_all(cls, {k: v for k, v in values.items() if k not in RENAMED}, source)
        except InvalidConfig as e:
            renamed.append(str(e).removeprefix(f"{source}: "))
        raise InvalidConfig(f"{source}: " + "; ".join(renamed))

    @classmethod
    def from_yaml(cls, path: Path) -> FinetuneConfig:
        return cls.build(read_yaml_mapping(path, "option: value"), source=str(path))

    def updated(self, **changes: object) -> FinetuneConfig:
        """A validated copy (pydantic's `model_copy(update=)` would skip validation)."""
        return self.build({**self.model_dump(), **changes}, source="overrides")

    def resume_fingerprint(self) -> dict:
        return self.model_dump(mode="json", exclude=set(RESUME_NEUTRAL))  # as saved: tuples are lists


@dataclass(frozen=True)
class Plan:
    total_steps: int
    warmup_steps: int
    accumulation: int  # micro-batches per process per optimizer step
    world_size: int
    examples: int

    @property
    def epochs(self) -> float:
        return self.total_steps * self.accumulation * self.world_size / self.examples


def make_plan(config: FinetuneConfig, examples: int, world_size: int) -> Plan:
    per_pass = config.micro_batch_size * world_size
    if config.batch_size % per_pass:
        raise InvalidConfig(
            f"batch_size {config.batch_size} is not a multiple of micro_batch_size {config.micro_batch_size} "
            f"x {world_size} process(es); choose a micro_batch_size that divides {config.batch_size // world_size or 1}"
        )
    total = config.max_steps or max(1, math.ceil(config.epochs * examples / config.batch_size))
    warmup = math.ceil(config.warmup_ratio * total)
    return Plan(total, warmup, config.batch_size // per_pass, world_size, examples)


class ExampleOrder:
    """Which examples each optimizer step trains on: a pure function of (seed, step).

    The data is an endless stream of epochs, each a fresh permutation seeded by (seed, epoch); step s
    (0-based) takes stream positions [s*B, (s+1)*B). Resuming at step s needs no saved iterator, no
    example is dropped at epoch ends, and the order does not depend on the number of processes.
    """

    def __init__(self, examples: int, batch_size: int, seed: int) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs, the instance lives for one run
    def _permutation(self, epoch: int) -> tuple[int, ...]:
        return tuple(int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(self.examples))

    def step_indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [
            self._permutation(p // self.examples)[p % self.examples]
            for p in range(start, start + self.batch_size)
        ]
