"""Run the paper's benchmarks through lm-evaluation-harness, when it (and its datasets) are available.

lm-eval is optional: it is heavy and downloads datasets from the hub on first use. This adapter maps
the paper's benchmark names to lm-eval task names, and turns "not installed" and "datasets not
available offline" into one clear `MissingOptionalDependency` saying what to install or pre-fetch.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from recycler.errors import InvalidTask, MissingOptionalDependency
from recycler.stages.evaluate.evaluators import EvalResult

# Paper benchmark → (lm-eval task, primary metric key in lm-eval's results).
PAPER_TASKS: dict[str, tuple[str, str]] = {
    "gsm8k": ("gsm8k", "exact_match,strict-match"),
    "math": ("minerva_math", "exact_match,none"),
    "arc_c": ("arc_challenge", "acc_norm,none"),
    "arc_challenge": ("arc_challenge", "acc_norm,none"),
    "gpqa": ("gpqa_main_zeroshot", "acc_norm,none"),
    "mmlu": ("mmlu", "acc,none"),
    "ifeval": ("ifeval", "prompt_level_strict_acc,none"),
    "global_mmlu": ("global_mmlu", "acc,none"),
}
PASSTHROUGH = "lm_eval:"  # `lm_eval:<task>` runs any lm-eval task by its own name

INSTALL_HINT = (
    "install it with `pip install 'lm-eval[math,ifeval]'`, then, on a machine with internet, run the task "
    "once to fill the datasets cache (HF_DATASETS_CACHE) and copy that cache here; run with "
    "HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1"
)
# Exceptions (by class name, so `datasets`/`huggingface_hub` need not be importable) meaning "data not here".
_OFFLINE_ERRORS = {
    "DatasetNotFoundError",
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "HfHubHTTPError",
}


def resolve_task(name: str) -> tuple[str, str | None]:
    """(lm-eval task name, primary metric or None) for a paper benchmark or `lm_eval:<task>`."""
    key = name.strip().lower()
    if key in PAPER_TASKS:
        return PAPER_TASKS[key]
    if name.startswith(PASSTHROUGH) and len(name) > len(PASSTHROUGH):
        return name[len(PASSTHROUGH) :], None
    raise InvalidTask(
        f"unknown task {name!r}: give a local .jsonl task file, one of {sorted(PAPER_TASKS)}, "
        f"or '{PASSTHROUGH}<lm-eval task name>'"
    )


def is_lm_eval_task(spec: str) -> bool:
    return spec.strip().lower() in PAPER_TASKS or spec.startswith(PASSTHROUGH)


def _import_lm_eval() -> object:
    try:
        return importlib.import_module("lm_eval")
    except ImportError:
        raise MissingOptionalDependency(
            f"lm-evaluation-harness (package 'lm_eval') is not installed; {INSTALL_HINT}"
        ) from None


def _is_offline_error(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionError | TimeoutError) or any(
        t.__name__ in _OFFLINE_ERRORS for t in type(exc).__mro__
    )


def _primary(metrics: dict, preferred: str | None) -> tuple[str, float]:
    if preferred and isinstance(metrics.get(preferred), int | float):
        return preferred, float(metrics[preferred])
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and "_stderr" not in key:
            return key, float(value)
    raise InvalidTask(f"lm-eval returned no numeric metric: {sorted(metrics)}")


def run_lm_eval(
    model_dir: Path, task: str, *, limit: int | None = None, batch_size: int = 8, chat: bool = True
) -> EvalResult:
    """Evaluate `model_dir` on one paper benchmark with lm-eval's own prompts and metrics."""
    lm_task, preferred = resolve_task(task)
    lm_eval = _import_lm_eval()
    try:
        out = lm_eval.simple_evaluate(  # type: ignore[attr-defined]
            model="hf",
            model_args={"pretrained": str(model_dir), "trust_remote_code": False},
            tasks=[lm_task],
            limit=limit,
            batch_size=batch_size,
            apply_chat_template=chat,
        )
    except Exception as exc:
        if _is_offline_error(exc):
            raise MissingOptionalDependency(
                f"lm-eval could not load the data for task {lm_task!r} ({type(exc).__name__}: {exc}); "
                f"its datasets are not available offline. {INSTALL_HINT}"
            ) from None
        raise
    metrics = out["results"][lm_task]
    metric, score = _primary(metrics, preferred)
    n = out.get("n-samples", {}).get(lm_task, {}).get("effective", 0)
    return EvalResult(
        task=task, metric=metric, score=score, n=int(n), records=[{"lm_eval_task": lm_task, **metrics}]
    )
