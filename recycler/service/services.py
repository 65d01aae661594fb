"""What a release cycle talks to: the artifact store, the registry, a trainer and a scorer.

`Trainer` and `Scorer` are protocols so that the cycle can be exercised branch by branch with fakes
that train nothing (tests), and so a deployment can bring its own trainer (a managed training job)
without touching the cycle. The defaults fine-tune in a child process through accelerate and score
on the family's local task file.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import yaml

from recycler.errors import FinetuneFailed
from recycler.stages.gate import Evidence

if TYPE_CHECKING:
    from recycler.registry.client import Registry
    from recycler.service.spec import CycleSpec, EvalSettings
    from recycler.settings import Settings
    from recycler.store import ArtifactStore

FT_RECORD = "training_record.json"


class Trainer(Protocol):
    def finetune(self, start: Path, dest: Path, spec: CycleSpec, *, run_id: str | None = None) -> None:
        """FT(start) into the HF folder `dest`, with `training_record.json` (curve, steps, wall time).

        Called again after a crash: must resume (or restart) the interrupted run at `dest`. `run_id`
        is the MLflow run to log the training into (the cycle's child run), if tracking is on.
        """
        ...


class Scorer(Protocol):
    def score(self, model: Path, evaluation: EvalSettings) -> float | Evidence:
        """The model's score on the task of `evaluation` (higher is better); with per-example results
        (an Evidence's `outcomes`, in task order) the gate reads the noise of its comparisons."""
        ...


class LaunchedTrainer:
    """`recycler finetune` in a child process: `accelerate launch` on GPU hosts, plain python on CPU.

    A child process because accelerate keeps process-wide state, and because a crash (OOM, a killed
    pod) must not take the orchestrating flow with it. `--resume` continues from the last complete
    checkpoint of an interrupted attempt.
    """

    def finetune(self, start: Path, dest: Path, spec: CycleSpec, *, run_id: str | None = None) -> None:
        from recycler.stages.finetune.launcher import run_finetune

        config = dest.parent / f".{dest.name}.finetune.yaml"
        config.write_text(yaml.safe_dump(spec.finetune_config().model_dump(mode="json"), sort_keys=True))
        args = [str(start), "--data", str(spec.train), "--output", str(dest), "--config", str(config)]
        args += ["--eval-data", str(spec.evaluation.task), "--resume"]
        tracking = ["--track", "--mlflow-run-id", run_id] if run_id else ["--no-track"]
        try:
            run_finetune([*args, *tracking])
        except subprocess.CalledProcessError as e:
            raise FinetuneFailed(
                f"fine-tuning {start} exited with code {e.returncode}; re-run the cycle to resume "
                f"from the last complete checkpoint in {dest / '.checkpoints'}"
            ) from e


@dataclass(frozen=True)
class InProcessTrainer:
    """`finetune` in this process, logged into the cycle's child run: for tiny models on a CPU (the
    toy family in `recycler reproduce`), where starting a Python process per fine-tune costs more than
    the fine-tune. Production uses LaunchedTrainer (process isolation, accelerate)."""

    settings: Settings  # the tracking server of the cycle's runs

    def finetune(self, start: Path, dest: Path, spec: CycleSpec, *, run_id: str | None = None) -> None:
        from recycler.registry.runlog import log_dataset, log_training_record
        from recycler.registry.runs import tracked_run
        from recycler.stages.finetune.recipe import finetune

        config = spec.finetune_config()
        with tracked_run("finetune", settings=self.settings, enabled=run_id is not None, run_id=run_id):
            log_dataset(spec.train, "training")
            record = finetune(start, spec.train, dest, config, eval_path=spec.evaluation.task, resume=True)
            log_training_record(record, dest)


class TaskScorer:
    """Accuracy on a local task file (generation with answer extraction, or multiple choice)."""

    def score(self, model: Path, evaluation: EvalSettings) -> float:
        from transformers.utils import logging as hf_logging

        from recycler.stages.evaluate.evaluators import load_task
        from recycler.stages.model_folder import load_causal_lm, load_tokenizer

        hf_logging.disable_progress_bar()
        task = load_task(
            evaluation.task,
            limit=evaluation.limit,
            extract=evaluation.extract,
            batch_size=evaluation.batch_size,
            max_new_tokens=evaluation.max_new_tokens,
            normalize=evaluation.normalize,
            chat=evaluation.chat,
        )
        tokenizer = load_tokenizer(model, require_chat_template=evaluation.chat)
        result = task.evaluate(load_causal_lm(model), tokenizer)
        outcomes = tuple(int(bool(r["correct"])) for r in result.records if "correct" in r)
        return Evidence(float(result.score), outcomes if len(outcomes) == result.n else None)


@dataclass(frozen=True)
class Services:
    """The store, registry, trainer and scorer a cycle uses, built from one Settings."""

    settings: Settings
    store: ArtifactStore
    registry: Registry
    trainer: Trainer = field(default_factory=LaunchedTrainer)
    scorer: Scorer = field(default_factory=TaskScorer)

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, *, trainer: Trainer | None = None, scorer: Scorer | None = None
    ) -> Services:
        from recycler.registry.client import Registry
        from recycler.settings import get_settings
        from recycler.store import open_store

        settings = settings or get_settings()
        settings.home.mkdir(parents=True, exist_ok=True)
        return cls(
            settings,
            open_store(settings),
            Registry.from_settings(settings),
            trainer or LaunchedTrainer(),
            scorer or TaskScorer(),
        )
