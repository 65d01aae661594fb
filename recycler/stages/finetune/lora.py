"""LoRA fine-tuning through PEFT (`finetune.method: lora`): wrap the model, and merge it back.

The published model is the merged one (base + scale·B·A), so Δ^iter is extracted from it exactly as
from a full fine-tune, at full precision; the adapter as trained is published beside it (`adapter/`),
a PEFT folder that `recycler` also reads as a fine-tune of the same base.
"""

from __future__ import annotations

from pathlib import Path

import torch

from recycler.errors import MissingOptionalDependency
from recycler.stages.finetune.config import FinetuneConfig

ADAPTER_DIR = "adapter"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise MissingOptionalDependency(
            "finetune.method lora needs PEFT: pip install 'recycler[lora]' (or peft>=0.15)"
        ) from e
    return peft


def wrap_lora(model: torch.nn.Module, config: FinetuneConfig) -> torch.nn.Module:
    """The model with LoRA layers on `lora_target_modules`; only the factors are trainable."""
    peft = _peft()
    lora = peft.LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    wrapped = peft.get_peft_model(model, lora)
    if config.gradient_checkpointing:
        wrapped.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad input
    return wrapped


def merged_for_publishing(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Save the adapter into `folder/adapter`, then return the merged plain model (in place)."""
    adapter = folder / ADAPTER_DIR
    model.save_pretrained(adapter)
    return model.merge_and_unload()
