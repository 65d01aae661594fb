"""How a model is scored on a task: one set of option names for `recycler evaluate`, the fine-tune's
periodic evaluation (`evaluation:` in its config) and a cycle spec's `evaluation:`.

Two sets of names (`eval_*` in the fine-tune, `recycler evaluate`'s in the spec) let the fine-tune's
curve be scored with other settings than the cycle's scores beside it; the old names are refused
with the new one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The fine-tune's former evaluation options → their name under `evaluation:`.
RENAMED = {
    "eval_limit": "limit",
    "eval_extract": "extract",
    "eval_max_new_tokens": "max_new_tokens",
    "eval_batch_size": "batch_size",
    "eval_normalize": "normalize",
    "eval_chat": "chat",
}


class EvalOptions(BaseModel):
    """Scoring options, named as `recycler evaluate`'s (`--limit`, `--extract`, …; tests check it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    limit: int | None = Field(None, ge=1, description="evaluate only the first N examples (None: all)")
    extract: Literal["number", "text"] = Field(
        "number", description="generation: compare the last number (GSM8K-style) or normalized text"
    )
    max_new_tokens: int = Field(256, ge=1, description="generation: longest answer generated")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass")
    normalize: Literal["sum", "tokens", "chars"] = Field(
        "sum", description="multiple choice: log-prob summed, per token or per character"
    )
    chat: bool = Field(True, description="wrap prompts in the model's chat template")

    def options(self) -> EvalOptions:
        """Only the scoring options (a subclass may add the task)."""
        return EvalOptions(**{k: getattr(self, k) for k in EvalOptions.model_fields})


def renamed_problems(values: dict, where: str = "") -> list[str]:
    """The former `eval_*` names among `values`' keys, each with the name that replaced it."""
    return [
        f"{where}{old} was renamed: use {where}evaluation.{new}"
        for old, new in RENAMED.items()
        if old in values
    ]
