"""Errors of the fine-tuning and evaluation stages (exit codes 20-29, clear of the Δ stages' 1-19)."""

from __future__ import annotations

from recycler.errors import RecyclerError


class InvalidData(RecyclerError):
    """A training/eval data file is missing or has a malformed line (the message names file:line)."""

    exit_code = 20


class InvalidModelFolder(RecyclerError):
    """A model folder lacks what the stage needs: config, safetensors weights, tokenizer, chat template."""

    exit_code = 21


class InvalidTask(RecyclerError):
    """An evaluation task file or name is unusable, e.g. its gold answers cannot be parsed."""

    exit_code = 22


class InvalidConfig(RecyclerError):
    """A fine-tuning config (YAML or overrides) failed validation; all problems are listed at once."""

    exit_code = 23


class ResumeError(RecyclerError):
    """Training cannot resume: no usable checkpoint, or one made with a different config or data."""

    exit_code = 24


class MissingOptionalDependency(RecyclerError):
    """An optional package (e.g. lm-evaluation-harness) or its offline data is not available."""

    exit_code = 25
