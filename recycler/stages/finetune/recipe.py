"""Supervised fine-tuning recipe: setup, train, save_checkpoint, publish.

A plain loop on `accelerate.Accelerator` (not HF Trainer), so the same code runs on CPU, one GPU, or
many under `accelerate launch`. The loss is the mean over every response token of the global batch,
whatever the split into processes and micro-batches, so results do not depend on the hardware layout.
Checkpoints are pickle-free and marked COMPLETE last (see `train_state`); a resumed run repeats the
uninterrupted run's steps exactly: same weights, optimizer, schedule, RNG and example order.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import accelerate
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from recycler.crashpoints import crash_point
from recycler.errors import NonFiniteValues, ResumeError
from recycler.io.atomic import atomic_folder
from recycler.io.manifest import sha256_file
from recycler.stages.evaluate.evaluators import EvalResult, Evaluator, evaluator_for_file
from recycler.stages.evaluate.scoring import pad_token_id, token_nll_sum
from recycler.stages.finetune import state as ts
from recycler.stages.finetune.config import ExampleOrder, FinetuneConfig, Plan, make_plan
from recycler.stages.finetune.data import collate, encode_records, load_sft_records
from recycler.stages.finetune.lora import merged_for_publishing, wrap_lora
from recycler.stages.finetune.output import PLOT, RECORD, check_output, link_tree, plot_curve
from recycler.stages.finetune.run import (
    RunState,
    StepReport,
    fingerprint_mismatch,
    n_targets,
    param_groups,
    process_state,
    resolve_precision,
    start_model_identity,
)
from recycler.stages.model_folder import check_model_folder, dropout_settings, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


class FinetuneRecipe:
    def __init__(
        self,
        model_dir: Path,
        train_path: Path,
        out: Path,
        config: FinetuneConfig,
        *,
        eval_path: Path | None = None,
        evaluator: Evaluator | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.model_dir, self.train_path, self.out = (
            Path(model_dir).resolve(),
            Path(train_path),
            Path(out).resolve(),
        )
        self.config, self.eval_path, self.evaluator = config, eval_path, evaluator
        self.resume_requested, self.overwrite = resume, overwrite
        self.state, self.quarantined = RunState(), []
        self.segment_start = time.monotonic()

    # ---- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Validate inputs (cheap checks first), build model/optimizer/schedule, restore a checkpoint."""
        cfg = self.config
        process_state()  # join the launch group (gloo on CPU) before the Accelerator picks a device
        self.acc = Accelerator(
            mixed_precision=resolve_precision(cfg.mixed_precision), cpu=not torch.accelerator.is_available()
        )
        set_seed(cfg.seed)
        check_output(self.out, self.model_dir, resume=self.resume_requested, overwrite=self.overwrite)
        if self.acc.is_main_process and self.overwrite and not self.resume_requested:
            shutil.rmtree(ts.checkpoint_root(self.out), ignore_errors=True)
        self._load_data()
        self.plan: Plan = make_plan(cfg, len(self.data), self.acc.num_processes)
        self.order = ExampleOrder(len(self.data), cfg.batch_size, cfg.seed)
        self.fingerprint = {
            "config": cfg.resume_fingerprint(),
            "data_sha256": sha256_file(self.train_path).sha256,
            # hashed only where checkpoints are written or read: a resume must continue this model
            "model": start_model_identity(self.model_dir)
            if self.resume_requested or cfg.save_every
            else None,
        }
        model = self._load_model()
        checkpoint = self._choose_checkpoint() if self.resume_requested else None
        if checkpoint is not None:
            ts.load_weights(checkpoint, model)
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay),
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
        )
        if cfg.lr_scheduler == "linear":
            total = self.plan.total_steps
            self.scheduler = get_linear_schedule_with_warmup(optimizer, self.plan.warmup_steps, total)
        else:
            self.scheduler = get_constant_schedule_with_warmup(optimizer, self.plan.warmup_steps)
        # The scheduler is deliberately not prepared: accelerate would step it once per process.
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        if checkpoint is not None:
            self._restore(checkpoint)

    def _load_data(self) -> None:
        cfg = self.config
        records = load_sft_records(self.train_path)
        check_model_folder(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.data = encode_records(self.tokenizer, records, cfg.max_length)
        if self.evaluator is None and self.eval_path is not None:
            self.evaluator = evaluator_for_file(
                Path(self.eval_path),
                self.tokenizer,
                max_length=cfg.max_length,
                options=cfg.evaluation,
            )

    def _load_model(self) -> torch.nn.Module:
        self.original_dropout = dropout_settings(transformers.AutoConfig.from_pretrained(self.model_dir))
        model = load_causal_lm(self.model_dir, dtype=self.config.dtype, zero_dropout=True)
        if self.config.gradient_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.config.method == "lora":
            model = wrap_lora(model, self.config)
        model.train()
        return model

    def _choose_checkpoint(self) -> Path | None:
        """Main process selects (and quarantines); every process then loads the same step."""
        step = 0
        if self.acc.is_main_process:
            chosen, self.quarantined = ts.select_resume_checkpoint(self.out)
            step = int(chosen.name.split("-")[1]) if chosen else 0
        step = int(broadcast(torch.tensor([step], device=self.acc.device)).item())
        if step == 0:  # a warning only when something was there: a fresh run has nothing to resume
            root = ts.checkpoint_root(self.out)
            level = (
                logging.WARNING
                if self.quarantined or (root.is_dir() and any(root.iterdir()))
                else logging.INFO
            )
            log.log(level, "no complete checkpoint under %s; starting from step 0", root)
            return None
        folder = ts.step_dir(self.out, step)
        problem = fingerprint_mismatch(ts.load_trainer_state(folder)["fingerprint"], self.fingerprint)
        if problem:
            raise ResumeError(
                f"checkpoint {folder} was made with {problem}; "
                "resume with the original model, config and data, or pass --overwrite to start over"
            )
        return folder

    def _restore(self, folder: Path) -> None:
        ts.load_optimizer(folder, self.optimizer.optimizer)
        ts.load_scheduler(folder, self.scheduler)
        saved = ts.load_trainer_state(folder)
        self.state = RunState(**saved["run"])
        self.state.resumed_from.append(self.state.step)
        if not ts.load_rng(folder, self.acc.process_index):
            log.warning(
                "checkpoint %s has no RNG state for rank %d (process count changed)",
                folder,
                self.acc.process_index,
            )

    # ---- training ---------------------------------------------------------------------------------

    def train(self, progress: Callable[[StepReport], None] | None = None) -> None:
        report = progress if (progress and self.acc.is_main_process) else (lambda _r: None)
        report(StepReport(self.state.step, self.plan.total_steps))
        if self.state.step == 0:
            report(StepReport(0, self.plan.total_steps, eval=self._evaluate(0)))
        cfg = self.config
        while self.state.step < self.plan.total_steps:
            step = self.state.step + 1
            t0 = time.monotonic()
            loss, lr = self._train_step(step)
            self.state.train_time_s += time.monotonic() - t0
            crash_point(f"finetune:step={step}")
            final = step == self.plan.total_steps
            result = (
                self._evaluate(step) if final or (cfg.eval_every and step % cfg.eval_every == 0) else None
            )
            report(StepReport(step, self.plan.total_steps, loss, lr, result))
            if cfg.save_every and step % cfg.save_every == 0 and not final:
                self.save_checkpoint(step)

    def _train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step on the global batch; this process runs its share of the micro-batches."""
        examples = [self.data[i] for i in self.order.step_indices(step - 1)]
        targets = sum(n_targets(e) for e in examples)  # over the global batch, known to every process
        micro, world, rank = self.config.micro_batch_size, self.plan.world_size, self.acc.process_index
        local_nll = torch.zeros((), device=self.acc.device)
        for m in range(self.plan.accumulation):
            start = (m * world + rank) * micro
            batch = {
                k: v.to(self.acc.device)
                for k, v in collate(examples[start : start + micro], self._pad).items()
            }
            last = m == self.plan.accumulation - 1
            with nullcontext() if last else self.acc.no_sync(self.model):
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                nll = token_nll_sum(logits, batch["labels"])
                # DDP averages gradients over processes; × world makes the result Σ nll / targets.
                self.acc.backward(nll * world / targets)
            local_nll += nll.detach()
        if self.config.max_grad_norm:
            self.acc.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(self.acc.reduce(local_nll, "sum")) / targets
        if not math.isfinite(loss):
            raise NonFiniteValues(
                f"training loss became {loss} at step {step}; lower learning_rate or set max_grad_norm "
                "and start over with --overwrite"
            )
        self.state.step = step
        self.state.losses.append([step, loss])
        self.state.tokens_seen += sum(len(e.input_ids) for e in examples)
        self.state.response_tokens_seen += targets
        return loss, lr

    @property
    def _pad(self) -> int:
        return pad_token_id(self.tokenizer)

    def _evaluate(self, step: int) -> EvalResult | None:
        """Evaluate on the main process only (others wait); the curve lives in the main's state."""
        if self.evaluator is None:
            return None
        result = None
        if self.acc.is_main_process:
            with self.acc.autocast():
                result = self.evaluator.evaluate(self.acc.unwrap_model(self.model), self.tokenizer)
            self.state.curve.append([step, result.score])
            self.eval_meta = {
                "task": result.task,
                "metric": result.metric,
                "higher_is_better": result.higher_is_better,
            }
        self.acc.wait_for_everyone()
        return result

    # ---- checkpoints and output -----------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self.state.wall_time_s + time.monotonic() - self.segment_start

    def save_checkpoint(self, step: int) -> None:
        folder, main = ts.step_dir(self.out, step), self.acc.is_main_process
        if main:
            shutil.rmtree(folder, ignore_errors=True)  # a leftover of an abandoned run, never a complete one
            folder.mkdir(parents=True)
        self.acc.wait_for_everyone()
        ts.save_rng(folder, self.acc.process_index)
        if main:
            ts.save_weights(folder, self.acc.unwrap_model(self.model))
            crash_point("finetune:checkpoint-save")
            crash_point(f"finetune:checkpoint-save:step={step}")
            ts.save_optimizer(folder, self.optimizer.optimizer)
            ts.save_scheduler(folder, self.scheduler)
            run = {**asdict(self.state), "wall_time_s": self._elapsed()}
            ts.save_trainer_state(folder, {"step": step, "run": run, "fingerprint": self.fingerprint})
        self.acc.wait_for_everyone()
        if main:
            ts.write_marker(folder, step)
            ts.prune_checkpoints(self.out, self.config.keep_last_checkpoints)
        self.acc.wait_for_everyone()

    def record(self) -> dict:
        s = self.state
        return {
            "format": "recycler-training-record/1",
            "model": str(self.model_dir),
            "train_data": {
                "path": str(self.train_path),
                "sha256": self.fingerprint["data_sha256"],
                "examples": len(self.data),
                "truncated": sum(e.truncated for e in self.data),
            },
            "config": self.config.model_dump(),
            "plan": {**asdict(self.plan), "epochs": self.plan.epochs},
            "mixed_precision": self.acc.mixed_precision,
            "eval": getattr(self, "eval_meta", None),
            "curve": s.curve,
            "loss_per_step": s.losses,
            "steps": s.step,
            "wall_time_s": self._elapsed(),
            "train_time_s": s.train_time_s,
            "tokens_seen": s.tokens_seen,
            "response_tokens_seen": s.response_tokens_seen,
            "tokens_per_s": s.tokens_seen / s.train_time_s if s.train_time_s else None,
            "resumed_from": s.resumed_from,
            "quarantined_checkpoints": self.quarantined,
            "dropout_forced_to_zero": self.original_dropout,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "accelerate": accelerate.__version__,
            },
        }

    def publish(self) -> dict:
        """Write the HF folder, record and plot into a temp sibling and swap it in as OUT."""
        record = self.record()
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.model)
            for key, value in self.original_dropout.items():  # publish the base's config, not our override
                setattr(model.config, key, value)
            with atomic_folder(self.out, [self.model_dir], overwrite=True) as tmp:
                if self.config.method == "lora":  # the adapter beside the merged model
                    model = merged_for_publishing(model, tmp)
                    model.save_pretrained(tmp)
                else:
                    model.save_pretrained(tmp, state_dict=self.acc.get_state_dict(self.model))
                self.tokenizer.save_pretrained(tmp)
                (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
                plot_curve(tmp / PLOT, record)
                if self.config.keep_checkpoints_in_output and ts.checkpoint_root(self.out).is_dir():
                    link_tree(ts.checkpoint_root(self.out), tmp / ts.CHECKPOINTS)
        self.acc.wait_for_everyone()
        return record


def finetune(
    model_dir: Path,
    train_path: Path,
    out: Path,
    config: FinetuneConfig | None = None,
    *,
    eval_path: Path | None = None,
    evaluator: Evaluator | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[StepReport], None] | None = None,
) -> dict:
    """Fine-tune `model_dir` on `train_path` into the HF folder `out`; returns the training record."""
    recipe = FinetuneRecipe(
        model_dir,
        train_path,
        out,
        config or FinetuneConfig(),
        eval_path=eval_path,
        evaluator=evaluator,
        resume=resume,
        overwrite=overwrite,
    )
    recipe.setup()
    recipe.train(progress)
    return recipe.publish()
