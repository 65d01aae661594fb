"""`recycler finetune` and `recycler evaluate`.

Mounted by the main CLI with `from recycler.cli.train import register; register(app)`. Commands raise
`RecyclerError` subclasses; the main CLI prints `error: <message>` and exits with the error's code.
torch/transformers are imported inside the commands so that `recycler --help` stays fast.
`python -m recycler.cli.train ...` runs these commands standalone (used under `accelerate launch`).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from recycler.cli.common import TrackOpt, console
from recycler.errors import InvalidData, RecyclerError

if TYPE_CHECKING:
    from recycler.stages.finetune.run import StepReport

FINETUNE_HELP = """Supervised fine-tuning of MODEL (an HF folder) on instruction data.

Loss is on response tokens only, using the model's chat template. Checkpoints go to OUT/.checkpoints/;
the finished model (safetensors + tokenizer), training_record.json and convergence.png are published
atomically as OUT. Several GPUs: `accelerate launch -m recycler.cli.train finetune ...`; several CPU
processes: `accelerate launch --multi_gpu --num_processes N -m recycler.cli.train finetune ...`.
"""

EVALUATE_HELP = """Evaluate MODEL on a task and print its accuracy.

TASK is a local JSONL file ({"prompt"|"messages", "answer"} lines for generation with exact match;
{"prompt", "choices", "answer": index} lines for multiple choice by log-likelihood), or a paper
benchmark run through lm-evaluation-harness (gsm8k, math, arc_c, gpqa, mmlu, ifeval, global_mmlu,
or lm_eval:<task>), which must be installed with its datasets cached for offline use.
"""

ModelArg = Annotated[
    Path,
    typer.Argument(help="Model folder (HF layout, safetensors weights, tokenizer with a chat template)."),
]


class TrainingProgress:
    """A rich progress bar fed by the fine-tuning loop's StepReports (main process only)."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]fine-tune"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[eval]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=not enabled,
        )  # fmt: skip
        self.task = None

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.stop()

    def __call__(self, report: StepReport) -> None:
        if self.task is None:  # started on the first report, so early errors print nothing but the error
            self.progress.start()
            self.task = self.progress.add_task(
                "", total=report.total_steps, completed=report.step, loss="-", eval=""
            )
        fields = {} if report.loss is None else {"loss": f"{report.loss:.4f}"}
        if report.eval is not None:
            fields["eval"] = f"{report.eval.metric} {report.eval.score:.4f}"
            self.progress.console.print(
                f"step {report.step}: {report.eval.task} {report.eval.metric} = {report.eval.score:.4f}"
            )
        self.progress.update(self.task, completed=report.step, **fields)


def finetune_command(
    model: ModelArg,
    data: Annotated[
        Path,
        typer.Option(
            "--data", help='Training data: JSONL, each line {"messages": [...]} or {"prompt", "response"}.'
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o", "--output", help="Output folder OUT (published atomically when training finishes)."
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML file of fine-tuning options (see FinetuneConfig); unset options keep the paper's defaults.",
        ),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval-data",
            help="Held-out JSONL evaluated every eval_every steps: a task file (lines with 'answer') gives accuracy, SFT-format data gives eval loss. "
            "Scored with the config's `evaluation:` options, named as `recycler evaluate`'s (limit, extract, max_new_tokens, batch_size, normalize, chat).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from the newest complete checkpoint in OUT/.checkpoints (incomplete ones are quarantined).",
        ),
    ] = False,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps",
            min=1,
            help="Stop after N optimizer steps (overrides the config's epochs/max_steps).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUT, discarding its checkpoints.")
    ] = False,
    track: TrackOpt = None,
    mlflow_run_id: Annotated[
        str | None, typer.Option("--mlflow-run-id", hidden=True, help="Log into this existing MLflow run.")
    ] = None,
) -> None:
    from transformers.utils import logging as hf_logging

    from recycler.registry.runlog import log_dataset, log_training_record
    from recycler.registry.runs import maybe_track
    from recycler.stages.finetune.config import FinetuneConfig
    from recycler.stages.finetune.recipe import finetune
    from recycler.stages.finetune.run import process_state

    hf_logging.disable_progress_bar()
    cfg = FinetuneConfig.from_yaml(config) if config else FinetuneConfig()
    if max_steps is not None:
        cfg = cfg.updated(max_steps=max_steps)
    is_main = process_state().is_main_process
    params = {"model": model, "data": data, "output": output, **cfg.model_dump()}
    with (
        maybe_track("finetune", params, enabled=track, run_id=mlflow_run_id) if is_main else nullcontext(),
        TrainingProgress(enabled=is_main) as progress,
    ):
        log_dataset(data, "training")
        if eval_data is not None:
            log_dataset(eval_data, "evaluation")
        record = finetune(
            model,
            data,
            output,
            cfg,
            eval_path=eval_data,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
        )
        log_training_record(record, output)
    if is_main:
        final = record["loss_per_step"][-1][1] if record["loss_per_step"] else float("nan")
        tps = record["tokens_per_s"] or 0.0
        typer.echo(
            f"fine-tuned {record['steps']} steps, final loss {final:.4f}, {tps:,.0f} tokens/s -> {output}"
        )


def evaluate_command(
    model: ModelArg,
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="Local task .jsonl file, or a paper benchmark name run through lm-eval (gsm8k, math, arc_c, gpqa, mmlu, ifeval, global_mmlu, lm_eval:<task>).",
        ),
    ],
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Evaluate only the first N examples.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Prompts (or prompt-choice pairs) per forward pass.")
    ] = 8,
    output: Annotated[
        Path | None,
        typer.Option("--output", help="Write accuracy, n and per-example records to this JSON file."),
    ] = None,
    extract: Annotated[
        Literal["number", "text"],
        typer.Option(
            "--extract",
            help="Generation tasks: 'number' compares the last number (or the one after ####), 'text' compares normalized text.",
        ),
    ] = "number",
    normalize: Annotated[
        Literal["sum", "tokens", "chars"],
        typer.Option(
            "--normalize",
            help="Multiple choice: score choices by summed log-prob ('sum'), per token ('tokens') or per character ('chars').",
        ),
    ] = "sum",
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Generation tasks: longest answer generated.")
    ] = 256,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat/--no-chat", help="Wrap prompts in the model's chat template (default) or feed them raw."
        ),
    ] = True,
    dtype: Annotated[
        Literal["auto", "float32", "bfloat16"],
        typer.Option("--dtype", help="Weights dtype for local tasks: auto (as stored), float32 or bfloat16."),
    ] = "auto",
    track: TrackOpt = None,
) -> None:
    from recycler.registry.runlog import log_evaluation
    from recycler.registry.runs import maybe_track

    params = {"model": model, "task": task, "limit": limit, "extract": extract, "chat": chat}
    with maybe_track("evaluate", params, enabled=track):
        result = _run_evaluation(
            model, task, limit, batch_size, extract, normalize, max_new_tokens, chat, dtype
        )
        log_evaluation(result)
    typer.echo(f"{result.task}: {result.metric} {result.score:.4f} (n={result.n})")
    if output is not None:
        tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result.model_dump(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, output)


def _run_evaluation(
    model: Path, task: str, limit: int | None, batch_size: int, extract: str, normalize: str,
    max_new_tokens: int, chat: bool, dtype: str,
) -> object:  # fmt: skip
    from recycler.stages.evaluate.lm_eval import is_lm_eval_task

    if is_lm_eval_task(task) and not Path(task).exists():
        from recycler.stages.evaluate.lm_eval import run_lm_eval

        return run_lm_eval(model, task, limit=limit, batch_size=batch_size, chat=chat)
    return _evaluate_local(
        model, Path(task), limit, batch_size, extract, normalize, max_new_tokens, chat, dtype
    )


def _evaluate_local(
    model_dir: Path, task_path: Path, limit: int | None, batch_size: int, extract: str, normalize: str,
    max_new_tokens: int, chat: bool, dtype: str,
) -> object:  # fmt: skip
    """Validate the task file and model folder first (cheap), then load the model and score."""
    import torch
    from transformers.utils import logging as hf_logging

    from recycler.stages.evaluate.evaluators import load_task
    from recycler.stages.model_folder import check_model_folder, load_causal_lm, load_tokenizer

    if not task_path.is_file():
        raise InvalidData(f"task file {task_path} does not exist (and it is not a known benchmark name)")
    hf_logging.disable_progress_bar()
    evaluator = load_task(
        task_path, limit=limit, extract=extract, normalize=normalize, batch_size=batch_size,
        max_new_tokens=max_new_tokens, chat=chat,
    )  # fmt: skip
    check_model_folder(model_dir)
    tokenizer = load_tokenizer(model_dir, require_chat_template=chat)
    model = load_causal_lm(model_dir, dtype=dtype)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    with console.status(f"evaluating {evaluator.name} ({len(evaluator.examples)} examples)"):
        return evaluator.evaluate(model, tokenizer)


def register(app: typer.Typer) -> None:
    """Add `finetune` and `evaluate` to the main recycler CLI."""
    app.command("finetune", help=FINETUNE_HELP)(finetune_command)
    app.command("evaluate", help=EVALUATE_HELP)(evaluate_command)


def main(argv: list[str] | None = None) -> None:
    """Standalone entry point with the main CLI's error convention (`error: <msg>`, error's exit code)."""
    import click

    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
    register(app)
    try:
        app(args=argv, standalone_mode=False)
    except RecyclerError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
