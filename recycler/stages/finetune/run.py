"""The pieces of a fine-tuning run that are not the loop: where this process sits in the launch, what
the optimizer decays, what a checkpoint must carry, and when a checkpoint may be resumed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from recycler.io.checkpoint import open_checkpoint
from recycler.io.manifest import fingerprint
from recycler.stages.evaluate.evaluators import EvalResult
from recycler.stages.finetune.data import IGNORE_INDEX, EncodedExample


@dataclass
class StepReport:
    """What progress displays get after each step (and once at start, with `loss=None`)."""

    step: int
    total_steps: int
    loss: float | None = None
    lr: float | None = None
    eval: EvalResult | None = None


@dataclass
class RunState:
    """Everything about the run's history that a checkpoint must carry (JSON-serialisable)."""

    step: int = 0
    losses: list[list[float]] = field(default_factory=list)  # [step, loss]
    curve: list[list[float]] = field(default_factory=list)  # [step, eval score]
    tokens_seen: int = 0
    response_tokens_seen: int = 0
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    resumed_from: list[int] = field(default_factory=list)


def process_state() -> PartialState:
    """This process's place in the launch (rank, world size).

    Without a GPU or other accelerator, `cpu=True` makes accelerate join the processes started by
    `accelerate launch --multi_gpu`/torchrun over gloo; otherwise each would train alone.
    """
    return PartialState(cpu=not torch.accelerator.is_available())


def resolve_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: embeddings (input and output), norm weights and biases are exempt."""
    exempt = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    if (out_emb := model.get_output_embeddings()) is not None:  # type: ignore[operator]
        exempt.add(id(out_emb.weight))
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def start_model_identity(model_dir: Path) -> dict:
    """What the run starts from, by content: its manifest's digest (recycler folders) or the sha256 of
    every weight file. A path alone would let a resume continue another model's weights."""
    fp = fingerprint(open_checkpoint(model_dir), full=True)
    return {"path": str(model_dir), "kind": fp["kind"], "sha256": fp["sha256"]}


def fingerprint_mismatch(saved: dict, current: dict) -> str | None:
    """Name what differs between a checkpoint's run and this one, or None if resuming is sound."""
    old, new = saved["config"], current["config"]
    fields = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
    parts = [f"different settings ({', '.join(fields)})"] if fields else []
    if saved["data_sha256"] != current["data_sha256"]:
        parts.append("different training data")
    was, now = saved.get("model"), current.get("model")
    if now is not None and (was is None or (was["kind"], was["sha256"]) != (now["kind"], now["sha256"])):
        made_from = f"{was['path']} (sha256 {was['sha256'][:12]})" if was else "an unrecorded start model"
        parts.append(
            f"a different start model: the checkpoint continues {made_from}, "
            f"this run starts from {now['path']} (sha256 {now['sha256'][:12]})"
        )
    return " and ".join(parts) or None


def n_targets(example: EncodedExample) -> int:
    return sum(label != IGNORE_INDEX for label in example.labels[1:])  # labels shift by one
