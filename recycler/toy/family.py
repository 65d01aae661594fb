"""The toy model family: base versions v1…v5, instruction data and fine-tuning settings, cached on disk.

`build_toy_family` is the API the release-cycle flows and `recycler reproduce` call. A family is a
folder named by the hash of its WorldConfig; it is built into a temporary sibling and renamed into
place when complete, so an existing folder is always a finished family and is reused as is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recycler.errors import OutputExists, ToyFamilyError
from recycler.io.atomic import atomic_folder
from recycler.service.spec import CycleSpec, build_spec
from recycler.stages.evaluate.options import EvalOptions
from recycler.stages.finetune.config import FinetuneConfig
from recycler.toy.pretrain import pretrain
from recycler.toy.world import (
    WorldConfig,
    excluded_problems,
    task_problems,
    task_records,
    world_config,
    write_jsonl,
)

WORLD_FILE = "world.json"


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress report: `lane` names a line of work (a seed), `label` what it is doing now."""

    lane: str
    label: str
    done: int
    total: int


Progress = Callable[[ProgressUpdate], None]


@dataclass(frozen=True)
class ToyFamily:
    root: Path
    versions: dict[str, Path]  # "v1".."v5", oldest first; each an HF folder (safetensors + tokenizer)
    train: Path  # SFT JSONL: {"messages": [user, assistant]}
    dev: Path  # SFT JSONL, held out (pre-check probes, never trained on)
    test: Path  # task JSONL: {"messages": [user], "answer"} for recycler.stages.evaluate.evaluators
    finetune_config: FinetuneConfig
    config: WorldConfig

    def cycle_spec(
        self, *, finetune: dict | None = None, evaluation: dict | None = None, **fields: object
    ) -> CycleSpec:
        """The family's release-cycle spec (family `toy`, variant `arith`): its data, its fine-tuning
        budget, its evaluation settings (under `evaluation:`, where a spec keeps them); `finetune`,
        `evaluation` and the other fields override."""
        ft = self.finetune_config
        options = ft.model_dump(mode="json", exclude={"evaluation"})
        scoring = {"task": str(self.test), **ft.evaluation.model_dump(mode="json")}
        values = {
            "family": "toy",
            "variant": "arith",
            "train": str(self.train),
            "max_relative_norm": TOY_MAX_RELATIVE_NORM,
        }
        values |= {
            "finetune": options | (finetune or {}),
            "evaluation": scoring | (evaluation or {}),
            **fields,
        }
        return build_spec(values, source=f"toy family {self.root.name}")


# Toy fine-tunes move small weights far (lr 1e-3): ‖Δ‖/‖base‖ can pass the 0.5 meant for real models.
TOY_MAX_RELATIVE_NORM = 5.0


def toy_finetune_config(config: WorldConfig) -> FinetuneConfig:
    """Toy-scale SFT, batch 64, with the world's budget (full: lr 5e-4, 40 steps, 25% warm-up; fast: lr 1e-3,
    100 steps). 5e-6 and batch 8, the paper's, move nothing here; a budget in which FT from the base converges
    (≥ 100 steps at 1e-3) puts every start on the same plateau and hides who gets there better."""
    return FinetuneConfig(
        learning_rate=config.ft_learning_rate,
        batch_size=64,
        micro_batch_size=64,
        max_steps=config.ft_steps,
        lr_scheduler="linear",
        warmup_ratio=config.ft_warmup_ratio,
        max_length=2 * config.context,
        mixed_precision="no",
        seed=config.seed,
        eval_every=None,
        save_every=None,
        evaluation=EvalOptions(
            max_new_tokens=5,  # 3 answer digits + <|end|>; a base that never stops is cut short
            batch_size=256,
            extract="text",  # answers are digit strings: "0570" is not "570" (LSD-first 750 vs 075)
        ),
    )


def _family(root: Path, config: WorldConfig) -> ToyFamily:
    names = [f"v{i + 1}" for i in range(config.n_versions)]
    return ToyFamily(
        root=root,
        versions={n: root / n for n in names},
        train=root / "train.jsonl",
        dev=root / "dev.jsonl",
        test=root / "test.jsonl",
        finetune_config=toy_finetune_config(config),
        config=config,
    )


def open_toy_family(root: Path, config: WorldConfig) -> ToyFamily:
    """A finished family folder, checked against the configuration that should have built it."""
    stored = root / WORLD_FILE
    try:
        found = WorldConfig.model_validate_json(stored.read_text())
    except (OSError, ValueError) as e:
        raise ToyFamilyError(f"{root}: not a toy family ({e}); delete the folder to rebuild it") from e
    if found != config:
        raise ToyFamilyError(f"{root}: built from a different configuration; delete the folder to rebuild it")
    return _family(root, config)


def build_family(cache: Path, config: WorldConfig, progress: Progress | None = None) -> ToyFamily:
    """Build (or reuse) the family of `config` under `cache`/toy-<hash>."""
    root = Path(cache) / f"toy-{config.digest()}"
    if root.is_dir():
        return open_toy_family(root, config)
    lane = f"toy seed {config.seed}"
    tick = (
        (lambda label, done, total: progress(ProgressUpdate(lane, label, done, total))) if progress else None
    )
    try:
        with atomic_folder(root) as tmp:
            splits = task_problems(config)
            write_jsonl(tmp / "train.jsonl", task_records(splits["train"], with_answer_field=False))
            write_jsonl(tmp / "dev.jsonl", task_records(splits["dev"], with_answer_field=False))
            write_jsonl(tmp / "test.jsonl", task_records(splits["test"], with_answer_field=True))
            names = [f"v{i + 1}" for i in range(config.n_versions)]
            pretrain(config, excluded_problems(splits), [tmp / n for n in names], tick)
            (tmp / WORLD_FILE).write_text(json.dumps(config.model_dump(mode="json"), indent=1) + "\n")
    except OutputExists:  # another process finished the same family first: same bytes, use it
        if not root.is_dir():
            raise
    return open_toy_family(root, config)


def build_toy_family(
    root: Path, *, fast: bool = False, seed: int = 0, progress: Progress | None = None
) -> ToyFamily:
    """The toy family for (fast, seed), built under `root` only if absent.

    Full: d=96, 3 layers, minutes on one core. Fast: smaller and shorter, well under a minute (tests, CI).
    """
    return build_family(root, world_config(fast=fast, seed=seed), progress)
